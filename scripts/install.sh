#!/usr/bin/env bash
# Install speechgpt-fairseq and everything it needs into the active Python environment.
# Safe to run again: what is already installed at the right version is left alone.
#
#   PYTHON      interpreter to install into (default: python3)
#   TORCH_SPEC  torch to install when none is present (default: torch==2.13.0, the CPU build on this
#               project's machines). An installed torch, a CUDA build included, is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }

# espeak-ng (Debian package) speaks the demo's corpus and the tests' audio. Installed with apt-get as root (or
# through sudo when it needs no password); otherwise the install stops and says what to run.
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then as_root=(); elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n); else as_root=(missing); fi
  if [ "${as_root[*]-}" = missing ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: espeak-ng is missing: install it (Debian/Ubuntu: sudo apt-get install espeak-ng), then run make install again" >&2
    exit 1
  fi
  apt_install() { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends espeak-ng; }
  apt_install || { "${as_root[@]}" apt-get update -q && apt_install; }
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "$TORCH_SPEC"
fi

# fairseq-fixed compiles its Cython extensions against the torch and numpy already installed, so it is
# built without isolation and without its declared dependencies (its torchaudio pin would pull in
# another torch); its runtime needs are installed explicitly below.
pip_install "numpy>=1.24" "cython>=3" setuptools wheel
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('fairseq-fixed') != '0.12.3.1')" 2>/dev/null; then
  pip_install --no-build-isolation --no-deps fairseq-fixed==0.12.3.1
fi
pip_install hydra-core==1.3.2 omegaconf==2.3.0 bitarray sacrebleu regex scikit-learn cffi packaging tqdm

# NVIDIA apex is optional and never comes from PyPI: the PyPI package named "apex" is unrelated.
if "$PY" -c "import importlib.metadata as m; m.version('apex')" 2>/dev/null \
   && ! "$PY" -c "import apex.normalization" 2>/dev/null; then
  echo "warning: the installed 'apex' is not NVIDIA apex; uninstall it (pip uninstall apex)" >&2
fi

pip_install -e ".[test]"
"$PY" -c "import speechgpt_fairseq; speechgpt_fairseq.register(); import fairseq, torch; print('speechgpt-fairseq ready: torch', torch.__version__, '| fairseq', fairseq.__version__)"
