"""The CUDA backend (fastadapt/cuda.py) against the CPU kernels.

Three ways this file runs:

* on a machine with a working CUDA GPU: every test runs on the GPU;
* under ``NUMBA_ENABLE_CUDASIM=1`` (numba's CUDA simulator): every test runs on the
  simulator;
* otherwise (CI, no GPU): numba's choice between the real target and the simulator is
  made once per process, when numba is imported, and the other test files import it
  without the simulator; so here only the no-GPU behaviour is tested in-process and
  ``test_cuda_suite_under_simulator`` runs this same file in a subprocess with
  ``NUMBA_ENABLE_CUDASIM=1``.

Threads per block and the block cap are patched small, so the tiny inputs span
several blocks and every grid-stride loop wraps around.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastadapt as fa
from fastadapt import config
from fastadapt.algorithms import adagrad, rmsprop

from conftest import DTYPE_IDS, DTYPES, RTOL
from optimizers import DENSE, OPTIMIZERS


def _mode():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "simulator"
    try:
        from numba import cuda
        if cuda.is_available():
            return "gpu"
    except Exception:
        pass
    return "no-gpu"


MODE = _mode()
ON_DEVICE = MODE in ("simulator", "gpu")
SHAPE = (9, 7)          # 63 elements: 8 threads x 4 blocks = 32 per pass, so the loops wrap
N_STEPS = 8



def on_device(test):
    """Collect ``test`` only with a GPU or the simulator (else the simulator subprocess runs it)."""
    test.__test__ = ON_DEVICE
    return test


def off_device(test):
    """Collect ``test`` only in a process without a GPU and without the simulator."""
    test.__test__ = not ON_DEVICE
    return test


# --------------------------------------------------------------------------------------------------
# no GPU (the parent process of the simulator run)
# --------------------------------------------------------------------------------------------------

@off_device
def test_cuda_suite_under_simulator():
    """Runs this file under numba's CUDA simulator in a fresh process (see the module docstring)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.abspath(__file__)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout, proc.stdout[-3000:]


