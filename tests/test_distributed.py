"""fastadapt.distributed: launches ``mpiexec -n 2`` and ``-n 3`` (uneven shards) on the scripts
in tests/mpi/, each batching many checks; skipped cleanly without mpi4py or mpiexec.

Every launch runs under a timeout in its own process group, so a hang fails the test instead of
the CI job.  The pytest process itself never initialises MPI.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastadapt.distributed import mpiexec_command, shard_bounds

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = 240            # generous: a cold numba cache compiles in every rank; a hang still fails

pytestmark = pytest.mark.mpi


def _mpi_available():
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'fastadapt[mpi]')"
    try:
        mpiexec_command(1, ["true"])
    except FileNotFoundError as e:
        return str(e)
    return None


def launch(n, script, *args, expect_ok=True, via_mpi4py=True):
    """Run tests/mpi/<script> on n ranks; return (returncode, stdout, stderr, seconds)."""
    reason = _mpi_available()
    if reason:
        pytest.skip(reason)
    prog = [sys.executable] + (["-m", "mpi4py"] if via_mpi4py else []) + [os.path.join(HERE, "mpi", script)
                                                                             if os.sep not in script else script]
    cmd, env = mpiexec_command(n, prog + list(args))
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec -n {n} {script} hung (killed after {TIMEOUT} s)\n{out}\n{err[-3000:]}")
    seconds = time.perf_counter() - t0
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"mpiexec -n {n} {script} failed (exit {proc.returncode})\n{out}\n{err[-5000:]}")
    return proc.returncode, out, err, seconds


def _passes(out):
    return [line[5:] for line in out.splitlines() if line.startswith("PASS ")]


# ---------------------------------------------------------------------------------- no MPI needed

def test_import_fastadapt_does_not_need_mpi():
    code = ("import sys, fastadapt, fastadapt.distributed; "
            "assert 'mpi4py' not in sys.modules and 'mpi4py.MPI' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=ROOT))


def test_shard_bounds():
    assert shard_bounds(10, 3).tolist() == [0, 4, 7, 10]
    assert shard_bounds(2, 3).tolist() == [0, 1, 2, 2]
    assert shard_bounds(9, 1).tolist() == [0, 9]
    for n in range(0, 30):
        for p in range(1, 6):
            b = shard_bounds(n, p)
            sizes = np.diff(b)
            assert b[0] == 0 and b[-1] == n and sizes.max() - sizes.min() <= 1


def test_mpiexec_command():
    if _mpi_available():
        pytest.skip(_mpi_available())
    cmd, env = mpiexec_command(3, ["python", "x.py"], env={})
    assert cmd[1:3] == ["-n", "3"] and cmd[-2:] == ["python", "x.py"]
    assert env["NUMBA_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 3))


# ---------------------------------------------------------------------------------- under mpiexec

# n = 1 runs first: one process fills numba's on-disk cache, the 2- and 3-rank runs then load from it.

@pytest.mark.parametrize("n", [1, 2, 3])
def test_sharded_optimizer(n):
    _, out, _, _ = launch(n, "dense.py")
    assert len(_passes(out)) == 11, out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sharded_table(n):
    _, out, _, _ = launch(n, "table.py")
    assert len(_passes(out)) == 8, out


def test_a_rank_failing_mid_step_aborts_instead_of_hanging():
    rc, out, err, seconds = launch(2, "fault.py", expect_ok=False, via_mpi4py=False)
    assert rc != 0
    assert "UNREACHABLE" not in out
    assert "fastadapt.distributed: rank 1 of 2 raised during the step's update" in err, err[-3000:]
    assert "injected kernel failure" in err and "aborting the communicator" in err
    assert seconds < 60


def test_distributed_recsys_example_matches_one_process():
    if importlib.util.find_spec("fastadapt.apps.recsys") is None:
        pytest.skip("fastadapt.apps.recsys (the recommender example) is not there")
    example = os.path.join(ROOT, "examples", "distributed_recsys.py")
    _, out, _, _ = launch(2, example, "--quick", "--epochs", "1", "--compare")
    assert "2 rank(s)" in out and "optimizer state" in out, out
    line = [x for x in out.splitlines() if "largest |difference|" in x][0]
    assert float(line.rsplit(" ", 1)[1]) < 1e-4, line          # float32 tables, rows summed in another order
