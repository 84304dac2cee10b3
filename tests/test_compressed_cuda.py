"""Compressed optimizer state (issue #13) on CUDA parameters against the CPU codec loops.

Runs under ``NUMBA_ENABLE_CUDASIM=1`` (numba's CUDA simulator) or on a GPU; skipped otherwise
(tests/test_cuda.py runs the simulator in a subprocess for the CUDA suite; this file is run
with the variable set).  Sizes are small: the simulator runs every thread in Python.

Under the simulator the rules run in numpy float32 scalars, rounding like the CPU's compiled
loops, so codes, absmax and parameters are compared bit for bit.  On a GPU the rules may be
contracted into FMAs, so parameters are compared with tests/test_cuda.py's tolerance and the
state by its decoded values; the codec alone (an identity rule) is bit-exact on both.
"""

import os

import numpy as np
import pytest

import fastadapt as fa
from fastadapt import config
from fastadapt.backends.codec import bf16_encode, q8_encode
from fastadapt.backends.compressed import CompressedBuffer

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _usable():
    if SIMULATOR:
        return True
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _usable(), reason="needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1")

#: bit-exact parameters and codes (else the tolerance of tests/test_cuda.py)
EXACT = SIMULATOR
SHAPE = (5, 40)          # int8: rows of 40 are blocks of 40; 8 threads x 4 blocks make every loop wrap
N_STEPS = 3


@pytest.fixture(autouse=True)
def _small(monkeypatch):
    monkeypatch.setattr(config, "STATE_COMPRESS_MIN", 0)
    monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(config, "CUDA_MAX_BLOCKS", 4)


def dev(a):
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(a))


def host(a):
    return a.copy_to_host()


def backend():
    from fastadapt.backends import cuda as fcuda
    return fcuda.backend()


def problem(seed=0, shape=SHAPE, n=N_STEPS):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(shape).astype(np.float32)
    grads = [(rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 1)).astype(np.float32) for _ in range(n)]
    return p0, grads


def compressed_entries(sd):
    return {name: v for name, v in sd["state"][0].items() if isinstance(v, dict)}


def assert_entries_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


# --------------------------------------------------------------------------------------------------
# the codec alone: an identity rule stores the gradient as state
# --------------------------------------------------------------------------------------------------

def _store_rule(p, s1, s2, s3, i, g, k):
    s1[i] = g
    s2[i] = -g                  # (a sign flip, NaN included, on every target)


def special_values(shape, seed=1):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-30, 30, shape)).astype(np.float32)
    flat = x.reshape(-1)
    flat[:6] = [np.nan, np.inf, -np.inf, 3.3961e38, -3.3895e38, 1e-45]   # (one int8 block: all NaN)
    flat[40:80] = 0.0                                                    # a block of zeros
    flat[80:120] = rng.standard_normal(40).astype(np.float32)            # an ordinary block
    flat[125] = -0.0
    return x


@pytest.mark.parametrize("nearest", [False, True], ids=["stochastic", "nearest"])
@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_codec_matches_cpu_codec_bit_for_bit(kind, nearest):
    """The device encode of given float32 values equals codec.bf16_encode / q8_encode (NaN, inf,
    overflow, subnormals, zero blocks, negative values under the unsigned map)."""
    x = special_values(SHAPE)
    pd, gd = dev(np.zeros(SHAPE, np.float32)), dev(x)
    b = backend()
    seed, step = 3, 7
    s1 = b.compressed_full(pd, 0.0, kind, True, seed)
    s2 = b.compressed_full(pd, 0.0, kind, False, seed)
    b.codec_step(_store_rule, b.flat(pd), b.flat(gd), (s1, s2, None), (np.float32(0.0),), step, nearest)
    neg = -x
    if kind == "bfloat16":
        np.testing.assert_array_equal(host(s1.codes), bf16_encode(x, seed, step, nearest))
        np.testing.assert_array_equal(host(s2.codes), bf16_encode(neg, seed, step, nearest))
    else:
        for buf, values, signed in ((s1, x, True), (s2, neg, False)):
            codes, absmax = q8_encode(values.reshape(-1), signed=signed, block=buf.block)
            np.testing.assert_array_equal(host(buf.codes).reshape(-1), codes)
            np.testing.assert_array_equal(host(buf.absmax), absmax)
        assert np.isnan(host(s1.absmax)[0]) and host(s1.absmax)[1] == 0.0
    np.testing.assert_array_equal(host(pd), 0.0)        # (the rule leaves p alone)