def test_import_fastadapt_needs_no_gpu():
    """`import fastadapt` imports no numba.cuda; `fastadapt.DeviceCSR` does, on first use."""
    code = ("import sys, fastadapt\n"
            "assert 'numba.cuda' not in sys.modules, 'numba.cuda imported'\n"
            "assert not hasattr(fastadapt, 'NoSuchThing')\n"
            "assert 'numba.cuda' not in sys.modules, 'numba.cuda imported by a missing attribute'\n"
            "from fastadapt.grads.device import DeviceCSR\n"
            "assert fastadapt.DeviceCSR is DeviceCSR\n"
            "from fastadapt import DeviceCSR as D\n"
            "assert D is DeviceCSR\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_missing_numba_cuda_says_what_to_install():
    """numba.cuda unimportable (e.g. a numba without its CUDA target): an ImportError with the fix."""
    code = ("import sys; sys.modules['numba.cuda'] = None\n"
            "import numpy as np, fastadapt as fa\n"
            "a = np.zeros(4, np.float32)\n"
            "class Dev:\n"
            "    shape, dtype = (4,), 'float32'\n"
            "    __cuda_array_interface__ = {'shape': (4,), 'typestr': '<f4', 'version': 2,\n"
            "                                'data': (a.ctypes.data, False), 'strides': None}\n"
            "try:\n"
            "    fa.Adam([Dev()])\n"
            "except ImportError as e:\n"
            "    print('ImportError:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ImportError: a CUDA array was passed but numba.cuda cannot be imported" in proc.stdout
    assert "pip install 'fastadapt[cuda]'" in proc.stdout


class _ForeignCudaArray:
    """An object that only exposes ``__cuda_array_interface__`` (like CuPy or a torch CUDA tensor).

    ``backing`` holds the memory: a numba device array on a GPU, a host array under the
    simulator (where device memory is host memory).  ``dtype`` is deliberately not a
    numpy dtype, as with torch; ``device`` may name another GPU.
    """

    def __init__(self, backing, device=0, readonly=False):
        self.backing = backing
        self.shape = tuple(backing.shape)
        self.dtype = f"fake.{np.dtype(backing.dtype).name}"
        self.device = type("Device", (), {"type": "cuda", "index": device})()
        if isinstance(backing, np.ndarray):
            ptr = backing.__array_interface__["data"][0]
            strides = None if backing.flags.c_contiguous else backing.strides
        else:
            cai = backing.__cuda_array_interface__
            ptr, strides = cai["data"][0], cai.get("strides")
        self._cai = {"shape": self.shape, "typestr": np.dtype(backing.dtype).str,
                     "data": (ptr, readonly), "strides": strides, "version": 2}

    @property
    def __cuda_array_interface__(self):
        return self._cai

    def is_contiguous(self):
        return self._cai["strides"] is None

    def reshape(self, *shape):
        return _ForeignCudaArray(self.backing.reshape(*shape), self.device.index)

    def __getitem__(self, idx):
        return _ForeignCudaArray(self.backing[idx], self.device.index)


@off_device
def test_cuda_array_without_gpu_says_what_to_install():
    w = _ForeignCudaArray(np.zeros(4, np.float32))
    with pytest.raises((RuntimeError, ImportError), match=r"pip install 'fastadapt\[cuda\]'"):
        fa.Adam([w])


# --------------------------------------------------------------------------------------------------
# helpers (GPU or simulator)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _small_grid(monkeypatch):
    monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(config, "CUDA_MAX_BLOCKS", 4)


def _cuda():
    from numba import cuda
    return cuda


def to_device(a):
    return _cuda().to_device(np.ascontiguousarray(a))


def host(a):
    if isinstance(a, _ForeignCudaArray):
        a = a.backing
    if isinstance(a, np.ndarray):
        return a.copy()
    return a.copy_to_host()


def backing(a):
    """Memory for a foreign CUDA array: device memory, or host memory under the simulator."""
    return np.array(a, copy=True) if MODE == "simulator" else to_device(a)


def foreign(a, **kw):
    """A foreign CUDA array holding a copy of host array ``a``."""
    return _ForeignCudaArray(backing(a), **kw)


def problem(dtype, seed, shape=SHAPE, n=N_STEPS):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal(shape)
    grads = [(bias + rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 1)).astype(dtype) for _ in range(n)]
    return p0, grads


def assert_close(actual, expected, dtype, what=""):
    """the spec's rtol per element, plus rtol * rms(expected) absolute: a real GPU contracts FMAs, whose
    rounding differs from the CPU's by an ulp of the operands, not of a result near zero."""
    expected = np.asarray(expected)
    rms = float(np.sqrt(np.mean(np.square(expected, dtype=np.float64)))) if expected.size else 0.0
    rtol = RTOL[np.dtype(dtype)]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * rms, err_msg=what)


def run_pair(cls, kw, dtype, seed=0, to_dev=to_device, n=N_STEPS):
    """The same steps on the CPU and on the device; returns both optimizers and parameters."""
    p0, grads = problem(dtype, seed, n=n)
    ph = p0.copy()
    pd = to_dev(p0)
    oh, od = cls([ph], **kw), cls([pd], **kw)
    for g in grads:
        oh.step([g])
        od.step([to_dev(g)])
    return oh, od, ph, pd


#: (class, options, dtype): every dense case's defaults, whole option grid and rich config in
#: float64; its grid corners (``small_grid``) in float32
DENSE_CASES = ([(c.cls, o, np.float64) for c in DENSE for o in [{}] + [dict(x) for x in c.options] + [dict(c.rich)]]
               + [(c.cls, o, np.float32) for c in DENSE for o in c.small_grid()])


def _case_id(case):
    cls, kw = case[:2]
    dtype = "".join(f"-{DTYPE_IDS[DTYPES.index(d)]}" for d in case[2:])
    return cls.__name__ + ("".join(f"-{k}={v}" for k, v in kw.items() if k != "lr") or "-default") + dtype


# --------------------------------------------------------------------------------------------------
# dense parity with the CPU kernels
# --------------------------------------------------------------------------------------------------

@on_device
@pytest.mark.parametrize("case", DENSE_CASES, ids=[_case_id(c) for c in DENSE_CASES])
def test_dense_matches_cpu(case):
    cls, kw, dtype = case
    oh, od, ph, pd = run_pair(cls, kw, dtype)
    assert_close(host(pd), ph, dtype, "parameter")
    sh, sd = oh.state_dict(), od.state_dict()
    assert sh["state"][0].keys() == sd["state"][0].keys()
    for name, value in sh["state"][0].items():
        if name == "step":
            assert sd["state"][0]["step"] == value == N_STEPS
        elif isinstance(value, float):                         # a carried scalar (NAdam's mu_product)
            assert sd["state"][0][name] == value
        else:
            assert isinstance(sd["state"][0][name], np.ndarray)
            assert sd["state"][0][name].dtype == dtype
            assert_close(sd["state"][0][name], value, dtype, name)


