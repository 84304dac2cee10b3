"""Sparse gradients (scipy CSR, RowGrad) with compressed optimizer state (issue #13).

The reference of every sparse step: decode the compressed state, run the float32 optimizer's
sparse step on a float32 copy (same stamps for exact decay), encode the rows the step touched
(bfloat16 with the same (seed, step) and global element index; int8 per row block) and keep
the old codes and scales elsewhere.  The compressed optimizer must match it bit for bit.
"""

import numba
import numpy as np
import pytest
import scipy.sparse as sps

import fastadapt as fa
from fastadapt import config
from fastadapt.backends import codec
from fastadapt.grads.sparse import PendingDecay

KINDS = ["bfloat16", "int8"]


def _param(opt):
    return opt.param_groups[0]["params"][0]


def _slots(opt):
    st = opt.state[0]
    return [n for n in opt.slots if n is not None and n in st and getattr(st[n], "compressed_state", False)]


def _snapshot(opt):
    st = opt.state[0]
    return {n: (st[n].codes.copy(), st[n].absmax.copy()) for n in _slots(opt)}


def _grad(rng, shape, form, rows):
    nrows = shape[0]
    ncols = int(np.prod(shape[1:]))
    if form == "rows":
        return fa.RowGrad(rows, rng.standard_normal((len(rows),) + tuple(shape[1:])).astype(np.float32))
    if form == "dup":             # duplicates, unsorted
        r = np.concatenate([rows, rows[::2]])[::-1].copy()
        return fa.RowGrad(r, rng.standard_normal((len(r),) + tuple(shape[1:])).astype(np.float32))
    dense = np.zeros((nrows, ncols), np.float32)
    for r in rows:                # a few entries per touched row (sometimes the whole row)
        cols = rng.choice(ncols, size=ncols if r % 5 == 0 else max(1, ncols // 7), replace=False)
        dense[r, cols] = rng.standard_normal(cols.size).astype(np.float32)
    m = sps.csr_matrix(dense)
    if form == "csr0":            # explicit zeros count as touched
        m.data[::3] = 0.0
    return m


def _touched(g, nrows):
    if isinstance(g, fa.RowGrad):
        return np.unique(np.asarray(g.rows))
    if g.shape[0] == 1 and nrows > 1:           # a (1, n) CSR of a 1-D parameter: its elements are rows
        return np.unique(g.indices)
    return np.flatnonzero(np.diff(g.indptr) > 0)


def _reference(opt, g):
    """The float32 optimizer's step from the decoded state: (param, {slot: (codes, absmax)}, stamp, rows changed)."""
    group = opt.param_groups[0]
    p = _param(opt)
    st = opt.state[0]
    hyper = {k: v for k, v in group.items() if k not in ("params", "state_dtype", "state_rounding")}
    ref = type(opt)([p.copy()], **hyper)
    fst = {k: (v.decode() if getattr(v, "compressed_state", False) else v)
           for k, v in st.items() if k != "_decay"}
    dec = st.get("_decay")
    if dec is not None:
        fd = PendingDecay(dec.stamp.copy(), dec.plan, dec.names)
        fd.pending = dec.pending
        fst["_decay"] = fd
    ref.state[0].clear()
    ref.state[0].update(fst)
    ref.step([g])
    rst = ref.state[0]
    step = rst["step"]
    nrows = p.shape[0]
    plan = "lazy" if group.get("sparse_mode") != "exact" else opt.algorithm.exact(group)
    rows = np.arange(nrows) if plan == "fused" else _touched(g, nrows)
    nearest = group.get("state_rounding") == "nearest"
    out = {}
    for n in _slots(opt):
        buf = st[n]
        x = np.ascontiguousarray(rst[n], np.float32)
        codes, absmax = buf.codes.copy(), buf.absmax.copy()
        if buf.kind == "bfloat16":
            new = codec.bf16_encode(x, buf.seed, step, nearest=nearest)
            codes[rows] = new[rows]
        else:
            ncols = x.size // nrows
            nb = ncols // buf.block
            for r in rows:
                c, a = codec.q8_encode(x[r].reshape(-1), signed=buf.signed, block=buf.block)
                codes[r] = c.reshape(codes[r].shape)
                absmax[r * nb:(r + 1) * nb] = a
        out[n] = (codes, absmax)
    stamp = rst["_decay"].stamp.copy() if "_decay" in rst else None
    return _param(ref).copy(), out, stamp, rows


def _check_step(opt, g):
    before = _snapshot(opt)
    p_ref, codes_ref, stamp_ref, rows = _reference(opt, g)
    assert opt.step([g])
    p = _param(opt)
    np.testing.assert_array_equal(p.view(np.uint32), p_ref.view(np.uint32))
    st = opt.state[0]
    for n, (codes, absmax) in codes_ref.items():
        np.testing.assert_array_equal(st[n].codes, codes, err_msg=n)
        if st[n].kind == "int8":
            np.testing.assert_array_equal(st[n].absmax.view(np.uint32), absmax.view(np.uint32), err_msg=n)
    if stamp_ref is not None:
        np.testing.assert_array_equal(st["_decay"].stamp, stamp_ref)
    nrows = p.shape[0]
    untouched = np.setdiff1d(np.arange(nrows), rows)
    for n, (codes, absmax) in before.items():       # untouched rows: not a bit changed
        np.testing.assert_array_equal(st[n].codes[untouched], codes[untouched])
        if st[n].kind == "int8":
            nb = (p.size // nrows) // st[n].block
            blocks = (untouched[:, None] * nb + np.arange(nb)).reshape(-1)
            np.testing.assert_array_equal(st[n].absmax[blocks].view(np.uint32), absmax[blocks].view(np.uint32))


def _run_case(cls, hyper, kind, form, shape=(96, 64), steps=3, seed=0):
    rng = np.random.default_rng(seed)
    P = rng.standard_normal(shape).astype(np.float32)
    opt = cls([P], state_dtype=kind, **hyper)
    opt.step([rng.standard_normal(shape).astype(np.float32)])      # dense warm-up: state in every row
    for s in range(steps):
        rows = np.sort(rng.choice(shape[0], size=shape[0] // 4, replace=False))
        _check_step(opt, _grad(rng, shape, form, rows))
    return opt


LAZY_CASES = [
    (fa.Adam, {"lr": 1e-2}),
    (fa.Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}),
    (fa.Adagrad, {"lr": 1e-1}),
    (fa.RMSprop, {"lr": 1e-2}),
    (fa.RMSprop, {"lr": 1e-2, "centered": True, "momentum": 0.9}),
]
LAZY_IDS = ["adam", "amsgrad", "adagrad", "rmsprop", "rmsprop-centered-momentum"]


@pytest.mark.parametrize("form", ["rows", "dup", "csr", "csr0"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls,hyper", LAZY_CASES, ids=LAZY_IDS)
def test_lazy_matches_reference(cls, hyper, kind, form):
    _run_case(cls, hyper, kind, form)


@pytest.mark.parametrize("kind", KINDS)
def test_lazy_multi_block_rows_and_nearest(kind):
    """Rows of two int8 blocks (512 elements), bfloat16 round to nearest."""
    _run_case(fa.Adam, {"lr": 1e-2, "state_rounding": "nearest"}, kind, "csr", shape=(16, 512))
    _run_case(fa.Adam, {"lr": 1e-2}, kind, "rows", shape=(16, 512))


EXACT_CASES = [
    (fa.Adam, {"lr": 1e-2}),                                     # fused
    (fa.Adagrad, {"lr": 1e-1}),                                  # LAZY plan
    (fa.RMSprop, {"lr": 1e-2}),                                  # Decay (exp_avg_sq)
    (fa.RMSprop, {"lr": 1e-2, "centered": True}),                # Decay (two slots)
    (fa.RMSprop, {"lr": 1e-2, "momentum": 0.5}),                 # fused
    (fa.Adadelta, {"lr": 1.0}),                                  # Decay
]
EXACT_IDS = ["adam-fused", "adagrad-lazy", "rmsprop-decay", "rmsprop-centered-decay", "rmsprop-momentum-fused",
             "adadelta-decay"]


@pytest.mark.parametrize("form", ["rows", "dup", "csr"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls,hyper", EXACT_CASES, ids=EXACT_IDS)
def test_exact_matches_reference(cls, hyper, kind, form):
    opt = _run_case(cls, dict(hyper, sparse_mode="exact"), kind, form, steps=4)
    if "_decay" in opt.state[0]:
        _check_settle(opt)


def _check_settle(opt):
    """state_dict() settles the rows behind: decode, catch up in float32, encode (step's key)."""
    st = opt.state[0]
    dec = st["_decay"]
    step = st["step"]
    behind = np.flatnonzero(dec.stamp < step)
    assert behind.size
    x = {n: st[n].decode() for n in _slots(opt)}
    factor = {}
    for r in behind:
        gap = int(step - dec.stamp[r])
        if gap not in factor:
            from fastadapt.backends.cpu_sparse import _FACTOR_OF
            factor[gap] = np.float32(_FACTOR_OF(dec.plan.base, gap))
    want = {}
    nearest = opt.param_groups[0].get("state_rounding") == "nearest"
    for i, n in enumerate(dec.names):
        if n is None or not dec.plan.slots[i] or n not in x:
            continue
        buf = st[n]
        v = x[n].copy()
        for r in behind:
            v[r] = v[r] * factor[int(step - dec.stamp[r])]
        codes = buf.codes.copy()
        absmax = buf.absmax.copy()
        if buf.kind == "bfloat16":
            codes[behind] = codec.bf16_encode(v, buf.seed, step, nearest=nearest)[behind]
        else:
            nb = v[0].size // buf.block
            for r in behind:
                c, a = codec.q8_encode(v[r].reshape(-1), signed=buf.signed, block=buf.block)
                codes[r] = c.reshape(codes[r].shape)
                absmax[r * nb:(r + 1) * nb] = a
        want[n] = (codes, absmax)
    others = {n: st[n].codes.copy() for n in _slots(opt) if n not in want}
    sd = opt.state_dict()
    assert sd is not None
    assert not st["_decay"].pending and np.all(st["_decay"].stamp == step)
    for n, (codes, absmax) in want.items():
        np.testing.assert_array_equal(st[n].codes, codes, err_msg=n)
        np.testing.assert_array_equal(st[n].absmax.view(np.uint32), absmax.view(np.uint32), err_msg=n)
    for n, codes in others.items():
        np.testing.assert_array_equal(st[n].codes, codes, err_msg=n)


def test_scale_slots_is_a_product():
    """(_check_settle's float32 catch-up is ``s * factor``: what algorithms.scale_slots does)."""
    import inspect
    from fastadapt.algorithms import scale_slots
    assert "*" in inspect.getsource(scale_slots)


DENSE_CASES = [
    (fa.Adam, {"lr": 1e-2}),
    (fa.Adam, {"lr": 1e-2, "state_rounding": "nearest"}),
    (fa.Adagrad, {"lr": 1e-1}),
    (fa.Adagrad, {"lr": 1e-1, "weight_decay": 0.01, "lr_decay": 0.1}),
    (fa.RMSprop, {"lr": 1e-2}),
    (fa.RMSprop, {"lr": 1e-2, "centered": True}),
    (fa.RMSprop, {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.01}),
    (fa.RMSprop, {"lr": 1e-2, "centered": True, "momentum": 0.5, "state_rounding": "nearest"}),
]


@pytest.mark.parametrize("shape", [(96, 64), (5000,)], ids=["table", "1d"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls,hyper", DENSE_CASES)
def test_every_row_equals_dense_step(cls, hyper, kind, shape):
    """A lazy RowGrad touching every row (sorted, unique) is the dense step, bit for bit."""
    if kind == "int8" and len(shape) == 1:
        pytest.skip("int8 sparse steps need row-aligned blocks (refused: test_int8_not_row_aligned_refused)")
    rng = np.random.default_rng(1)
    P = rng.standard_normal(shape).astype(np.float32)
    a = cls([P.copy()], state_dtype=kind, **hyper)
    b = cls([P.copy()], state_dtype=kind, **hyper)
    for s in range(4):
        G = rng.standard_normal(shape).astype(np.float32)
        a.step([G])
        b.step([fa.RowGrad(np.arange(shape[0]), G.copy())])
        np.testing.assert_array_equal(_param(a).view(np.uint32), _param(b).view(np.uint32))
        for n in _slots(a):
            np.testing.assert_array_equal(a.state[0][n].codes, b.state[0][n].codes, err_msg=n)
            np.testing.assert_array_equal(a.state[0][n].absmax.view(np.uint32),
                                          b.state[0][n].absmax.view(np.uint32), err_msg=n)


def test_bf16_1d_parameter_lazy_and_exact():
    """bfloat16 works for every shape: a 1-D parameter's elements are its rows."""
    for hyper in ({"lr": 1e-2}, {"lr": 1e-2, "sparse_mode": "exact"}):
        rng = np.random.default_rng(2)
        P = rng.standard_normal(6000).astype(np.float32)
        opt = fa.RMSprop([P], state_dtype="bfloat16", **hyper)
        opt.step([rng.standard_normal(6000).astype(np.float32)])
        for s in range(3):
            cols = np.sort(rng.choice(6000, 500, replace=False))
            g = sps.csr_matrix((rng.standard_normal(500).astype(np.float32), cols, [0, 500]), shape=(1, 6000))
            _check_step(opt, g)
        if "_decay" in opt.state[0]:
            _check_settle(opt)


@pytest.mark.parametrize("shape", [(8192,), (1024, 8), (256, 4, 4)], ids=["1d", "rows8", "rows16-3d"])
@pytest.mark.parametrize("form", ["rows", "csr"])
def test_int8_not_row_aligned_refused(shape, form):
    if form == "csr" and len(shape) > 2:
        pytest.skip("CSR needs a 1-D or 2-D parameter")
    rng = np.random.default_rng(3)
    first = rng.standard_normal((64, 64)).astype(np.float32)
    P = rng.standard_normal(shape).astype(np.float32)
    opt = fa.Adam([{"params": [first], "state_dtype": "bfloat16"}, {"params": [P], "state_dtype": "int8"}],
                  lr=1e-2)
    opt.step([rng.standard_normal(first.shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)])
    p0, p1 = first.copy(), P.copy()
    snap = [{n: (st[n].codes.copy(), st[n].absmax.copy()) for n in ("exp_avg", "exp_avg_sq")} for st in opt.state]
    steps = [st["step"] for st in opt.state]
    if form == "rows":
        g = fa.RowGrad([1, 3], np.ones((2,) + shape[1:], np.float32))
    else:
        g = sps.csr_matrix(np.eye(1 if len(shape) == 1 else shape[0], P.size // (1 if len(shape) == 1 else
                                                                                shape[0]), dtype=np.float32))
    with pytest.raises(ValueError, match=r"state_dtype='int8'.*state_dtype='bfloat16'"):
        opt.step([fa.RowGrad([0, 5], np.ones((2, 64), np.float32)), g])
    np.testing.assert_array_equal(first, p0)
    np.testing.assert_array_equal(P, p1)
    assert [st["step"] for st in opt.state] == steps
    for st, sn in zip(opt.state, snap):
        for n, (c, a) in sn.items():
            np.testing.assert_array_equal(st[n].codes, c)
            np.testing.assert_array_equal(st[n].absmax, a)
    # bfloat16 state for that parameter: the same sparse step works
    opt.param_groups[1]["state_dtype"] = "bfloat16"
    assert opt.step([None, g])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["lazy-csr", "fused-csr", "decay-rows", "decay-csr"])
def test_threads_identical(kind, case, monkeypatch):
    """1 and 2 threads (several work units each): the same bits."""
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 64)
    cls, hyper = {"lazy": (fa.Adam, {"lr": 1e-2}), "fused": (fa.Adam, {"lr": 1e-2, "sparse_mode": "exact"}),
                  "decay": (fa.RMSprop, {"lr": 1e-2, "centered": True, "sparse_mode": "exact"})}[case.split("-")[0]]
    form = case.split("-")[1]
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            rng = np.random.default_rng(4)
            P = rng.standard_normal((128, 64)).astype(np.float32)
            opt = cls([P], state_dtype=kind, **hyper)
            for s in range(4):
                rows = np.sort(rng.choice(128, 40, replace=False))
                opt.step([_grad(rng, P.shape, form, rows)])
            sd = opt.state_dict()                                   # (settles pending decay)
            results.append((P.copy(), sd))
    finally:
        numba.set_num_threads(before)
    (pa, sa), (pb, sb) = results
    np.testing.assert_array_equal(pa.view(np.uint32), pb.view(np.uint32))
    for n, v in sa["state"][0].items():
        if isinstance(v, dict):
            for key in ("codes", "absmax"):
                if key in v:
                    np.testing.assert_array_equal(np.asarray(v[key]).view(np.uint8),
                                                  np.asarray(sb["state"][0][n][key]).view(np.uint8))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hyper", [{"lr": 1e-2}, {"lr": 1e-2, "sparse_mode": "exact", "centered": True}],
                         ids=["lazy", "decay"])
def test_state_dict_round_trip_after_sparse_steps(kind, hyper):
    rng = np.random.default_rng(5)
    P = rng.standard_normal((96, 64)).astype(np.float32)
    a = fa.RMSprop([P.copy()], state_dtype=kind, **hyper)
    grads = [_grad(rng, P.shape, "csr" if s % 2 else "dup", np.sort(rng.choice(96, 20, replace=False)))
             for s in range(6)]
    for g in grads[:3]:
        a.step([g])
    sd = a.state_dict()
    b = fa.RMSprop([_param(a).copy()], state_dtype=kind, **hyper)
    b.load_state_dict(sd)
    for n in _slots(a):
        np.testing.assert_array_equal(a.state[0][n].codes, b.state[0][n].codes)
    for g in grads[3:]:
        a.step([g])
        b.step([g])
    np.testing.assert_array_equal(_param(a).view(np.uint32), _param(b).view(np.uint32))
    sa, sb = a.state_dict(), b.state_dict()
    for n in _slots(a):
        np.testing.assert_array_equal(sa["state"][0][n]["codes"], sb["state"][0][n]["codes"])
    f32 = a.state_dict(dtype="float32")
    for n in _slots(a):
        assert np.asarray(f32["state"][0][n]).dtype == np.float32


@pytest.mark.parametrize("kind", KINDS)
def test_empty_gradients_and_other_shapes(kind):
    """Empty RowGrad / CSR in every mode, SparseAdam, a 3-D table's RowGrad: as the reference."""
    rng = np.random.default_rng(6)
    for cls, hyper in ((fa.Adam, {"lr": 1e-2}), (fa.Adam, {"lr": 1e-2, "sparse_mode": "exact"}),
                       (fa.RMSprop, {"lr": 1e-2, "sparse_mode": "exact"})):
        P = rng.standard_normal((64, 64)).astype(np.float32)
        opt = cls([P], state_dtype=kind, **hyper)
        opt.step([rng.standard_normal(P.shape).astype(np.float32)])
        _check_step(opt, fa.RowGrad(np.zeros(0, np.int64), np.zeros((0, 64), np.float32)))
        _check_step(opt, sps.csr_matrix((64, 64), dtype=np.float32))
        _check_step(opt, _grad(rng, P.shape, "csr", np.array([0, 63])))
    P = rng.standard_normal((64, 64)).astype(np.float32)
    opt = fa.SparseAdam([P], lr=1e-2, state_dtype=kind)
    opt.step([fa.RowGrad(np.arange(64), rng.standard_normal(P.shape).astype(np.float32))])
    _check_step(opt, _grad(rng, P.shape, "dup", np.array([1, 5, 9])))
    _run_case(fa.Adam, {"lr": 1e-2}, kind, "rows", shape=(64, 4, 16))
