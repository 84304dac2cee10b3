"""Runs tests/test_compressed_cuda.py under numba's CUDA simulator in a fresh process, when this
process has neither a GPU nor the simulator (as tests/test_cuda.py does for itself): so that CI,
which has no GPU, checks compressed state on CUDA against the CPU bit for bit."""

import os
import subprocess
import sys

import pytest


def _on_device():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return True
    try:
        from numba import cuda
        return cuda.is_available()
    except Exception:
        return False


@pytest.mark.skipif(_on_device(), reason="tests/test_compressed_cuda.py runs directly here")
def test_compressed_cuda_under_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(root, "tests", "test_compressed_cuda.py")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-3000:]