@on_device
def test_foreign_cuda_array_is_updated_in_place_zero_copy():
    """Objects exposing only __cuda_array_interface__ (CuPy, torch) with a non-numpy dtype attribute."""
    dtype = np.float32
    oh, od, ph, pd = run_pair(fa.Adam, dict(amsgrad=True, weight_decay=0.1), dtype, to_dev=foreign)
    assert_close(host(pd), ph, dtype)
    state = od.state_dict()
    assert state["state"][0]["exp_avg"].dtype == dtype
    # load_state_dict compares the saved dtype with the parameter's (a non-numpy dtype here)
    od2 = fa.Adam([foreign(np.zeros(SHAPE, dtype))], amsgrad=True, weight_decay=0.1)
    od2.load_state_dict(state)
    assert_close(od2.state_dict()["state"][0]["max_exp_avg_sq"], state["state"][0]["max_exp_avg_sq"], dtype)


@on_device
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_state_dict_round_trip_on_device(dtype):
    """state_dict is numpy; loading it back to the device continues exactly as if uninterrupted."""
    p0, grads = problem(dtype, 3)
    kw = dict(momentum=0.9, centered=True)
    ref = to_device(p0)
    opt = fa.RMSprop([ref], **kw)
    for g in grads:
        opt.step([to_device(g)])
    half = to_device(p0)
    first = fa.RMSprop([half], **kw)
    for g in grads[:4]:
        first.step([to_device(g)])
    saved = first.state_dict()
    assert all(isinstance(v, (np.ndarray, float)) for k, v in saved["state"][0].items() if k != "step")
    second = fa.RMSprop([half], **kw)
    second.load_state_dict(saved)
    for g in grads[4:]:
        second.step([to_device(g)])
    np.testing.assert_array_equal(host(half), host(ref))
    with pytest.raises(ValueError, match="dtype"):
        other = np.float32 if dtype == np.float64 else np.float64
        fa.RMSprop([to_device(p0.astype(other))], **kw).load_state_dict(saved)


@on_device
def test_param_groups_and_none_gradients():
    p0, grads = problem(np.float64, 5)
    a_h, b_h = p0.copy(), p0[:3].copy()
    a_d, b_d = to_device(p0), to_device(p0[:3])
    groups = lambda a, b: [{"params": [a]}, {"params": [b], "lr": 0.1, "amsgrad": True}]  # noqa: E731
    oh, od = fa.Adam(groups(a_h, b_h)), fa.Adam(groups(a_d, b_d))
    for t, g in enumerate(grads):
        gb = None if t % 3 == 1 else g[:3]
        oh.step([g, gb])
        od.step([to_device(g), None if gb is None else to_device(gb)])
    assert_close(host(a_d), a_h, np.float64)
    assert_close(host(b_d), b_h, np.float64)
    assert od.state_dict()["state"][1]["step"] == oh.state_dict()["state"][1]["step"] == 5


@on_device
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_skip_and_raise(bad):
    p0, grads = problem(np.float32, 7, n=3)
    g_bad = grads[1].copy()
    g_bad[4, 5] = bad                      # an element the second pass of the grid-stride loop reads
    pd = to_device(p0)
    opt = fa.Adam([pd], nonfinite="skip")
    assert opt.step([to_device(grads[0])]) is True
    before = host(pd)
    assert opt.step([to_device(g_bad)]) is False
    np.testing.assert_array_equal(host(pd), before)
    assert opt.skipped_steps == 1 and opt.state_dict()["state"][0]["step"] == 1
    assert opt.step([to_device(grads[2])]) is True
    opt = fa.Adagrad([to_device(p0)], nonfinite="raise")
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step([to_device(g_bad)])
    assert opt.state_dict()["state"][0]["step"] == 0
    np.testing.assert_array_equal(opt.state_dict()["state"][0]["sum"], np.zeros_like(p0))


@on_device
def test_propagate_matches_cpu_with_nonfinite():
    p0, grads = problem(np.float64, 8, n=2)
    grads[0][0, 0] = np.nan
    grads[1][1, 1] = np.inf
    ph, pd = p0.copy(), to_device(p0)
    oh, od = fa.Adam([ph], amsgrad=True), fa.Adam([pd], amsgrad=True)
    with np.errstate(invalid="ignore"):
        for g in grads:
            oh.step([g])
            od.step([to_device(g)])
    np.testing.assert_array_equal(np.isnan(host(pd)), np.isnan(ph))
    finite = np.isfinite(ph)
    assert_close(host(pd)[finite], ph[finite], np.float64)


