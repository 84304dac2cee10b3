"""Sparse gradients (scipy CSR and RowGrad): lazy and exact modes, SparseAdam, hostile input.

Everything is compared against the numpy references of tests/reference.py (the spec, "Sparse gradients",
Part B §5-§7): ``lazy_step`` (the dense rule run on the touched entries only), ``exact_step``
(the dense rule on the densified gradient), ``sparse_adam``; and, where torch is importable,
against torch.optim.SparseAdam and Adagrad with sparse COO gradients.  Gradients are
non-canonical on purpose: duplicates, unsorted columns, explicit zeros, empty rows, empty
steps, data of another float dtype.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

import fastadapt as fa
from fastadapt import config
from fastadapt.backends import cpu_sparse
from fastadapt.algorithms import Decay
from fastadapt.grads import sparse

import reference as ref
from conftest import DTYPES, DTYPE_IDS, RTOL, assert_close
from optimizers import CASES, DENSE, OPTIMIZERS, config_id


def exact_strategy(opt):
    """"lazy", "decay" or "fused": how the optimizer's first group runs sparse_mode="exact"."""
    plan = opt.algorithm.exact(opt.param_groups[0])
    return "decay" if isinstance(plan, Decay) else plan

SHAPE = (7, 5)
STEPS = 12

#: (case, mode, options, dtype): every option combination (and the defaults) of every case in each
#: of its sparse modes in float64; in float32 the grid's corners (``small_grid``), for run time
SPARSE_GRID = ([(c, m, o, np.float64) for c in OPTIMIZERS for o in [{}] + list(c.options) for m in c.modes]
               + [(c, m, o, np.float32) for c in OPTIMIZERS for o in c.small_grid() for m in c.modes])
#: (case, options, dtype): the same for the dense cases, exact mode against the dense step
EXACT_GRID = ([(c, o, np.float64) for c in DENSE if "exact" in c.modes for o in [{}] + list(c.options)]
              + [(c, o, np.float32) for c in DENSE if "exact" in c.modes for o in c.small_grid()])


def _grid_id(item):
    """config_id plus the dtype."""
    return config_id(item[:-1]) + "-" + DTYPE_IDS[DTYPES.index(item[-1])]
