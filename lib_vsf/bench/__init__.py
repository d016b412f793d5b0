"""The benchmark: `python -m lib_vsf.bench` times unguided, CFG and the guided methods on model-shaped
transformers and checks the fast path against the reference in the same run.

`runner.py` owns the timing and the command line; `models.py` the presets (transformer shapes) and how
a random-weight model of each is built.
"""
from .runner import main

__all__ = ["main"]