@on_device
def test_functional_layer_on_device():
    from fastadapt import functional as F
    p0, grads = problem(np.float64, 9, n=2)
    ph, mh, vh = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    pd, md, vd = to_device(p0), to_device(mh), to_device(vh)
    for t, g in enumerate(grads, 1):
        F.adam(ph, g, mh, vh, step=t, lr=0.1)
        F.adam(pd, to_device(g), md, vd, step=t, lr=0.1)
    assert_close(host(pd), ph, np.float64)
    assert_close(host(vd), vh, np.float64)


@on_device
def test_functional_layer_with_foreign_arrays_and_one_cached_dummy(monkeypatch):
    """Arrays whose dtype is not a numpy dtype (torch CUDA tensors, here a test double), numba
    buffers next to a foreign parameter; unused rule slots share one cached buffer per device and
    dtype (no device allocation per call)."""
    from fastadapt import backends, functional as F
    from fastadapt.backends import cuda as fcuda
    monkeypatch.setattr(backends, "_UNUSED", {})
    made = []
    full_like = fcuda.CUDABackend.full_like
    monkeypatch.setattr(fcuda.CUDABackend, "full_like", staticmethod(lambda p, v: made.append(1) or full_like(p, v)))
    dtype = np.float32
    p0, grads = problem(dtype, 10, n=3)
    ph, mh, vh, sh = p0.copy(), np.zeros_like(p0), np.zeros_like(p0), np.zeros_like(p0)
    pd, md, vd, sd = foreign(p0), to_device(mh), foreign(vh), to_device(sh)
    q_h, q_d = p0.copy(), foreign(p0)
    for t, g in enumerate(grads, 1):
        F.adam(ph, g, mh, vh, step=t, lr=0.1, weight_decay=0.1)             # s3 unused
        F.adam(pd, foreign(g), md, vd, step=t, lr=0.1, weight_decay=0.1)
        F.rmsprop(q_h, g, sh, step=t, alpha=0.9)                            # s2, s3 unused
        F.rmsprop(q_d, to_device(g), sd, step=t, alpha=0.9)
    assert_close(host(pd), ph, dtype, "adam param")
    assert_close(host(vd), vh, dtype, "exp_avg_sq")
    assert_close(host(q_d), q_h, dtype, "rmsprop param")
    assert len(made) == 1                    # one device dummy for 6 calls with unused slots
    assert sorted(backends._UNUSED) == [("cpu", "<f4"), ("cuda:0", "<f4")]
    with pytest.raises(ValueError, match=r"exp_avg has shape \(9, 7\) and dtype float64; it must match "
                                         r"param \(\(9, 7\), float32\)"):
        F.adam(pd, foreign(grads[0]), to_device(np.zeros(SHAPE)), vd, step=4)
    with pytest.raises(TypeError, match="exp_avg must be a CUDA array"):
        F.adam(pd, foreign(grads[0]), np.zeros(SHAPE, dtype), vd, step=4)
    if MODE == "simulator":                  # a buffer naming another GPU (only a test double can)
        with pytest.raises(ValueError, match="exp_avg is on GPU 1 but its parameter is on GPU 0"):
            F.adam(pd, foreign(grads[0]), foreign(mh, device=1), vd, step=4)
    assert_close(host(pd), ph, dtype, "unchanged by the refused calls")


@on_device
def test_kernels_are_shared_and_rules_single_sourced():
    from fastadapt.backends import cuda as fcuda
    oh, od, ph, pd = run_pair(fa.Adagrad, {}, np.float64, n=2)
    ks = fcuda.kernels(adagrad.rule)
    assert fcuda.kernels(adagrad.rule) is ks
    od.step([to_device(np.ones(SHAPE))])
    assert fcuda.kernels(adagrad.rule) is ks
    if MODE == "gpu":                        # a second step compiles nothing new
        n = len(ks.dense.overloads)
        od.step([to_device(np.ones(SHAPE))])
        assert len(ks.dense.overloads) == n


