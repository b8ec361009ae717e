"""The offline demo: a spoken corpus made with espeak-ng, the three stages, evaluation and a report."""
