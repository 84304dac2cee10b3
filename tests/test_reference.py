"""Proves tests/reference.py right: against torch.optim 2.13 (50 seeded steps, every option that matters,
float64 and float32) plus a few torch-free properties of the sparse helpers and of the RMSprop clamp."""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from conftest import DTYPES, DTYPE_IDS, RTOL, assert_close
from optimizers import DENSE, DENSE_TORCH, OPTIMIZERS, config_id, option_cases, rich_and_plain

N_STEPS = 50
SHAPE = (7, 5)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def dense_problem(dtype, seed, shape=SHAPE, n=N_STEPS):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(shape).astype(dtype)
    # gradients of varying magnitude, with a persistent per-element bias so that states grow
    bias = rng.standard_normal(shape)
    grads = [(bias + rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 1)).astype(dtype) for _ in range(n)]
    return p0, grads


def sparse_problem(dtype, seed, shape=SHAPE, n=N_STEPS, one_d=False):
    """COO gradients with duplicates, explicit zeros, and empty steps."""
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(shape).astype(dtype)
    nr, nc = (1, shape[0]) if one_d else shape
    grads = []
    for i in range(n):
        if i % 7 == 3:
            k = 0  # empty step
        else:
            k = int(rng.integers(1, 2 * nr * nc // 3))
        lin = rng.integers(0, nr * nc - 3, k)  # the last 3 coordinates are never touched
        rows, cols = lin // nc, lin % nc
        if k >= 4:  # force duplicates
            rows[-2:] = rows[0]
            cols[-2:] = cols[0]
        vals = rng.standard_normal(k) * 10.0 ** rng.uniform(-2, 1)
        if k >= 6:  # explicit zeros (one of them not duplicated with anything else, probably)
            vals[1] = 0.0
            vals[3] = 0.0
        grads.append((rows.astype(np.int64), cols.astype(np.int64), vals.astype(dtype)))
    return p0, grads




def assert_state_close(st_ref, st_torch, rtol):
    assert st_ref["step"] == st_torch["step"]
    keys_ref = {k for k in st_ref if k != "step"}                # buffers and carried scalars
    keys_t = {k for k in st_torch if k != "step"}
    assert keys_ref == keys_t
    for k in keys_ref:
        assert_close(st_ref[k], st_torch[k], rtol, k)


def run_dense(name, p0, grads, **hyper):
    p = p0.copy()
    st = ref.init_state(name, p, **hyper)
    fn = ref.DENSE_RULES[name]
    for g in grads:
        fn(p, g, st, **hyper)
    assert p.dtype == p0.dtype
    return p, st


def check_vs_torch(case, dtype, hyper, seed=0):
    """The reference (told about torch's quirks: ``case.torch_reference_hyper``) against torch."""
    torch = pytest.importorskip("torch")  # noqa: F841
    p0, grads = dense_problem(dtype, seed)
    p_ref, st_ref = run_dense(case.key, p0, grads, **case.torch_reference_hyper(hyper))
    p_t, st_t = case.torch_run(p0, grads, **hyper)
    assert np.all(np.isfinite(p_ref))
    assert st_ref["step"] == N_STEPS
    assert_close(p_ref, p_t, RTOL[np.dtype(dtype)], "param")
    assert_state_close(st_ref, st_t, RTOL[np.dtype(dtype)])
    assert not np.array_equal(p_ref, p0)


# --------------------------------------------------------------------------------------------------
# dense vs torch
# --------------------------------------------------------------------------------------------------


#: every option combination of every case with a dense torch counterpart, and its defaults
TORCH_GRID = option_cases(DENSE_TORCH) + [(c, {}) for c in DENSE_TORCH]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,hyper", TORCH_GRID, ids=map(config_id, TORCH_GRID))
def test_reference_vs_torch(case, hyper, dtype):
    check_vs_torch(case, dtype, hyper)


def test_adamw_default_weight_decay_is_used():
    p0, grads = dense_problem(np.float64, 3)
    p_w, _ = run_dense("adamw", p0, grads)
    p_a, _ = run_dense("adam", p0, grads)
    p_w2, _ = run_dense("adamw", p0, grads, weight_decay=1e-2)
    assert np.array_equal(p_w, p_w2)
    assert not np.allclose(p_w, p_a, rtol=1e-8, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_lr_change_mid_run_vs_torch(dtype):
    """hyper-parameters are read on every step (torch_run's `updates`)."""
    pytest.importorskip("torch")
    p0, grads = dense_problem(dtype, 5)
    hyper = dict(momentum=0.9, lr=0.01)
    p = p0.copy()
    st = ref.init_state("rmsprop", p, **hyper)
    updates = [None] * N_STEPS
    updates[20] = {"lr": 0.05}
    for i, g in enumerate(grads):
        ref.rmsprop(p, g, st, **dict(hyper, lr=0.05 if i >= 20 else 0.01))
    p_t, st_t = ref.torch_run("rmsprop", p0, grads, updates=updates, **hyper)
    assert_close(p, p_t, RTOL[np.dtype(dtype)])
    assert_state_close(st, st_t, RTOL[np.dtype(dtype)])


# --------------------------------------------------------------------------------------------------
# sparse vs torch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("one_d", [False, True], ids=["2d", "1d"])
@pytest.mark.parametrize("betas,maximize", [((0.9, 0.999), False), ((0.9, 0.999), True), ((0.3, 0.9), False)])
def test_sparse_adam_vs_torch(dtype, one_d, betas, maximize):
    pytest.importorskip("torch")
    shape = (11,) if one_d else SHAPE
    p0, grads = sparse_problem(dtype, 1, shape=shape, one_d=one_d)
    hyper = dict(lr=1e-2, betas=betas, maximize=maximize)
    p = p0.copy()
    st = ref.init_state("sparse_adam", p, **hyper)
    ever = np.zeros(ref.shape2d_of(p), dtype=bool)
    for r, c, v in grads:
        ref.sparse_adam(p, r, c, v, st, **hyper)
        ever |= ref.coalesce(ref.shape2d_of(p), r, c, v)[0]
    assert st["step"] == N_STEPS
    p_t, st_t = ref.torch_run("sparse_adam", p0, grads, **hyper)
    assert_close(p, p_t, RTOL[np.dtype(dtype)], "param")
    assert_state_close(st, st_t, RTOL[np.dtype(dtype)])
    # never-touched entries are bit-identical to p0 (both sides)
    never = ~ever.reshape(p.shape)
    assert never.any()
    assert np.array_equal(p[never], p0[never]) and np.array_equal(p_t[never], p0[never])


def test_sparse_adam_differs_from_dense_adam_with_full_gradients():
    """negative control: the epsilon-hat form is not Adam's (the spec, "SparseAdam")."""
    p0, grads = dense_problem(np.float64, 2)
    grads = [g * 1e-7 for g in grads]  # eps vs eps/sqrt(bc2) only shows when sqrt(v) is not >> eps
    rows, cols = np.nonzero(np.ones(SHAPE, dtype=bool))
    p_s = p0.copy()
    st_s = ref.init_state("sparse_adam", p_s)
    for g in grads:
        ref.sparse_adam(p_s, rows, cols, g.ravel(), st_s)
    p_d, _ = run_dense("adam", p0, grads)
    assert np.max(np.abs(p_s - p_d)) > 1e-6


def test_sparse_adam_explicit_zeros_and_empty_steps_matter():
    """negative controls: dropping explicit zeros / not counting empty steps changes the result."""
    p0, grads = sparse_problem(np.float64, 4)
    assert any(len(v) == 0 for _, _, v in grads) and any((v == 0).any() for _, _, v in grads)

    def run(gs):
        p = p0.copy()
        st = ref.init_state("sparse_adam", p)
        for r, c, v in gs:
            ref.sparse_adam(p, r, c, v, st)
        return p

    base = run(grads)
    nozeros = run([(r[v != 0], c[v != 0], v[v != 0]) for r, c, v in grads])
    noempty = run([g for g in grads if len(g[2])])
    assert np.max(np.abs(base - nozeros)) > 1e-8
    assert np.max(np.abs(base - noempty)) > 1e-8


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("one_d", [False, True], ids=["2d", "1d"])
@pytest.mark.parametrize("lr_decay,iav,maximize", [(0.0, 0.0, False), (0.1, 0.0, True), (0.05, 0.3, False)])
def test_sparse_adagrad_vs_torch(dtype, one_d, lr_decay, iav, maximize):
    pytest.importorskip("torch")
    shape = (11,) if one_d else SHAPE
    p0, grads = sparse_problem(dtype, 2, shape=shape, one_d=one_d)
    hyper = dict(lr=0.05, lr_decay=lr_decay, initial_accumulator_value=iav, maximize=maximize)
    p_t, st_t = ref.torch_run("sparse_adagrad", p0, grads, **hyper)
    results = {}
    for mode in ("sparse", "lazy", "exact"):
        p = p0.copy()
        st = ref.init_state("adagrad", p, **hyper)
        for r, c, v in grads:
            if mode == "sparse":
                ref.sparse_adagrad(p, r, c, v, st, **hyper)
            elif mode == "lazy":
                ref.lazy_step(ref.adagrad, p, None, r, c, v, st, **hyper)
            else:
                ref.exact_step(ref.adagrad, p, r, c, v, st, **hyper)
        assert_close(p, p_t, RTOL[np.dtype(dtype)], f"{mode} param")
        assert_state_close(st, st_t, RTOL[np.dtype(dtype)])
        results[mode] = (p, st)
    # without weight decay a zero gradient is a no-op, so lazy == exact bit for bit
    assert np.array_equal(results["lazy"][0], results["exact"][0])
    assert np.array_equal(results["lazy"][1]["sum"], results["exact"][1]["sum"])


def test_sparse_adagrad_rejects_weight_decay():
    p = np.zeros(SHAPE)
    st = ref.init_state("adagrad", p)
    with pytest.raises(RuntimeError):
        ref.sparse_adagrad(p, [0], [0], [1.0], st, weight_decay=0.1)


# --------------------------------------------------------------------------------------------------
# torch-free properties
# --------------------------------------------------------------------------------------------------

#: (case, options): the rich and the plain config of every case with a dense rule
LAZY_CASES = [(c, o) for c, _, o in rich_and_plain(DENSE)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,hyper", LAZY_CASES, ids=map(config_id, LAZY_CASES))
def test_lazy_step_leaves_untouched_bit_identical(dtype, case, hyper):
    fn = case.lazy_rule()
    p0, grads = sparse_problem(dtype, 7)
    p = p0.copy()
    st = case.init_state(p, **hyper)
    # warm the state up densely so that untouched state is non-trivial
    for g in dense_problem(dtype, 8, n=5)[1]:
        fn(p, g, st, **hyper)
    for i, (r, c, v) in enumerate(grads):
        before_p = p.copy()
        before = {k: a.copy() for k, a in st.items() if isinstance(a, np.ndarray)}
        step0 = st["step"]
        touched, _ = ref.coalesce(SHAPE, r, c, v)
        if case.algorithm.rows:             # a row rule moves a touched row whole; state per row
            touched = np.repeat(touched.any(axis=1, keepdims=True), SHAPE[1], axis=1)
        ref.lazy_step(fn, p, SHAPE, r, c, v, st, **hyper)
        assert st["step"] == step0 + 1
        u = ~touched
        assert p[u].tobytes() == before_p[u].tobytes()
        for k, a in before.items():
            mask = u[:, 0] if case.algorithm.rows else u
            assert st[k][mask].tobytes() == a[mask].tobytes(), k
        if touched.any() and np.any(v != 0):
            assert not np.array_equal(p[touched], before_p[touched])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,hyper", LAZY_CASES, ids=map(config_id, LAZY_CASES))
def test_full_csr_equals_dense_step(dtype, case, hyper):
    """exact_step (and lazy_step) with a CSR holding every entry once is exactly the dense step."""
    scipy_sparse = pytest.importorskip("scipy.sparse")
    fn = ref.DENSE_RULES[case.key]
    p0, grads = dense_problem(dtype, 9, n=20)
    grads[4][0, 0] = 0.0  # a stored zero must still be there
    p_d = p0.copy()
    st_d = case.init_state(p_d, **hyper)
    p_e, st_e = p0.copy(), case.init_state(p0, **hyper)
    p_l, st_l = p0.copy(), case.init_state(p0, **hyper)
    for g in grads:
        fn(p_d, g, st_d, **hyper)
        rows, cols = np.nonzero(np.ones(SHAPE, dtype=bool))
        csr = scipy_sparse.csr_matrix((g[rows, cols], (rows, cols)), shape=SHAPE)
        assert csr.nnz == g.size
        coo = csr.tocoo()
        ref.exact_step(fn, p_e, coo.row, coo.col, coo.data, st_e, **hyper)
        perm = np.random.default_rng(0).permutation(coo.nnz)  # order must not matter
        ref.lazy_step(fn, p_l, SHAPE, coo.row[perm], coo.col[perm], coo.data[perm], st_l, **hyper)
    for p_x, st_x in ((p_e, st_e), (p_l, st_l)):
        np.testing.assert_array_equal(p_x, p_d)
        assert st_x.keys() == st_d.keys() and st_x["step"] == st_d["step"]
        for k, a in st_d.items():
            if isinstance(a, np.ndarray):
                np.testing.assert_array_equal(st_x[k], a)


def test_coalesce_sums_duplicates_keeps_zeros_and_casts():
    rows = [0, 2, 0, 1, 0]
    cols = [1, 3, 1, 0, 1]
    vals = np.array([1.0, 0.0, 2.5, -0.0, 1e-30], dtype=np.float64)
    touched, g = ref.coalesce((3, 4), rows, cols, vals, dtype=np.float32)
    assert g.dtype == np.float32 and touched.dtype == bool
    expect_t = np.zeros((3, 4), dtype=bool)
    expect_t[0, 1] = expect_t[2, 3] = expect_t[1, 0] = True
    np.testing.assert_array_equal(touched, expect_t)
    assert g[0, 1] == np.float32((1.0 + 2.5) + np.float32(1e-30))
    assert g[2, 3] == 0 and g[1, 0] == 0 and np.signbit(g[1, 0])
    assert g.sum() == g[0, 1]
    with pytest.raises(IndexError):
        ref.coalesce((3, 4), [3], [0], [1.0])
    with pytest.raises(IndexError):
        ref.coalesce((3, 4), [0], [-1], [1.0])


def test_row_grad_to_coo():
    vals = np.arange(6, dtype=np.float32).reshape(2, 3)
    r, c, v = ref.row_grad_to_coo([4, 1], vals)
    np.testing.assert_array_equal(r, [4, 4, 4, 1, 1, 1])
    np.testing.assert_array_equal(c, [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(v, vals.ravel())


def test_empty_sparse_step_advances_step_only():
    """A lazy step with no stored entries advances the count and leaves the parameter and every state
    array bit for bit as they were: zeros, or the initial fill where the state starts filled (Ftrl's
    accumulator holds initial_accumulator_value = 0.1 from the start, as Keras builds it)."""
    p0, _ = dense_problem(np.float64, 11)
    for case in OPTIMIZERS:
        p = p0.copy()
        st = case.init_state(p)
        st0 = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
        e = np.zeros(0, dtype=np.int64)
        case.sparse_reference(p, e, e, np.zeros(0), st, "lazy")
        assert st["step"] == 1
        assert np.array_equal(p, p0)
        for k, a in st.items():
            if isinstance(a, np.ndarray):
                # the state the algorithm declares: its fill (zeros but for Adagrad's sum, Ftrl's accumulator)
                fill = case.algorithm.fill(case.group(), k)
                assert np.array_equal(a, np.full(case.algorithm.state_shape(p0.shape), fill, p0.dtype)), (case.name, k)
                if k in st0:
                    assert a.tobytes() == st0[k].tobytes(), (case.name, k)


def test_lazy_step_creates_missing_state_full_size():
    p = np.ones(SHAPE)
    st = {"step": 0}
    ref.lazy_step(ref.adam, p, None, [1], [2], [0.5], st, amsgrad=True)
    assert set(st) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert st[k].shape == SHAPE and np.count_nonzero(st[k]) == 1 and st[k][1, 2] != 0


def test_rmsprop_centered_clamp_only_differs_where_negative():
    """clamp=True vs clamp=False differ exactly where v - gavg**2 < 0 (constant gradients provoke it)."""
    rng = np.random.default_rng(12)
    shape = (20, 10)
    g = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3, shape)  # constant per element
    # with a constant g, v - gavg**2 = g**2 (1 - a**t) a**t > 0 mathematically; it reaches rounding level
    # (and goes negative) once a**t < ~1e-16, i.e. after ~55 steps at a = 0.5
    hyper = dict(lr=1e-3, alpha=0.5, centered=True)
    p = rng.standard_normal(shape)
    st = ref.init_state("rmsprop", p, **hyper)
    n_neg = 0
    for _ in range(150):
        p_f, st_f = p.copy(), {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
        with np.errstate(invalid="ignore"):
            ref.rmsprop(p_f, g, st_f, clamp=False, **hyper)
        ref.rmsprop(p, g, st, clamp=True, **hyper)
        neg = ref.fma(-st["grad_avg"], st["grad_avg"], st["square_avg"]) < 0    # torch's addcmul: one rounding
        n_neg += int(neg.sum())
        # the states are the same either way; only the parameter can differ
        for k in ("square_avg", "grad_avg"):
            assert np.array_equal(st[k], st_f[k])
        assert np.all(np.isfinite(p))
        assert np.array_equal(p[~neg], p_f[~neg])
        assert np.all(np.isnan(p_f[neg]))
    assert n_neg > 0


def test_rmsprop_clamp_propagates_nan():
    p = np.zeros(3)
    st = ref.init_state("rmsprop", p, centered=True)
    with np.errstate(invalid="ignore"):
        ref.rmsprop(p, np.array([1.0, np.nan, np.inf]), st, centered=True)
    assert np.isfinite(p[0]) and np.isnan(p[1]) and np.isnan(p[2])


class _F32Only(np.ndarray):
    """ndarray that fails on any ufunc that involves or produces float64 (catches silent promotion)."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        for x in inputs:
            if isinstance(x, (np.ndarray, np.generic)) and x.dtype == np.float64:
                raise AssertionError(f"float64 operand in {ufunc.__name__}")
        args = [x.view(np.ndarray) if isinstance(x, _F32Only) else x for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, _F32Only) else o for o in kwargs["out"])
        res = getattr(ufunc, method)(*args, **kwargs)
        for r in res if isinstance(res, tuple) else (res,):
            if isinstance(r, (np.ndarray, np.generic)) and r.dtype.kind == "f":
                assert r.dtype == np.float32, f"{ufunc.__name__} produced {r.dtype}"
        if isinstance(res, np.ndarray) and res.dtype == np.float32:
            return res.view(_F32Only)
        return res


#: every option combination of the dense cases, also as the reference runs it against torch
F32_CASES = option_cases(DENSE) + [(c, c.torch_reference_hyper(o)) for c, o in option_cases(DENSE)
                                   if c.torch_reference_hyper(o) != o]


@pytest.mark.parametrize("case,hyper", F32_CASES, ids=map(config_id, F32_CASES))
def test_float32_never_promoted(case, hyper):
    p0, grads = dense_problem(np.float32, 13, n=3)
    p = p0.copy().view(_F32Only)
    st = {k: (v.view(_F32Only) if isinstance(v, np.ndarray) else v) for k, v in case.init_state(p0, **hyper).items()}
    for g in grads:
        case.reference(p, g.view(_F32Only), st, **hyper)
    assert p.dtype == np.float32


def test_sparse_rules_float32_never_promoted():
    p0, grads = sparse_problem(np.float32, 14, n=8)
    p = p0.copy().view(_F32Only)
    st = {k: (v.view(_F32Only) if isinstance(v, np.ndarray) else v) for k, v in ref.init_state("sparse_adam", p0).items()}
    for r, c, v in grads:
        ref.sparse_adam(p, r, c, v, st, maximize=True)
        ref.sparse_adagrad(p, r, c, v, {"step": 0, "sum": np.zeros_like(p0).view(_F32Only)}, lr_decay=0.1)


def test_init_state_keys():
    p = np.zeros(SHAPE, dtype=np.float32)
    assert set(ref.init_state("adagrad", p)) == {"step", "sum"}
    st = ref.init_state("adagrad", p, initial_accumulator_value=0.25, lr=1.0)
    assert st["sum"].dtype == np.float32 and np.all(st["sum"] == 0.25) and st["step"] == 0
    assert set(ref.init_state("rmsprop", p)) == {"step", "square_avg"}
    assert set(ref.init_state("rmsprop", p, momentum=0.5, centered=True)) == {
        "step", "square_avg", "momentum_buffer", "grad_avg"}
    assert set(ref.init_state("adam", p)) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(ref.init_state("adamw", p, amsgrad=True)) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert set(ref.init_state("sparse_adam", p)) == {"step", "exp_avg", "exp_avg_sq"}
    with pytest.raises(ValueError):
        ref.init_state("no_such_optimizer", p)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_lerp_branches(dtype):
    """ATen's two lerp formulas (the spec, "Conventions"); they round differently, so the branch is pinned here."""
    rng = np.random.default_rng(15)
    a = rng.standard_normal(1000).astype(dtype)
    b = rng.standard_normal(1000).astype(dtype)
    dt = np.dtype(dtype).type
    for w in (dt(0.1), dt(0.49), dt(-0.3)):
        assert np.array_equal(ref.lerp(a, b, w), a + w * (b - a))
    for w in (dt(0.5), dt(0.7), dt(1 - 0.3)):
        assert np.array_equal(ref.lerp(a, b, w), b - (b - a) * (dt(1) - w))
    w = dt(0.7)
    assert not np.array_equal(a + w * (b - a), b - (b - a) * (dt(1) - w))
    assert ref.lerp(a, b, w).dtype == dtype


def test_fma_is_one_rounding():
    """The references' fma (the hardware instruction) is the exact rational definition rounded once,
    and differs from rounding the product first where a product and an addend nearly cancel."""
    from fastadapt.algorithms import fma as exact
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        a = rng.standard_normal(400).astype(dtype)
        b = rng.standard_normal(400).astype(dtype)
        c = (-(a.astype(np.float64) * b) * (1 + rng.standard_normal(400) * 1e-6)).astype(dtype)
        fused = ref.fma(a, b, c)
        assert fused.dtype == dtype
        assert all(fused[i] == exact(a[i], b[i], c[i]) for i in range(400))
        assert np.count_nonzero(fused != a * b + c) > 300