@on_device
def test_launch_geometry_follows_config():
    from fastadapt.backends import cuda as fcuda
    assert fcuda.launch_dims(63) == (4, 8)       # capped: the loop strides over 32 threads
    assert fcuda.launch_dims(9) == (2, 8)
    assert fcuda.launch_dims(0) == (1, 8)


# --------------------------------------------------------------------------------------------------
# errors: raised before anything is written
# --------------------------------------------------------------------------------------------------

@on_device
def test_mixing_host_and_device_parameters_is_refused():
    with pytest.raises(ValueError, match=r"same device.*\['cpu', 'cuda:0'\]"):
        fa.Adam([np.zeros(3), to_device(np.zeros(3))])
    opt = fa.Adam([to_device(np.zeros(3))])
    with pytest.raises(ValueError, match="same device"):
        opt.add_param_group({"params": [np.zeros(3)]})


@on_device
def test_parameters_on_two_devices_are_refused():
    a = foreign(np.zeros(3), device=0)
    b = foreign(np.zeros(3), device=1)      # on a GPU the object's device attribute is believed
    with pytest.raises(ValueError, match=r"same device.*cuda:0.*cuda:1"):
        fa.Adam([a, b])


@on_device
def test_gradient_on_the_wrong_side_or_device():
    p0 = np.zeros(SHAPE)
    pd = to_device(p0)
    opt = fa.Adam([pd])
    with pytest.raises(TypeError, match="host array but its parameter lives on the cuda backend"):
        opt.step([np.ones(SHAPE)])
    with pytest.raises(TypeError, match="device array but its parameter lives on the cpu backend"):
        fa.Adam([p0.copy()]).step([to_device(np.ones(SHAPE))])
    if MODE == "simulator":                  # a gradient naming another GPU (only a test double can)
        with pytest.raises(ValueError, match="gradient 0 is on GPU 1 but its parameter is on GPU 0"):
            opt.step([_ForeignCudaArray(np.ones(SHAPE), device=1)])
    np.testing.assert_array_equal(host(pd), p0)
    assert opt.state_dict()["state"] == {}


@on_device
def test_bad_device_parameters_and_gradients():
    with pytest.raises(TypeError, match="float32 or float64"):
        fa.Adam([to_device(np.zeros(4, np.float16))])
    with pytest.raises(TypeError, match="float32 or float64"):
        fa.Adam([to_device(np.zeros(4, np.int64))])
    with pytest.raises(ValueError, match="C-contiguous"):
        fa.Adam([_ForeignCudaArray(backing(np.zeros((4, 4)))[:, ::2])])
    with pytest.raises(ValueError, match="read-only"):
        fa.Adam([foreign(np.zeros(4), readonly=True)])
    pd = to_device(np.zeros(SHAPE))
    opt = fa.Adam([pd])
    with pytest.raises(ValueError, match="shape"):
        opt.step([to_device(np.zeros((7, 9)))])
    with pytest.raises(TypeError, match="dtype"):
        opt.step([to_device(np.zeros(SHAPE, np.float32))])
    with pytest.raises(ValueError, match="shares memory"):
        opt.step([pd])
    with pytest.raises(ValueError, match="share memory"):
        fa.Adam([pd, pd])
    with pytest.raises(TypeError, match=r"Adam\(\[w\]\)"):
        fa.Adam(pd)
    with pytest.raises(TypeError, match=r"opt.step\(\[g\]\)"):
        opt.step(to_device(np.zeros(SHAPE)))
    with pytest.raises(TypeError, match="dense"):
        fa.SparseAdam([pd]).step([to_device(np.zeros(SHAPE))])
    assert opt.state_dict()["state"] == {}


@on_device
def test_unusable_cuda_stack_is_reported(monkeypatch):
    from fastadapt.backends import cuda as fcuda
    monkeypatch.setattr(fcuda, "_BACKEND", None)
    monkeypatch.setattr(fcuda.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"no usable CUDA GPU.*pip install 'fastadapt\[cuda\]'"):
        fa.Adam([to_device(np.zeros(3))])


# --------------------------------------------------------------------------------------------------
# sparse gradients on the device
# --------------------------------------------------------------------------------------------------

TABLE = (13, 5)         # 65 elements; rows of 5 so that row loops and element loops both wrap