def test_codec_int8_blocks_of_256_span_rows():
    """1-D parameters: blocks of 256 and a short last block; more blocks than the grid."""
    x = np.random.default_rng(2).standard_normal(1100).astype(np.float32)
    pd, gd = dev(np.zeros(1100, np.float32)), dev(x)
    b = backend()
    s1 = b.compressed_full(pd, 0.0, "int8", True, 0)
    b.codec_step(_store_rule, pd, gd, (s1, None, None), (np.float32(0.0),), 1, True)
    codes, absmax = q8_encode(x, signed=True, block=256)
    assert s1.block == 256 and host(s1.absmax).shape == (5,)
    np.testing.assert_array_equal(host(s1.codes), codes)
    np.testing.assert_array_equal(host(s1.absmax), absmax)


# --------------------------------------------------------------------------------------------------
# optimizers: CUDA against the CPU codec loops
# --------------------------------------------------------------------------------------------------

CASES = [
    (fa.Adam, dict(amsgrad=True, weight_decay=0.1)),
    (fa.AdamW, dict(weight_decay=0.01)),
    (fa.Adagrad, dict(lr=0.1)),
    (fa.RMSprop, dict(centered=True, momentum=0.9)),
    (fa.SGD, dict(lr=0.05, momentum=0.9)),
]


def run_pair(cls, kw, seed=0):
    p0, grads = problem(seed)
    ph, pd = p0.copy(), dev(p0)
    oh, od = cls([ph], **kw), cls([pd], **kw)
    for g in grads:
        oh.step([g])
        od.step([dev(g)])
    return oh, od, ph, pd


def assert_pair(oh, od, ph, pd):
    sh, sd = oh.state_dict(), od.state_dict()
    eh, ed = compressed_entries(sh), compressed_entries(sd)
    assert eh and eh.keys() == ed.keys()
    if EXACT:
        np.testing.assert_array_equal(host(pd), ph)
        for name in eh:
            assert_entries_equal(eh[name], ed[name])
    else:                                             # pragma: no cover - GPU: FMA contraction
        np.testing.assert_allclose(host(pd), ph, rtol=1e-5, atol=1e-5 * float(np.sqrt(np.mean(ph ** 2))))
        fh, fd = oh.state_dict("float32"), od.state_dict("float32")
        for name in eh:
            ref = fh["state"][0][name]
            np.testing.assert_allclose(fd["state"][0][name], ref, rtol=0.02, atol=0.02 * float(np.abs(ref).max()))


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
@pytest.mark.parametrize("case", CASES, ids=[c[0].__name__ for c in CASES])
def test_optimizer_matches_cpu(case, kind, rounding):
    cls, kw = case
    oh, od, ph, pd = run_pair(cls, dict(kw, state_dtype=kind, state_rounding=rounding))
    from fastadapt.backends.cuda_compressed import DeviceCompressedBuffer
    bufs = [v for v in od.state[0].values() if getattr(type(v), "compressed_state", False)]
    assert bufs and all(isinstance(v, DeviceCompressedBuffer) for v in bufs)
    assert_pair(oh, od, ph, pd)


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_state_dict_moves_between_cpu_and_cuda_bit_exactly(kind):
    """CUDA state_dict -> CPU optimizer and CPU state_dict -> CUDA optimizer: same codes, and the
    runs continue as the uninterrupted ones."""
    kw = dict(amsgrad=True, state_dtype=kind)
    p0, grads = problem(4, n=4)
    ref = p0.copy()
    oref = fa.Adam([ref], **kw)
    for g in grads:
        oref.step([g])
    # two steps on CUDA, two on the CPU
    pd = dev(p0)
    od = fa.Adam([pd], **kw)
    for g in grads[:2]:
        od.step([dev(g)])
    saved = od.state_dict()
    ph = host(pd)
    oh = fa.Adam([ph], **kw)
    oh.load_state_dict(saved)
    assert_entries_equal(compressed_entries(oh.state_dict())["exp_avg"], compressed_entries(saved)["exp_avg"])
    for g in grads[2:]:
        oh.step([g])
    # two steps on the CPU, two on CUDA
    ph2 = p0.copy()
    oh2 = fa.Adam([ph2], **kw)
    for g in grads[:2]:
        oh2.step([g])
    pd2 = dev(ph2)
    od2 = fa.Adam([pd2], **kw)
    od2.load_state_dict(oh2.state_dict())
    from fastadapt.backends.cuda_compressed import DeviceCompressedBuffer
    assert isinstance(od2.state[0]["exp_avg"], DeviceCompressedBuffer)
    for name, entry in compressed_entries(oh2.state_dict()).items():
        assert_entries_equal(compressed_entries(od2.state_dict())[name], entry)
    for g in grads[2:]:
        od2.step([dev(g)])
    if EXACT:
        np.testing.assert_array_equal(ph, ref)
        np.testing.assert_array_equal(host(pd2), ref)
        for name, entry in compressed_entries(oref.state_dict()).items():
            assert_entries_equal(compressed_entries(oh.state_dict())[name], entry)
            assert_entries_equal(compressed_entries(od2.state_dict())[name], entry)


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_buffer_interface_and_nbytes(kind):
    pd = dev(np.zeros(SHAPE, np.float32))
    b = backend()
    values = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    buf = b.compressed_from(pd, values, kind, True, 2)
    ref = CompressedBuffer.encode(values, kind, True, 2)
    assert buf.compressed_state and buf.kind == kind and buf.shape == SHAPE and buf.size == values.size
    assert buf.dtype == np.float32 and buf.seed == 2 and buf.block == ref.block and buf.signed == ref.signed
    assert buf.nbytes == ref.nbytes == (values.size * 2 if kind == "bfloat16" else values.size + 5 * 4)
    np.testing.assert_array_equal(buf.decode(), ref.decode())
    np.testing.assert_array_equal(np.asarray(buf), ref.decode())
    assert_entries_equal(buf.to_dict(), ref.to_dict())
    twin = buf.copy()
    assert twin.codes is not buf.codes and kind in repr(twin)
    assert_entries_equal(twin.to_dict(), ref.to_dict())
    full = b.compressed_full(pd, 1.0, kind, False, 0)
    np.testing.assert_array_equal(full.decode(), CompressedBuffer.full(SHAPE, 1.0, kind, False).decode())