#: (case, mode, options): lazy with the defaults and the rich config, exact once per distinct plan
GROUPS = [(c, m, o) for c in OPTIMIZERS for m, o in c.exact_groups()]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def coo_steps(shape2d, steps, seed, keep_last=True):
    """COO triples in CSR storage order (grouped by row, columns in order of appearance): duplicates,
    unsorted columns, explicit zeros, empty rows, and an empty step (nnz = 0).  With ``keep_last`` the
    last row (the last two elements of a single-row shape) is never touched."""
    rng = np.random.default_rng(seed)
    nr, nc = shape2d
    limit = nr * nc - (2 if nr == 1 else nc) if keep_last else nr * nc
    out = []
    for i in range(steps):
        k = 0 if i == 3 else int(rng.integers(1, max(2, limit // 2)))
        lin = rng.integers(0, limit, k)
        vals = rng.standard_normal(k) * 10.0 ** rng.uniform(-2, 1)
        if k >= 4:
            lin[-2:] = lin[0]                       # duplicates (three of a kind)
        if k >= 6:
            vals[1] = vals[3] = 0.0                 # explicit zeros
        rows, cols = lin // nc, lin % nc
        order = np.argsort(rows, kind="stable")
        out.append((rows[order], cols[order], vals[order]))
    return out


def to_csr(shape2d, rows, cols, vals, dtype, index_dtype=np.int32, kind="matrix"):
    """A CSR built from raw arrays exactly as given (scipy keeps duplicates and the column order)."""
    nr = shape2d[0]
    indptr = np.zeros(nr + 1, index_dtype)
    np.cumsum(np.bincount(rows, minlength=nr), out=indptr[1:])
    make = sp.csr_matrix if kind == "matrix" else sp.csr_array
    g = make((np.asarray(vals, dtype), np.asarray(cols, index_dtype), indptr), shape=shape2d)
    if g.indices.dtype != index_dtype:             # scipy downcasts small int64 indices: undo that
        g.indices, g.indptr = g.indices.astype(index_dtype), g.indptr.astype(index_dtype)
    assert g.nnz == len(vals)                      # not canonicalised by scipy
    return g


def run_fastadapt(case, hyper, p0, grads, mode="lazy"):
    p = p0.copy()
    opt = case.cls([p], **case.mode_options(mode), **hyper)
    for g in grads:
        assert opt.step([g]) is True
    return opt, p


def run_reference(case, hyper, p0, coos, mode):
    p = p0.copy()
    st = case.init_state(p, **hyper)
    for r, c, v in coos:
        case.sparse_reference(p, r, c, v, st, mode, **hyper)
    return p, st




def assert_state_matches(opt, p, st_ref, rtol):
    st = opt.state_of(p)
    assert st["step"] == st_ref["step"]
    names = {k for k in st_ref if k != "step"}                  # buffers and carried scalars
    assert names == {k for k in st if not k.startswith("_") and k != "step"}
    for k in names:
        assert_close(st[k], st_ref[k], rtol, k)


def snapshot(opt, params):
    """Copies of every parameter and of the raw state (no settling: reading must not change it)."""
    return ([q.copy() for q in params],
            [{k: (v.copy() if isinstance(v, np.ndarray) else
                  [x.copy() if isinstance(x, np.ndarray) else x for x in v] if isinstance(v, list) else v)
              for k, v in st.items()} for st in opt.state],
            opt.skipped_steps)


def assert_unchanged(before, opt, params):
    ps, states, skipped = before
    for a, b in zip(ps, params):
        assert np.array_equal(a, b, equal_nan=True)
    assert opt.skipped_steps == skipped
    for sa, sb in zip(states, opt.state):
        assert sa.keys() == sb.keys()
        for k in sa:
            va, vb = sa[k], sb[k]
            if isinstance(va, np.ndarray):
                assert np.array_equal(va, vb, equal_nan=True), k
            elif isinstance(va, list):
                assert all(np.array_equal(x, y) for x, y in zip(va, vb)), k
            else:
                assert va == vb, k


# --------------------------------------------------------------------------------------------------
# lazy and exact vs the references, every optimizer and option
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,mode,hyper,dtype", SPARSE_GRID, ids=map(_grid_id, SPARSE_GRID))
def test_csr_matches_reference(case, mode, hyper, dtype):
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(SHAPE).astype(dtype)
    coos = coo_steps(SHAPE, STEPS, seed=2)
    grads = [to_csr(SHAPE, r, c, v, dtype, kind=("matrix", "array")[i % 2]) for i, (r, c, v) in enumerate(coos)]
    opt, p = run_fastadapt(case, hyper, p0, grads, mode)
    p_ref, st_ref = run_reference(case, hyper, p0, coos, mode)
    assert st_ref["step"] == STEPS
    assert_close(p, p_ref, RTOL[np.dtype(dtype)], "param")
    assert_state_matches(opt, p, st_ref, RTOL[np.dtype(dtype)])
    if mode == "lazy":                              # the last row is never touched: bit-for-bit
        assert np.array_equal(p[-1], p0[-1])
        for k, v in opt.state_of(p).items():
            if isinstance(v, np.ndarray):
                assert np.array_equal(v[-1], case.init_state(p0, **hyper)[k][-1]), k


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,mode,hyper", GROUPS, ids=map(config_id, GROUPS))
def test_row_grad_matches_reference(case, mode, hyper, dtype):
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(SHAPE).astype(dtype)
    grads, coos = [], []
    for i in range(STEPS):
        k = 0 if i == 2 else int(rng.integers(1, 6))
        rows = rng.integers(0, SHAPE[0] - 1, k)          # the last row is never touched
        if k >= 3:
            rows[-1] = rows[0]                           # duplicate
        values = rng.standard_normal((k, SHAPE[1]))      # float64: cast to the param dtype
        grads.append(fa.RowGrad(rows.astype(np.int32), values))
        coos.append(ref.row_grad_to_coo(rows, values))
    opt, p = run_fastadapt(case, hyper, p0, grads, mode)
    p_ref, st_ref = run_reference(case, hyper, p0, coos, mode)
    assert_close(p, p_ref, RTOL[np.dtype(dtype)], "param")
    assert_state_matches(opt, p, st_ref, RTOL[np.dtype(dtype)])
    if mode == "lazy":
        assert np.array_equal(p[-1], p0[-1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("fmt", ["csr", "rows"])
@pytest.mark.parametrize("case,mode,hyper", GROUPS, ids=map(config_id, GROUPS))
def test_one_d_parameter(case, mode, hyper, fmt, dtype):
    n = 11
    p0 = np.random.default_rng(4).standard_normal(n).astype(dtype)
    coos = coo_steps((1, n), STEPS, seed=5)
    if fmt == "csr":
        grads = [to_csr((1, n), r, c, v, dtype) for r, c, v in coos]
    else:
        grads = [fa.RowGrad(c, v) for _, c, v in coos]     # element ids, float64 values
    opt, p = run_fastadapt(case, hyper, p0, grads, mode)
    p_ref, st_ref = run_reference(case, hyper, p0, coos, mode)
    assert_close(p, p_ref, RTOL[np.dtype(dtype)], "param")
    assert_state_matches(opt, p, st_ref, RTOL[np.dtype(dtype)])
    if mode == "lazy":
        assert np.array_equal(p[-2:], p0[-2:])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("options", CASES["SparseAdam"].options, ids=lambda o: config_id((CASES["SparseAdam"], o)))
def test_sparse_adam_matches_reference(options, dtype):
    hyper = dict(options, lr=0.05)
    p0 = np.random.default_rng(6).standard_normal(SHAPE).astype(dtype)
    coos = coo_steps(SHAPE, STEPS, seed=7)
    grads = [to_csr(SHAPE, r, c, v, np.float64) for r, c, v in coos]   # float64 data: cast
    opt, p = run_fastadapt(CASES["SparseAdam"], hyper, p0, grads)
    p_ref, st_ref = run_reference(CASES["SparseAdam"], hyper, p0, coos, "lazy")
    assert_close(p, p_ref, RTOL[np.dtype(dtype)], "param")
    assert_state_matches(opt, p, st_ref, RTOL[np.dtype(dtype)])
    assert np.array_equal(p[-1], p0[-1])
    # epsilon-hat form: a gradient holding every entry is not Adam's step (the spec, "SparseAdam")
    full = sp.csr_matrix(np.ones(SHAPE, dtype))
    q1, q2 = p0.copy(), p0.copy()
    fa.SparseAdam([q1], lr=0.1, eps=1e-3).step([full])
    fa.Adam([q2], lr=0.1, eps=1e-3).step([full])
    assert not np.allclose(q1, q2, rtol=1e-7, atol=0)


def test_sparse_adam_refuses_dense_gradients_and_has_no_sparse_mode():
    p = np.zeros(SHAPE)
    opt = fa.SparseAdam([p])
    with pytest.raises(TypeError, match="sparse gradients only"):
        opt.step([np.ones(SHAPE)])
    with pytest.raises(TypeError):
        fa.SparseAdam([p], sparse_mode="exact")


@pytest.mark.parametrize("case,hyper,dtype", EXACT_GRID, ids=map(_grid_id, EXACT_GRID))
def test_exact_equals_dense_step_on_toarray(case, hyper, dtype):
    """Exact mode is the dense step on G.toarray(): bit for bit where it runs the rule on every
    element (fused pass) or where a zero gradient changes nothing (Adagrad); to rounding where it
    catches RMSprop's decay up in closed form."""
    p0 = np.random.default_rng(8).standard_normal(SHAPE).astype(dtype)
    coos = coo_steps(SHAPE, STEPS, seed=9, keep_last=False)
    grads = [to_csr(SHAPE, r, c, v, dtype) for r, c, v in coos]
    opt_s, p_s = run_fastadapt(case, hyper, p0, grads, "exact")
    opt_d, p_d = run_fastadapt(case, hyper, p0, [g.toarray() for g in grads])
    strategy = exact_strategy(opt_s)
    assert strategy == (case.exact_plan(hyper) if isinstance(case.exact_plan(hyper), str) else "decay")
    st_s, st_d = opt_s.state_of(p_s), opt_d.state_of(p_d)
    if strategy == "decay":
        assert_close(p_s, p_d, RTOL[np.dtype(dtype)])
        for k in st_d:
            if k != "step":
                assert_close(st_s[k], st_d[k], RTOL[np.dtype(dtype)], k)
    else:
        assert np.array_equal(p_s, p_d)
        for k in st_d:
            assert np.array_equal(st_s[k], st_d[k]), k
    assert st_s["step"] == st_d["step"] == STEPS


@pytest.mark.parametrize("case,mode,hyper", GROUPS, ids=map(config_id, GROUPS))
def test_csr_with_whole_rows(case, mode, hyper):
    """Whole touched rows (the CSR is then run by the row loops) and whole rows mixed with partial ones."""
    shape = (9, 4)
    rng = np.random.default_rng(29)
    p0 = rng.standard_normal(shape)
    whole = [1, 4, 5]
    steps = [
        (np.repeat(whole, 4), np.tile(np.arange(4), 3)),                            # whole rows only
        (np.r_[np.repeat([0, 6], 4), [2, 2, 7]], np.r_[np.tile(np.arange(4), 2), [3, 0, 1]]),   # mixed
        (np.repeat(whole, 4), np.tile(np.arange(4), 3)),
    ]
    coos = []
    for r, c in steps:
        order = np.argsort(r, kind="stable")
        coos.append((r[order], c[order], rng.standard_normal(r.size)[order]))
    grads = [to_csr(shape, r, c, v, np.float64) for r, c, v in coos]
    opt, p = run_fastadapt(case, hyper, p0, grads, mode)
    p_ref, st_ref = run_reference(case, hyper, p0, coos, mode)
    assert_close(p, p_ref, 1e-12)
    assert_state_matches(opt, p, st_ref, 1e-12)


def test_exact_strategies():
    """Which optimizer configurations take the O(nnz) paths (the spec, "Sparse gradients")."""
    def strategy(cls, **hyper):
        return exact_strategy(cls([np.zeros(3)], sparse_mode="exact", **hyper))
    assert strategy(fa.Adagrad) == "lazy"
    assert strategy(fa.Adagrad, lr_decay=0.5, initial_accumulator_value=1.0, maximize=True) == "lazy"
    assert strategy(fa.Adagrad, weight_decay=0.1) == "fused"
    assert strategy(fa.Adagrad, eps=0.0) == "fused"               # 0/0 would be NaN in the dense step
    assert strategy(fa.RMSprop) == "decay"
    assert strategy(fa.RMSprop, centered=True, alpha=0.5, maximize=True) == "decay"
    assert strategy(fa.RMSprop, momentum=0.9) == "fused"
    assert strategy(fa.RMSprop, weight_decay=0.1) == "fused"
    assert strategy(fa.RMSprop, alpha=1.5) == "fused"             # alpha**n could overflow
    assert strategy(fa.Adam) == strategy(fa.AdamW) == "fused"


def test_exact_rmsprop_touches_only_touched_rows_until_read():
    """The decay strategy is O(rows touched): untouched rows' raw state waits for a read."""
    p0 = np.random.default_rng(10).standard_normal((6, 3))
    p = p0.copy()
    opt = fa.RMSprop([p], lr=0.01, sparse_mode="exact")
    opt.step([np.ones((6, 3))])                            # dense: every row has state
    v1 = opt.state[0]["square_avg"].copy()
    for _ in range(3):
        opt.step([fa.RowGrad([1], np.ones((1, 3)))])
    raw = opt.state[0]["square_avg"]
    assert np.array_equal(raw[[0, 2, 3, 4, 5]], v1[[0, 2, 3, 4, 5]])   # not decayed yet
    settled = opt.state_of(p)["square_avg"]                            # reading settles
    np.testing.assert_allclose(settled[0], v1[0] * 0.99 ** 3, rtol=1e-14)
    assert np.array_equal(p[0], p0[0] - 0.01 * 1 / (np.sqrt(v1[0]) + 1e-8))  # p moved only at step 1


# --------------------------------------------------------------------------------------------------
# formats: canonical forms, csr_matrix / csr_array, index dtypes, RowGrad shapes
# --------------------------------------------------------------------------------------------------


def test_canonical_csr_form():
    # row 0: unsorted with duplicates and a zero; row 1 empty; row 2 canonical; row 3 a lone zero
    indptr = np.array([0, 4, 4, 6, 7], np.int32)
    indices = np.array([3, 1, 3, 0, 0, 2, 4], np.int32)
    data = np.array([1.0, 2.0, 0.5, 0.0, 7.0, 8.0, 0.0])
    g = sp.csr_matrix((data, indices, indptr), shape=(4, 5))
    copies = [a.copy() for a in (g.indptr, g.indices, g.data)]
    rows, ptr, cols, vals = sparse.canonical_csr(g, (4, 5), np.float32)
    assert rows.tolist() == [0, 2, 3] and rows.dtype == np.int64
    assert ptr.tolist() == [0, 3, 5, 6] and ptr.dtype == np.int64
    assert cols.tolist() == [0, 1, 3, 0, 2, 4]
    assert vals.dtype == np.float32 and vals.tolist() == [0.0, 2.0, 1.5, 7.0, 8.0, 0.0]
    for a, b in zip(copies, (g.indptr, g.indices, g.data)):     # the caller's matrix is untouched
        assert np.array_equal(a, b) and a.dtype == b.dtype
    empty = sp.csr_matrix((4, 5))
    rows, ptr, cols, vals = sparse.canonical_csr(empty, (4, 5), np.float64)
    assert rows.size == 0 and ptr.tolist() == [0] and cols.size == 0 and vals.size == 0


def test_canonical_csr_is_zero_copy_when_canonical():
    g = sp.random(50, 8, density=0.2, format="csr", dtype=np.float32, random_state=0)
    g.data[:3] = 0.0                                           # explicit zeros stay stored
    rows, ptr, cols, vals = sparse.canonical_csr(g, (50, 8), np.float32)
    assert np.shares_memory(cols, g.indices) and np.shares_memory(vals, g.data)
    assert vals.size == g.nnz
    assert np.array_equal(rows, np.flatnonzero(np.diff(g.indptr)))


def test_canonical_rows_form():
    rows = np.array([5, 1, 5, 3, 1, 5], np.int32)
    values = np.arange(12.0).reshape(6, 2)
    r, v = sparse.canonical_rows(rows, values, 8, 2, np.float32)
    assert r.tolist() == [1, 3, 5] and r.dtype == np.int64
    assert v.dtype == np.float32 and v.flags.c_contiguous
    assert v.tolist() == [[10.0, 12.0], [6.0, 7.0], [0.0 + 4 + 10, 1.0 + 5 + 11]]
    canon = np.array([0, 2, 7], np.int64)
    vals = np.ones((3, 2), np.float32)
    r, v = sparse.canonical_rows(canon, vals, 8, 2, np.float32)
    assert r is canon and v is vals                            # the fast path copies nothing


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("kind", ["matrix", "array"])
def test_index_dtypes_and_scipy_kinds(index_dtype, kind):
    coos = coo_steps(SHAPE, 5, seed=11)
    p0 = np.random.default_rng(12).standard_normal(SHAPE)
    grads = [to_csr(SHAPE, r, c, v, np.float64, index_dtype, kind) for r, c, v in coos]
    assert grads[0].indices.dtype == index_dtype
    opt, p = run_fastadapt(CASES["Adam"], dict(lr=0.1), p0, grads)
    p_ref, _ = run_reference(CASES["Adam"], dict(lr=0.1), p0, coos, "lazy")
    assert_close(p, p_ref, 1e-12)


def test_row_grad_on_nd_parameter():
    p0 = np.random.default_rng(13).standard_normal((6, 2, 3)).astype(np.float32)
    rows = np.array([4, 0, 4])
    values = np.random.default_rng(14).standard_normal((3, 2, 3)).astype(np.float32)
    p1, p2 = p0.copy(), p0.copy()
    fa.Adam([p1], lr=0.1).step([fa.RowGrad(rows, values)])
    fa.Adam([p2], lr=0.1).step([fa.RowGrad(rows, values.reshape(3, 6))])   # (k, prod(shape[1:])) too
    q = p0.reshape(6, 6).copy()
    st = ref.init_state("adam", q)
    ref.lazy_step(ref.adam, q, None, *ref.row_grad_to_coo(rows, values.reshape(3, 6)), st, lr=0.1)
    assert_close(p1.reshape(6, 6), q, 1e-5)
    assert np.array_equal(p1, p2)
    with pytest.raises(ValueError, match="CSR gradient needs a 1-D or 2-D"):
        fa.Adam([p1]).step([sp.csr_matrix((6, 6))])


def test_row_grad_fast_path_equals_general_path():
    """Sorted unique rows (zero copy) and the same rows shuffled give the same step bit for bit."""
    rng = np.random.default_rng(15)
    rows = np.sort(rng.choice(40, 10, replace=False))
    values = rng.standard_normal((10, 4))
    perm = rng.permutation(10)
    p1 = rng.standard_normal((40, 4))
    p2 = p1.copy()
    fa.RMSprop([p1], centered=True).step([fa.RowGrad(rows, values)])
    fa.RMSprop([p2], centered=True).step([fa.RowGrad(rows[perm], values[perm])])
    assert np.array_equal(p1, p2)


def test_row_grad_constructor_checks():
    with pytest.raises(ValueError, match="one row per row id"):
        fa.RowGrad([1, 2], np.zeros((3, 4)))
    with pytest.raises(ValueError, match="must be 1-D"):
        fa.RowGrad([[1, 2]], np.zeros((2, 4)))
    assert "k=2" in repr(fa.RowGrad([1, 2], np.zeros((2, 4))))


# --------------------------------------------------------------------------------------------------
# mixed steps, switching modes, pending decay, state_dict
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lazy", "exact"])
def test_mixed_dense_and_sparse_in_one_step_and_across_steps(mode):
    """Params dense and sparse in one step(); one param alternates dense / CSR / RowGrad / None."""
    rng = np.random.default_rng(16)
    shape = (6, 4)
    a0, b0 = rng.standard_normal(shape), rng.standard_normal(shape)
    a, b = a0.copy(), b0.copy()
    hyper = dict(lr=0.01, centered=True)
    opt = fa.RMSprop([a, b], sparse_mode=mode, **hyper)
    ra, rb = a0.copy(), b0.copy()
    sa, sb = ref.init_state("rmsprop", ra, **hyper), ref.init_state("rmsprop", rb, **hyper)
    coos = coo_steps(shape, 8, seed=17)
    for i, (r, c, v) in enumerate(coos):
        dense = rng.standard_normal(shape)
        kind = ("csr", "dense", "rows", "csr", "none", "rows", "dense", "csr")[i]
        if kind == "csr":
            ga = to_csr(shape, r, c, v, np.float64)
        elif kind == "rows":
            ga = fa.RowGrad(r[::-1], np.tile(v[::-1, None], (1, shape[1])))
            r, c, v = ref.row_grad_to_coo(r[::-1], np.tile(v[::-1, None], (1, shape[1])))
        elif kind == "dense":
            ga = dense * 0.5
        else:
            ga = None
        opt.step([ga, dense])
        ref.rmsprop(rb, dense, sb, **hyper)
        if kind == "dense":
            ref.rmsprop(ra, dense * 0.5, sa, **hyper)
        elif kind in ("csr", "rows"):
            (ref.lazy_step(ref.rmsprop, ra, None, r, c, v, sa, **hyper) if mode == "lazy"
             else ref.exact_step(ref.rmsprop, ra, r, c, v, sa, **hyper))
    assert_close(a, ra, 1e-12)
    assert_close(b, rb, 1e-12)
    assert_state_matches(opt, a, sa, 1e-12)
    assert_state_matches(opt, b, sb, 1e-12)


def test_pending_decay_settled_when_hyper_parameters_or_mode_change():
    rng = np.random.default_rng(18)
    p0 = rng.standard_normal((8, 3))
    p = p0.copy()
    opt = fa.RMSprop([p], lr=0.01, sparse_mode="exact", centered=True)
    q = p0.copy()
    st = ref.init_state("rmsprop", q, centered=True)
    schedule = [dict(alpha=0.99), dict(alpha=0.99), dict(alpha=0.5), dict(alpha=0.5, sparse_mode="lazy"),
                dict(alpha=0.5, sparse_mode="exact"), dict(alpha=0.5, momentum=0.5), dict(momentum=0.0)]
    for i, upd in enumerate(schedule):
        opt.param_groups[0].update(upd)
        h = {"lr": 0.01, "centered": True, "alpha": opt.param_groups[0]["alpha"],
             "momentum": opt.param_groups[0]["momentum"]}
        rows = rng.integers(0, 7, 2)
        values = rng.standard_normal((2, 3))
        opt.step([fa.RowGrad(rows, values)])
        r, c, v = ref.row_grad_to_coo(rows, values)
        if opt.param_groups[0]["sparse_mode"] == "lazy":
            ref.lazy_step(ref.rmsprop, q, None, r, c, v, st, **h)
        else:
            ref.exact_step(ref.rmsprop, q, r, c, v, st, **h)
    assert_close(p, q, 1e-12)
    assert_state_matches(opt, p, st, 1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_state_dict_round_trip_with_pending_decay(dtype):
    rng = np.random.default_rng(19)
    shape = (9, 4)
    p0 = rng.standard_normal(shape).astype(dtype)
    hyper = dict(lr=0.01, alpha=0.9, centered=True)
    coos = coo_steps(shape, 10, seed=20)
    grads = [to_csr(shape, r, c, v, dtype) for r, c, v in coos]
    p = p0.copy()
    opt = fa.RMSprop([p], sparse_mode="exact", **hyper)
    for g in grads[:6]:
        opt.step([g])
    assert opt.state[0]["_decay"].pending              # decay pending on untouched rows
    sd = opt.state_dict()
    assert "_decay" not in sd["state"][0]
    q = p.copy()
    opt2 = fa.RMSprop([q], sparse_mode="exact", **hyper)
    opt2.load_state_dict(sd)
    for g in grads[6:]:
        opt.step([g])
        opt2.step([g])
    assert np.array_equal(p, q)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert s1.keys() == s2.keys()
    for k in s1:
        assert np.array_equal(s1[k], s2[k]), k
    p_ref, st_ref = run_reference(CASES["RMSprop"], hyper, p0, coos, "exact")
    assert_close(p, p_ref, RTOL[np.dtype(dtype)])
    assert_state_matches(opt, p, st_ref, RTOL[np.dtype(dtype)])


@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("dtype,bad", [
    (np.float64, lambda: sp.csr_matrix(([np.nan], [1], [0, 0, 1, 1, 1, 1, 1, 1]), shape=SHAPE)),
    (np.float64, lambda: fa.RowGrad([2], np.full((1, 5), np.inf))),
    (np.float32, lambda: sp.csr_matrix(([1e300], [1], [0, 0, 1, 1, 1, 1, 1, 1]), shape=SHAPE)),  # inf once cast
], ids=["csr-nan", "rows-inf", "cast-overflow"])
def test_nonfinite_skip_and_raise_with_sparse_gradients(policy, dtype, bad):
    p = np.zeros(SHAPE, dtype)
    opt = fa.RMSprop([p], nonfinite=policy, sparse_mode="exact")
    opt.step([fa.RowGrad([0], np.ones((1, 5)))])
    before = snapshot(opt, [p])
    if policy == "skip":
        assert opt.step([bad()]) is False
        before = (before[0], before[1], before[2] + 1)
    else:
        with pytest.raises(FloatingPointError):
            opt.step([bad()])
    assert_unchanged(before, opt, [p])
    assert opt.step([fa.RowGrad([0], np.ones((1, 5)))]) is True     # and it carries on
    assert opt.state_of(p)["step"] == 2


def test_finite_after_cast_is_not_skipped():
    p = np.zeros(SHAPE)
    g = sp.csr_matrix(([1e300], [1], [0, 0, 1, 1, 1, 1, 1, 1]), shape=SHAPE)
    assert fa.Adam([p], nonfinite="raise").step([g]) is True


# --------------------------------------------------------------------------------------------------
# hostile input: a clear exception, nothing changed
# --------------------------------------------------------------------------------------------------


def _hand_csr(data, indices, indptr, shape):
    """A CSR object holding exactly these arrays (scipy checks neither bounds nor order then)."""
    g = sp.csr_matrix(shape, dtype=np.float64)
    g.data, g.indices, g.indptr = np.asarray(data), np.asarray(indices), np.asarray(indptr)
    return g


def _h(data, indices, indptr):
    """A hand-built CSR of SHAPE with int32 index arrays (or the given arrays as they are)."""
    as_index = (lambda a: np.asarray(a, np.int32) if isinstance(a, list) else a)
    return _hand_csr(data, as_index(indices), as_index(indptr), SHAPE)


HOSTILE = [
    ("shape", lambda: sp.csr_matrix((5, 7)), ValueError, "shape"),
    ("1-d shape", lambda: sp.csr_matrix((7, 5)), ValueError, r"\(1, 35\)"),   # for the 1-D parameter
    ("column too large", lambda: _h([1.0], [5], [0, 1, 1, 1, 1, 1, 1, 1]), IndexError, "column index 5"),
    ("column negative", lambda: _h([1.0], [-1], [0, 0, 1, 1, 1, 1, 1, 1]), IndexError, "column index -1"),
    ("indptr decreasing", lambda: _h([1.0, 2.0], [0, 1], [0, 2, 1, 2, 2, 2, 2, 2]), ValueError,
     "decreases at row 1"),
    ("indptr past nnz", lambda: _h([1.0], [0], [0, 1, 1, 1, 1, 1, 1, 9]), ValueError, "points past"),
    ("indptr start", lambda: _h([1.0], [0], [1, 1, 1, 1, 1, 1, 1, 1]), ValueError, r"indptr\[0\]"),
    ("indptr length", lambda: _h([1.0], [0], [0, 1, 1]), ValueError, "indptr has 3 entries"),
    ("indices vs data", lambda: _h([1.0, 2.0], [0], [0, 1, 1, 1, 1, 1, 1, 1]), ValueError,
     "indices has 1 entries but data has 2"),
    ("float indices", lambda: _h([1.0], np.array([0.0]), [0, 1, 1, 1, 1, 1, 1, 1]), TypeError,
     "indices must be an integer"),
    ("integer data", lambda: sp.csr_matrix(np.ones(SHAPE, np.int64)), TypeError, "integer dtype"),
    ("complex data", lambda: sp.csr_matrix(np.ones(SHAPE, np.complex128)), TypeError, "complex dtype"),
    ("bool data", lambda: sp.csr_matrix(np.ones(SHAPE, bool)), TypeError, "boolean dtype"),
    ("csc", lambda: sp.csc_matrix(np.ones(SHAPE)), TypeError, "tocsr"),
    ("coo", lambda: sp.coo_array(np.ones(SHAPE)), TypeError, "tocsr"),
    ("row id too large", lambda: fa.RowGrad([7], np.ones((1, 5))), IndexError, "row id 7"),
    ("row id negative", lambda: fa.RowGrad([0, -1], np.ones((2, 5))), IndexError, "row id -1"),
    ("huge uint row id", lambda: fa.RowGrad(np.array([2**64 - 1], np.uint64), np.ones((1, 5))), IndexError,
     "out of range"),
    ("float row ids", lambda: fa.RowGrad([1.0], np.ones((1, 5))), TypeError, "integer array"),
    ("row values shape", lambda: fa.RowGrad([1], np.ones((1, 4))), ValueError, "shape"),
    ("row integer values", lambda: fa.RowGrad([1], np.ones((1, 5), np.int32)), TypeError, "integer dtype"),
    ("row complex values", lambda: fa.RowGrad([1], np.ones((1, 5), np.complex64)), TypeError, "complex dtype"),
]


@pytest.mark.parametrize("make,exc,match", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
@pytest.mark.parametrize("mode", ["lazy", "exact"])
def test_hostile_input_raises_and_changes_nothing(make, exc, match, mode):
    rng = np.random.default_rng(21)
    good, p, flat = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE), rng.standard_normal(35)
    opt = fa.RMSprop([good, p, flat], sparse_mode=mode, centered=True)
    for _ in range(2):     # state exists, and (exact) decay is pending
        opt.step([fa.RowGrad([1], np.ones((1, 5))), fa.RowGrad([2], np.ones((1, 5))),
                  sp.csr_matrix(([1.0], [3], [0, 1]), shape=(1, 35))])
    before = snapshot(opt, [good, p, flat])
    g = make()
    grads = [sp.csr_matrix(np.ones(SHAPE)), g, None]       # the good gradient comes first
    if match == r"\(1, 35\)":
        grads = [sp.csr_matrix(np.ones(SHAPE)), None, g]
    arrays = [a.copy() for a in (getattr(g, "data", None), getattr(g, "indices", None), getattr(g, "indptr", None))
              if isinstance(a, np.ndarray)]
    with pytest.raises(exc, match=match):
        opt.step(grads)
    assert_unchanged(before, opt, [good, p, flat])
    after = [a for a in (getattr(g, "data", None), getattr(g, "indices", None), getattr(g, "indptr", None))
             if isinstance(a, np.ndarray)]
    for a, b in zip(arrays, after):
        assert np.array_equal(a, b)


def test_values_sharing_memory_with_the_parameter_refused():
    p = np.zeros(SHAPE)
    with pytest.raises(ValueError, match="share memory"):
        fa.Adam([p]).step([fa.RowGrad([0], p[:1])])


def test_hostile_input_never_reaches_a_kernel_on_big_indices():
    """Indices far outside the table (a segfault if a kernel read them) are refused."""
    p = np.zeros((4, 3))
    g = _hand_csr([1.0], np.array([2**31 - 1], np.int32), np.array([0, 1, 1, 1, 1], np.int32), (4, 3))
    with pytest.raises(IndexError):
        fa.Adam([p], sparse_mode="exact").step([g])
    g = _hand_csr([1.0], np.array([0], np.int64), np.array([0, 1, 1, 1, 2**40], np.int64), (4, 3))
    with pytest.raises(ValueError, match="points past"):
        fa.Adam([p]).step([g])
    assert not p.any()


# --------------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("fmt", ["csr", "rows"])
def test_sparse_adam_vs_torch(fmt, dtype):
    pytest.importorskip("torch")
    hyper = dict(lr=0.05, betas=(0.8, 0.99))
    p0 = np.random.default_rng(22).standard_normal(SHAPE).astype(dtype)
    coos = coo_steps(SHAPE, 20, seed=23)
    if fmt == "csr":
        grads = [to_csr(SHAPE, r, c, v, dtype) for r, c, v in coos]
    else:   # one RowGrad row per stored entry, zero elsewhere in that row: touches whole rows
        grads, coos_rows = [], []
        for r, c, v in coos:
            values = np.zeros((len(r), SHAPE[1]))
            values[np.arange(len(r)), c] = v
            grads.append(fa.RowGrad(r, values))
            coos_rows.append(ref.row_grad_to_coo(r, values))
        coos = coos_rows
    opt, p = run_fastadapt(CASES["SparseAdam"], hyper, p0, grads)
    p_t, st_t = ref.torch_run("sparse_adam", p0, [(r, c, v.astype(dtype)) for r, c, v in coos], **hyper)
    assert_close(p, p_t, RTOL[np.dtype(dtype)], "param")
    st = opt.state_of(p)
    assert st["step"] == st_t["step"] == 20
    for k in ("exp_avg", "exp_avg_sq"):
        assert_close(st[k], st_t[k], RTOL[np.dtype(dtype)], k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", ["lazy", "exact"])
def test_sparse_adagrad_vs_torch(mode, dtype):
    pytest.importorskip("torch")
    hyper = dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.2)
    n = 13
    p0 = np.random.default_rng(24).standard_normal(n).astype(dtype)
    coos = coo_steps((1, n), 20, seed=25)
    grads = [to_csr((1, n), r, c, v, dtype) for r, c, v in coos]
    opt, p = run_fastadapt(CASES["Adagrad"], hyper, p0, grads, mode)
    p_t, st_t = ref.torch_run("sparse_adagrad", p0, [(r, c, v.astype(dtype)) for r, c, v in coos], **hyper)
    assert_close(p, p_t, RTOL[np.dtype(dtype)], "param")
    assert_close(opt.state_of(p)["sum"], st_t["sum"], RTOL[np.dtype(dtype)], "sum")
    assert opt.state_of(p)["step"] == st_t["step"]


# --------------------------------------------------------------------------------------------------
# loops: parallel variants, chunking, compile once, no allocation proportional to the table
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lazy", "exact"])
def test_parallel_loops_and_many_chunks_agree_with_reference(mode, monkeypatch):
    """(Every case's configurations of ``GROUPS`` in this mode.)"""
    """A 300-row table (several row chunks per thread) with the parallel lazy loops forced."""
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 1)
    shape = (300, 3)
    p0 = np.random.default_rng(26).standard_normal(shape).astype(np.float32)
    coos = coo_steps(shape, 6, seed=27)
    for case, group_mode, hyper in GROUPS:
        if group_mode != mode:
            continue
        name = config_id((case, hyper))
        grads = [to_csr(shape, r, c, v, np.float32) for r, c, v in coos]
        opt, p = run_fastadapt(case, hyper, p0, grads, mode)
        p_ref, st_ref = run_reference(case, hyper, p0, coos, mode)
        assert_close(p, p_ref, 1e-5, name)
        assert_state_matches(opt, p, st_ref, 1e-5)
        rows = np.unique(coos[0][0])
        opt, p = run_fastadapt(case, hyper, p0, [fa.RowGrad(rows, np.ones((rows.size, 3)))], mode)
        p_ref, st_ref = run_reference(case, hyper, p0, [ref.row_grad_to_coo(rows, np.ones((rows.size, 3)))], mode)
        assert_close(p, p_ref, 1e-5, name)


def test_second_step_compiles_nothing_new():
    p = np.zeros((20, 4), np.float32)
    opt = fa.Adam([p])
    loops = [cpu_sparse._csr_lazy_serial, cpu_sparse._rows_lazy_serial, cpu_sparse._csr_scan]
    g = sp.csr_matrix(np.eye(20, 4, dtype=np.float32))
    opt.step([g])
    opt.step([fa.RowGrad([3], np.ones((1, 4), np.float32))])
    counts = [len(f.signatures) for f in loops]
    for i in range(3):
        opt.step([sp.csr_matrix(np.eye(20, 4, k=i, dtype=np.float32))])
        opt.step([fa.RowGrad([i, i], np.ones((2, 4), np.float32))])
    assert [len(f.signatures) for f in loops] == counts


@pytest.mark.parametrize("kind", ["csr", "rows", "exact-rmsprop"])
def test_no_allocation_proportional_to_the_table(kind):
    """A step touching 20 rows of a 200 000-row table allocates O(touched), not O(table)
    (the CSR's own O(rows) indptr is the caller's; the scan only reads it)."""
    nrows, ncols = 200_000, 8
    p = np.zeros((nrows, ncols), np.float32)
    rows = np.sort(np.random.default_rng(28).choice(nrows, 20, replace=False))
    values = np.ones((20, ncols), np.float32)
    if kind == "csr":
        g = sp.csr_matrix((values.ravel(), np.tile(np.arange(ncols, dtype=np.int32), 20),
                           np.searchsorted(rows, np.arange(nrows + 1), side="left").astype(np.int32) * ncols),
                          shape=(nrows, ncols))
        opt = fa.Adam([p])
    else:
        g = fa.RowGrad(rows, values)
        opt = fa.RMSprop([p], sparse_mode="exact") if kind == "exact-rmsprop" else fa.SparseAdam([p])
    opt.step([g])                      # state created (that is O(table), once), loops compiled
    tracemalloc.start()
    try:
        for _ in range(3):
            opt.step([g])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak      # the table is 6.4 MB; a dense gradient would be all of it


def test_exact_fused_pass_never_builds_a_dense_gradient():
    nrows, ncols = 100_000, 8
    p = np.zeros((nrows, ncols), np.float32)
    opt = fa.Adam([p], sparse_mode="exact")
    g = fa.RowGrad([5, 70_000], np.ones((2, ncols), np.float32))
    opt.step([g])
    tracemalloc.start()
    try:
        opt.step([g])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak
    assert np.count_nonzero(opt.state_of(p)["exp_avg"]) == 2 * ncols   # decayed, still non-zero only there
    assert np.count_nonzero(p) == 2 * ncols