def sparse_grads(seed, n=6, shape=TABLE):
    """scipy CSR gradients with duplicates, explicit zeros, empty steps; the last 2 rows (of a
    one-row shape: the last 2 columns) never touched."""
    import scipy.sparse as sp
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        k = 0 if t == 3 else int(rng.integers(1, 25))
        r = rng.integers(0, max(1, shape[0] - 2), k)
        c = rng.integers(0, shape[1] - 2 if shape[0] == 1 else shape[1], k)
        v = rng.standard_normal(k) * 10.0 ** rng.uniform(-1, 1)
        if k > 3:
            r[-1], c[-1] = r[0], c[0]          # a duplicate
            v[1] = 0.0                         # an explicit zero
        # built from raw arrays so the duplicates stay stored (not summed by the constructor)
        order = np.lexsort((c, r))
        indptr = np.zeros(shape[0] + 1, np.int64)
        np.cumsum(np.bincount(r, minlength=shape[0]), out=indptr[1:])
        out.append(sp.csr_matrix((v[order], c[order], indptr), shape=shape))
    return out


def device_csr(g, dtype, canonical):
    """The device CSR of scipy CSR ``g``: canonical (sorted, summed) or as stored (duplicates)."""
    g = g.copy()
    if canonical:
        g.sum_duplicates()
    return fa.DeviceCSR((foreign(g.data.astype(dtype)), foreign(g.indices), foreign(g.indptr)), g.shape)


def device_rows(g, dtype, canonical, to_dev=to_device):
    """A RowGrad of device arrays (numba's by default): unique sorted rows, or one row id per
    stored entry (unsorted)."""
    if canonical:
        rows = np.unique(np.repeat(np.arange(g.shape[0]), np.diff(g.indptr)))
        values = g.toarray()[rows]
    else:
        rows = np.repeat(np.arange(g.shape[0]), np.diff(g.indptr))[::-1]
        values = np.zeros((rows.size, g.shape[1]))
        values[np.arange(rows.size), g.indices[::-1]] = g.data[::-1]
    rows_d, values_d = to_dev(rows.astype(np.int64)), to_dev(values.astype(dtype))
    rg = fa.RowGrad(rows_d, values_d)
    assert rg.rows is rows_d and rg.values is values_d           # device arrays kept as they are
    return rg


def host_rows(g):
    rows = np.repeat(np.arange(g.shape[0]), np.diff(g.indptr))
    values = np.zeros((rows.size, g.shape[1]))
    values[np.arange(rows.size), g.indices] = g.data
    return fa.RowGrad(rows, values)


#: every case: lazy with its rich config, then exact once per distinct plan of the algorithm
#: (lazy == exact, fused pass, closed-form decay with and without the centered slot)
SPARSE_CASES = [(c.cls, dict(o, **c.mode_options(m))) for c in OPTIMIZERS for m, o in c.exact_groups()
                if (m, o) != ("lazy", {})]


@on_device
@pytest.mark.parametrize("form", ["csr", "csr-dups", "rows", "rows-unsorted"])
@pytest.mark.parametrize("case", SPARSE_CASES, ids=[_case_id(c) for c in SPARSE_CASES])
def test_sparse_matches_cpu(case, form):
    cls, kw = case
    dtype = np.float64 if form in ("csr", "rows-unsorted") else np.float32
    p0 = np.random.default_rng(1).standard_normal(TABLE).astype(dtype)
    ph, pd = p0.copy(), to_device(p0)
    oh, od = cls([ph], **kw), cls([pd], **kw)
    for g in sparse_grads(2):
        if form.startswith("csr"):
            oh.step([g.astype(dtype)])
            od.step([device_csr(g, dtype, canonical=form == "csr")])
        else:                   # numba device arrays (sorted), foreign CUDA arrays (unsorted)
            oh.step([host_rows(g)])
            od.step([device_rows(g, dtype, canonical=form == "rows",
                                 to_dev=to_device if form == "rows" else foreign)])
    sh, sd = oh.state_dict(), od.state_dict()
    assert_close(host(pd), ph, dtype, "parameter")
    if kw.get("sparse_mode", "lazy") == "lazy":
        np.testing.assert_array_equal(host(pd)[-2:], p0[-2:], "untouched rows")
    for name, value in sh["state"][0].items():
        if name == "step":
            assert sd["state"][0][name] == value == 6
        else:
            assert_close(sd["state"][0][name], value, dtype, name)