def test_state_dtype_changes_keep_values_on_device():
    """int8 -> bfloat16 -> None (float32 device arrays) between steps, as on the CPU."""
    p0, grads = problem(6, n=3)
    ph, pd = p0.copy(), dev(p0)
    oh, od = fa.Adam([ph], state_dtype="int8"), fa.Adam([pd], state_dtype="int8")
    for j, kind in enumerate(["int8", "bfloat16", None]):
        for o in (oh, od):
            o.param_groups[0]["state_dtype"] = kind
        oh.step([grads[j]])
        od.step([dev(grads[j])])
    assert not getattr(type(od.state[0]["exp_avg"]), "compressed_state", False)
    if EXACT:
        np.testing.assert_array_equal(host(pd), ph)
        np.testing.assert_array_equal(od.state_dict()["state"][0]["exp_avg"], oh.state_dict()["state"][0]["exp_avg"])


# --------------------------------------------------------------------------------------------------
# sparse gradients (lazy mode) against the CPU codec row loops
# --------------------------------------------------------------------------------------------------

SPARSE_CASES = [
    (fa.Adam, dict(weight_decay=0.1)),
    (fa.Adagrad, dict(lr=0.1)),
    (fa.RMSprop, dict(centered=True, momentum=0.9)),
]
SPARSE_SHAPE = (12, 32)          # int8: rows of 32 are blocks of 32


