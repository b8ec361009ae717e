PYTHON ?= python3

.PHONY: install test

install:  ## install torch, fairseq-fixed and this package (editable, with test extras)
	PYTHON=$(PYTHON) bash scripts/install.sh

test:  ## run the test suite (CPU, no network)
	$(PYTHON) -m pytest -q tests