@on_device
def test_sparse_one_dimensional_parameter_and_mixed_steps():
    """A (1, n) CSR of a 1-D parameter; exact-decay steps interleaved with dense steps."""
    rng = np.random.default_rng(4)
    p0 = rng.standard_normal(TABLE[0] * TABLE[1])
    ph, pd = p0.copy(), to_device(p0)
    kw = dict(sparse_mode="exact", alpha=0.8)
    oh, od = fa.RMSprop([ph], **kw), fa.RMSprop([pd], **kw)
    for t, g in enumerate(sparse_grads(5, shape=(1, p0.size))):
        if t == 2:
            d = rng.standard_normal(p0.size)
            oh.step([d])
            od.step([to_device(d)])
        oh.step([g])
        od.step([device_csr(g, np.float64, canonical=t % 2 == 0)])
    assert_close(host(pd), ph, np.float64)
    assert_close(od.state_dict()["state"][0]["square_avg"], oh.state_dict()["state"][0]["square_avg"],
                 np.float64)


@on_device
def test_sparse_values_of_another_dtype_are_cast():
    g = sparse_grads(6, n=1)[0]
    p0 = np.zeros(TABLE, np.float32)
    ph, pd = p0.copy(), to_device(p0)
    oh, od = fa.SparseAdam([ph]), fa.SparseAdam([pd])
    oh.step([g])                                    # float64 data, float32 parameter
    od.step([device_csr(g, np.float64, canonical=True)])
    assert_close(host(pd), ph, np.float32)


@on_device
def test_sparse_nonfinite_skip():
    g = sparse_grads(7, n=1)[0]
    g.data[2] = np.nan
    pd = to_device(np.zeros(TABLE))
    opt = fa.SparseAdam([pd], nonfinite="skip")
    assert opt.step([device_csr(g, np.float64, canonical=True)]) is False
    assert opt.step([device_rows(g, np.float64, canonical=True)]) is False
    np.testing.assert_array_equal(host(pd), np.zeros(TABLE))
    assert opt.state_dict()["state"] == {}


@on_device
def test_sparse_errors_before_anything_is_written():
    import scipy.sparse as sp
    p0 = np.random.default_rng(0).standard_normal(TABLE)
    pd = to_device(p0)
    opt = fa.Adam([pd], sparse_mode="exact")
    indptr = np.array([0, 2, 3] + [3] * (TABLE[0] - 2))

    def csr(data, indices, ptr, shape=TABLE):
        return fa.DeviceCSR((foreign(np.asarray(data, float)), foreign(np.asarray(indices)), foreign(ptr)),
                            shape)

    with pytest.raises(IndexError, match="column index 5 .*out of range"):
        opt.step([csr([1, 2, 3], [0, 5, 1], indptr)])
    with pytest.raises(IndexError, match="column index -1"):
        opt.step([csr([1, 2, 3], [0, 1, -1], indptr)])
    bad_ptr = indptr.copy()
    bad_ptr[1] = 4
    with pytest.raises(ValueError, match="indptr"):
        opt.step([csr([1, 2, 3], [0, 1, 2], bad_ptr)])
    with pytest.raises(ValueError, match="shape"):
        opt.step([csr([1, 2, 3], [0, 1, 2], indptr[:-1], shape=(TABLE[0] - 1, TABLE[1]))])
    with pytest.raises(IndexError, match="row id 13"):
        opt.step([fa.RowGrad(foreign(np.array([2, 13])), foreign(np.ones((2, TABLE[1]))))])
    with pytest.raises(IndexError, match="row id -1"):
        opt.step([fa.RowGrad(foreign(np.array([-1, 2])), foreign(np.ones((2, TABLE[1]))))])
    with pytest.raises(ValueError, match="RowGrad values"):
        opt.step([fa.RowGrad(foreign(np.array([1, 2])), foreign(np.ones((2, TABLE[1] + 1))))])
    with pytest.raises(TypeError, match="integer"):
        opt.step([fa.RowGrad(foreign(np.array([1.0, 2.0])), foreign(np.ones((2, TABLE[1]))))])
    with pytest.raises(TypeError, match="host scipy sparse matrix"):
        opt.step([sp.csr_matrix(np.eye(*TABLE))])
    with pytest.raises(TypeError, match="not a device array"):
        opt.step([fa.RowGrad(np.array([1, 2]), np.ones((2, TABLE[1])))])
    with pytest.raises(TypeError, match="RowGrad holds device arrays but its parameter is a host array"):
        fa.SparseAdam([p0.copy()]).step([fa.RowGrad(to_device(np.array([1, 2])), to_device(np.ones((2, 5))))])
    with pytest.raises(TypeError, match="format 'coo'"):
        opt.step([type("coo_matrix", (), {"format": "coo", "shape": TABLE,
                                          "__module__": "cupyx.scipy.sparse._coo"})()])
    np.testing.assert_array_equal(host(pd), p0)
    assert opt.state_dict()["state"] == {}


