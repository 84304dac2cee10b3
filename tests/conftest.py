"""Shared test constants and the optimizer table (tests/optimizers.py)."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # reference.py, optimizers.py

#: the dtypes every path is tested in, and their test ids
DTYPES = [np.float64, np.float32]
DTYPE_IDS = ["f64", "f32"]
#: parity tolerances of the spec ("Agreement with torch.optim"): relative error after 50 steps
RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


def pytest_collection_modifyitems(config, items):
    """Every optimizer of fastadapt has a case in tests/optimizers.py (checked once per run)."""
    from fastadapt.algorithms import REGISTRY
    from optimizers import CASES
    missing = [a.name for a in REGISTRY if a.name not in CASES]
    if missing:
        raise RuntimeError(f"tests/optimizers.py has no case for {missing}: add one per public optimizer")