def _sparse_grads(shape, form, seed=3, n=N_STEPS):
    """``n`` (host gradient, device gradient) pairs touching a few rows (CSR: a few entries of a
    row, row 0 of the touched ones whole)."""
    import scipy.sparse as sps
    rng = np.random.default_rng(seed)
    nrows, ncols = shape[0], int(np.prod(shape[1:]))
    out = []
    for s in range(n):
        rows = np.sort(rng.choice(nrows, size=max(1, nrows // 3), replace=False)).astype(np.int64)
        if form == "rows":
            vals = (rng.standard_normal((rows.size, ncols)) * 10.0 ** rng.uniform(-2, 1)).astype(np.float32)
            out.append((fa.RowGrad(rows, vals), fa.RowGrad(dev(rows), dev(vals))))
            continue
        dense = np.zeros((nrows, ncols), np.float32)
        for t, r in enumerate(rows):
            cols = np.arange(ncols) if t == 0 else rng.choice(ncols, size=max(1, ncols // 5), replace=False)
            dense[r, cols] = rng.standard_normal(cols.size).astype(np.float32)
        m = sps.csr_matrix(dense)
        m.sort_indices()
        data = m.data if form == "csr" else m.data.astype(np.float64)      # csr_host: canonicalised on the host
        g = fa.DeviceCSR((dev(data), dev(m.indices.astype(np.int64)), dev(m.indptr.astype(np.int64))), shape)
        out.append((m, g))
    return out


def _snapshot(opt):
    return {n: (np.array(v.to_host().codes), np.array(v.to_host().absmax))
            for n, v in opt.state[0].items() if getattr(type(v), "compressed_state", False)}


@pytest.mark.parametrize("form", ["rows", "csr", "csr_host"])
@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
@pytest.mark.parametrize("case", SPARSE_CASES, ids=[c[0].__name__ for c in SPARSE_CASES])
def test_sparse_lazy_matches_cpu(case, kind, form):
    """A dense step (every row's state stored), then lazy sparse steps: parameters, codes and
    scales of the CUDA parameter equal the CPU's bit for bit; untouched rows keep theirs."""
    cls, kw = case
    shape = SPARSE_SHAPE
    p0, dense = problem(5, shape, 1)
    kw = dict(kw, state_dtype=kind)
    ph, pd = p0.copy(), dev(p0)
    oh, od = cls([ph], **kw), cls([pd], **kw)
    oh.step([dense[0]])
    od.step([dev(dense[0])])
    for gh, gd in _sparse_grads(shape, form):
        before = _snapshot(od)
        p_before = host(pd)
        oh.step([gh])
        od.step([gd])
        touched = (np.unique(np.asarray(gh.rows)) if isinstance(gh, fa.RowGrad)
                   else np.flatnonzero(np.diff(gh.indptr) > 0))
        untouched = np.setdiff1d(np.arange(shape[0]), touched)
        after = _snapshot(od)
        for name, (codes, absmax) in before.items():
            np.testing.assert_array_equal(after[name][0][untouched], codes[untouched], err_msg=name)
            if kind == "int8":                        # one block per row
                np.testing.assert_array_equal(after[name][1][untouched], absmax[untouched], err_msg=name)
        np.testing.assert_array_equal(host(pd)[untouched], p_before[untouched])
    assert_pair(oh, od, ph, pd)


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_sparse_lazy_wide_rows_match_cpu(kind, rounding):
    """Rows of 512 elements: int8 blocks of 256, two per row; Adam, CSR and rows forms."""
    shape = (3, 512)
    p0, dense = problem(6, shape, 1)
    kw = dict(state_dtype=kind, state_rounding=rounding)
    ph, pd = p0.copy(), dev(p0)
    oh, od = fa.Adam([ph], **kw), fa.Adam([pd], **kw)
    oh.step([dense[0]])
    od.step([dev(dense[0])])
    for form in ("rows", "csr"):
        for gh, gd in _sparse_grads((3, 512), form, seed=8, n=1):
            oh.step([gh])
            od.step([gd])
    assert_pair(oh, od, ph, pd)


def test_sparse_lazy_first_step_allocates_state():
    """A sparse step as the first step (state made by the step) matches the CPU too."""
    shape = SPARSE_SHAPE
    p0, _ = problem(9, shape, 1)
    ph, pd = p0.copy(), dev(p0)
    oh, od = fa.Adam([ph], state_dtype="int8"), fa.Adam([pd], state_dtype="int8")
    for gh, gd in _sparse_grads(shape, "csr", seed=10, n=2):
        oh.step([gh])
        od.step([gd])
    assert_pair(oh, od, ph, pd)


# (Adadelta has a Decay plan too, but its rule already differs from the CPU's by an ulp under the
# simulator with dense gradients and plain state, so it cannot be compared bit for bit here)
DECAY_CASES = [
    (fa.RMSprop, dict(centered=True)),
    (fa.RMSprop, dict(alpha=0.9)),
]


@pytest.mark.parametrize("form", ["rows", "csr", "csr_host"])
@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
@pytest.mark.parametrize("case", DECAY_CASES, ids=["RMSprop_centered", "RMSprop"])
def test_sparse_exact_decay_matches_cpu(case, kind, form):
    """sparse_mode='exact' with a Decay plan: touched rows caught up, updated whole and stamped;
    state_dict settles every row; a dense step after settles and drops the stamps.  Parameters,
    codes and scales equal the CPU's bit for bit."""
    cls, kw = case
    shape = SPARSE_SHAPE
    p0, dense = problem(11, shape, 2)
    kw = dict(kw, state_dtype=kind, sparse_mode="exact")
    ph, pd = p0.copy(), dev(p0)
    oh, od = cls([ph], **kw), cls([pd], **kw)
    assert od.algorithm.exact(od.param_groups[0]) != "fused"
    oh.step([dense[0]])
    od.step([dev(dense[0])])
    for gh, gd in _sparse_grads(shape, form, seed=12, n=3):
        oh.step([gh])
        od.step([gd])
    np.testing.assert_array_equal(host(od.state[0]["_decay"].stamp), oh.state[0]["_decay"].stamp)
    assert_pair(oh, od, ph, pd)                     # state_dict: settles every row behind
    np.testing.assert_array_equal(host(od.state[0]["_decay"].stamp), oh.state[0]["_decay"].stamp)
    for gh, gd in _sparse_grads(shape, form, seed=13, n=1):
        oh.step([gh])
        od.step([gd])
    oh.step([dense[1]])                             # settles with forget, then the dense step
    od.step([dev(dense[1])])
    assert "_decay" not in od.state[0]
    assert_pair(oh, od, ph, pd)


FUSED_CASES = [
    (fa.Adam, dict(weight_decay=0.1)),
    (fa.SGD, dict(lr=0.05, momentum=0.9)),
    (fa.RMSprop, dict(momentum=0.9)),
]


@pytest.mark.parametrize("form", ["rows", "csr", "csr_host"])
@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=["Adam", "SGD", "RMSprop_momentum"])
def test_sparse_exact_fused_matches_cpu(case, kind, form):
    """sparse_mode='exact' with a fused plan: every row runs the rule (0 where nothing is
    stored); parameters, codes and scales equal the CPU's bit for bit."""
    cls, kw = case
    shape = SPARSE_SHAPE
    p0, dense = problem(14, shape, 1)
    kw = dict(kw, state_dtype=kind, sparse_mode="exact")
    ph, pd = p0.copy(), dev(p0)
    oh, od = cls([ph], **kw), cls([pd], **kw)
    assert od.algorithm.exact(od.param_groups[0]) == "fused"
    oh.step([dense[0]])
    od.step([dev(dense[0])])
    for gh, gd in _sparse_grads(shape, form, seed=15, n=2):
        oh.step([gh])
        od.step([gd])
    assert_pair(oh, od, ph, pd)


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_sparse_compressed_refused_before_writing_where_backend_lacks_plan(monkeypatch, kind):
    """A backend whose ``sparse_compressed_supports(plan)`` is False for a plan makes the
    optimizer raise NotImplementedError before anything is written."""
    from fastadapt.backends.cuda import CUDABackend
    monkeypatch.setattr(CUDABackend, "sparse_compressed_supports", staticmethod(lambda plan: plan != "fused"))
    cls, kw = fa.Adam, {}
    p0 = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    pd = dev(p0)
    opt = cls([pd], state_dtype=kind, sparse_mode="exact", **kw)
    opt.step([dev(np.ones(SHAPE, np.float32))])
    before = host(pd)
    saved = opt.state_dict()
    rows = dev(np.array([1, 3], np.int64))
    vals = dev(np.ones((2, SHAPE[1]), np.float32))
    with pytest.raises(NotImplementedError, match="sparse gradients with compressed state"):
        opt.step([fa.RowGrad(rows, vals)])
    np.testing.assert_array_equal(host(pd), before)
    assert opt.state[0]["step"] == 1
    for name, entry in compressed_entries(saved).items():
        assert_entries_equal(compressed_entries(opt.state_dict())[name], entry)


def test_sparse_int8_not_row_aligned_refused_before_writing():
    """int8 state on a table whose rows are shorter than 32 elements (blocks span rows): a sparse
    step is refused before anything is written, as on the CPU."""
    shape = (40, 8)
    p0 = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    pd = dev(p0)
    opt = fa.Adam([pd], state_dtype="int8")
    opt.step([dev(np.ones(shape, np.float32))])
    before = host(pd)
    with pytest.raises(ValueError, match="row"):
        opt.step([fa.RowGrad(dev(np.array([1, 3], np.int64)), dev(np.ones((2, 8), np.float32)))])
    np.testing.assert_array_equal(host(pd), before)
    assert opt.state[0]["step"] == 1