@on_device
def test_sparse_fast_path_is_zero_copy():
    """Canonical device input reaches the loops as views of the caller's arrays."""
    from fastadapt.backends import cuda as fcuda
    from fastadapt.grads.device import prepare_device_sparse_grad
    from fastadapt.grads.sparse import CSRGrad, RowsGrad
    pd = to_device(np.zeros(TABLE))
    g = sparse_grads(9, n=1)[0]
    prepared = prepare_device_sparse_grad(device_csr(g, np.float64, canonical=True), pd, fcuda.backend(), "g")
    assert isinstance(prepared, CSRGrad) and prepared.rows is None    # full indptr, no copy
    rg = device_rows(g, np.float64, canonical=True)
    prepared = prepare_device_sparse_grad(rg, pd, fcuda.backend(), "g")
    assert isinstance(prepared, RowsGrad)
    assert fcuda.backend().memory_span(prepared.vals)[0] == fcuda.backend().memory_span(rg.values)[0]


@on_device
@pytest.mark.parametrize("canonical", [True, False], ids=["zero-copy", "canonicalised"])
def test_exact_decay_csr_threads_follow_rows_not_elements(monkeypatch, canonical):
    """Exact RMSprop with a device CSR of a wide table: rows wider than the 32 lanes of a row
    group; at most 32 threads per row of indptr (every row when zero-copy, the touched rows when
    canonicalised), never one per element of the table."""
    from fastadapt.backends import cuda_sparse
    shape = (6, 70)
    launches = []
    launch = cuda_sparse._launch
    monkeypatch.setattr(cuda_sparse, "_launch",
                        lambda kernel, n, *a: launches.append((kernel, n)) or launch(kernel, n, *a))
    rng = np.random.default_rng(11)
    p0 = rng.standard_normal(shape)
    ph, pd = p0.copy(), to_device(p0)
    kw = dict(sparse_mode="exact", centered=True, alpha=0.6)
    oh, od = fa.RMSprop([ph], **kw), fa.RMSprop([pd], **kw)
    grads = sparse_grads(12, n=4, shape=shape)
    for g in grads:
        oh.step([g])
        od.step([device_csr(g, np.float64, canonical=canonical)])
    assert_close(host(pd), ph, np.float64, "parameter")
    sh, sd = oh.state_dict()["state"][0], od.state_dict()["state"][0]
    for name in ("square_avg", "grad_avg"):
        assert_close(sd[name], sh[name], np.float64, name)
    assert cuda_sparse.row_lanes(shape[1]) == 32 and cuda_sparse.row_lanes(5) == 8
    assert cuda_sparse.row_lanes(1) == 1
    decay = [n for kernel, n in launches if kernel is cuda_sparse._kernels(rmsprop.rule, np.float64).csr_decay]
    touched = [int(np.count_nonzero(np.diff(g.indptr))) for g in grads]
    expected = [32 * (shape[0] if canonical else k) for k in touched if k]
    assert decay == expected


@on_device
def test_exact_decay_stamps_are_made_in_the_parameters_device_context(monkeypatch):
    """The per-row stamps are allocated while the parameter's device is current (a recording
    stand-in for the device context: the simulator has one device)."""
    import contextlib
    from fastadapt.backends import cuda as fcuda, cuda_sparse
    current = []

    @contextlib.contextmanager
    def context_of(devary):
        current.append(fcuda.CUDABackend.memory_span(devary)[0])
        try:
            yield
        finally:
            current.pop()

    made_in = []
    new_stamp = cuda_sparse.CUDASparseKernels.new_stamp
    monkeypatch.setattr(fcuda, "_context_of", context_of)
    monkeypatch.setattr(cuda_sparse.CUDASparseKernels, "new_stamp",
                        staticmethod(lambda n, v: made_in.append(list(current)) or new_stamp(n, v)))
    pd = to_device(np.zeros(TABLE))
    opt = fa.RMSprop([pd], sparse_mode="exact")
    for g in sparse_grads(13, n=2):
        opt.step([device_rows(g, np.float64, canonical=True)])
    assert made_in == [[fcuda.CUDABackend.memory_span(pd)[0]]]
