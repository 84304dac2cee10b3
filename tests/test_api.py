"""The optimizer API around the kernels: validation and bad inputs (nothing is written before the error),
param groups, hyper-parameter schedules, None gradients, the non-finite policies, Adagrad's eager
state, the int64 step counter, the centered-RMSprop clamp, the functional layer and repr."""

from __future__ import annotations

import copy
import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastadapt as fa
from fastadapt import config
from fastadapt import functional as F

import reference as ref
from conftest import DTYPES, DTYPE_IDS, RTOL, assert_close
from optimizers import CASES, DENSE, FUNCTIONAL, OPTIMIZERS

#: one configuration per optimizer that creates every state buffer: the table's rich config
FULL = {c.name: (c.cls, dict(c.rich)) for c in DENSE}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def grads_like(params, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [np.array(rng.standard_normal(p.shape) * scale, dtype=p.dtype) for p in params]


def params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def snapshot(opt):
    """Everything a step may write: parameter values, state, groups, skip counter."""
    return ([p.copy() for p in params_of(opt)], copy.deepcopy(opt.state),
            copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
            opt.skipped_steps)


def assert_unchanged(opt, snap, groups_too=True, skipped_delta=0):
    params, state, groups, skipped = snap
    for j, (now, before) in enumerate(zip(params_of(opt), params)):
        assert now.dtype == before.dtype and np.array_equal(now, before, equal_nan=True), f"parameter {j} changed"
    assert len(opt.state) == len(state)
    for j, (now, before) in enumerate(zip(opt.state, state)):
        assert now.keys() == before.keys(), f"state {j} keys changed"
        for k in now:
            if isinstance(now[k], np.ndarray):
                assert np.array_equal(now[k], before[k], equal_nan=True), f"state {j} {k} changed"
            else:
                assert now[k] == before[k], f"state {j} {k} changed"
    if groups_too:
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    assert opt.skipped_steps == skipped + skipped_delta


def started(name, dtype=np.float64, steps=2, **extra):
    """An optimizer with two param groups (three parameters) that has taken ``steps`` steps."""
    cls, hyper = FULL[name]
    hyper = dict(hyper, **extra)
    rng = np.random.default_rng(1)
    ps = [np.array(rng.standard_normal(s), dtype=dtype) for s in [(5,), (2, 3), ()]]
    opt = cls([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.02}], **hyper)
    for i in range(steps):
        opt.step(grads_like(ps, seed=10 + i))
    return opt, ps




# --------------------------------------------------------------------------------------------------
# constructor validation
# --------------------------------------------------------------------------------------------------

#: every hyper-parameter the algorithms declare as a real number >= 0
NEGATIVE = [(c.cls, k) for c in OPTIMIZERS for k in c.nonneg_hypers()]
#: the classes with a ``betas`` pair
WITH_BETAS = [c.cls for c in OPTIMIZERS if c.has_hyper("betas")]


@pytest.mark.parametrize("cls,key", NEGATIVE, ids=[f"{c.__name__}-{k}" for c, k in NEGATIVE])
def test_negative_hyper_parameter_rejected(cls, key):
    with pytest.raises(ValueError, match=rf"invalid {key}: -0\.1.*>= 0"):
        cls([np.zeros(3)], **{key: -0.1})
    with pytest.raises(ValueError, match=f"{key} must not be NaN"):
        cls([np.zeros(3)], **{key: float("nan")})
    for bad in ("0.1", None, True, [0.1]):
        with pytest.raises(TypeError, match=f"{key} must be a real number"):
            cls([np.zeros(3)], **{key: bad})


@pytest.mark.parametrize("cls", WITH_BETAS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("betas", [(1.0, 0.999), (0.9, 1.0), (-0.1, 0.999), (0.9, -1e-9), (0.9, 1.5)])
def test_betas_outside_unit_interval_rejected(cls, betas):
    with pytest.raises(ValueError, match=r"beta[12] \(betas\[[01]\]\).*must be"):
        cls([np.zeros(3)], betas=betas)


@pytest.mark.parametrize("cls", WITH_BETAS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("betas", [0.9, (0.9,), (0.9, 0.99, 0.999), "ab"])
def test_betas_not_a_pair_rejected(betas, cls):
    with pytest.raises(TypeError, match="betas must be a pair"):
        cls([np.zeros(3)], betas=betas)


def test_boundary_values_accepted_like_torch():
    """torch accepts lr = 0, eps = 0, betas = (0, 0), alpha > 1 (only >= 0 is checked)."""
    fa.Adam([np.zeros(3)], lr=0.0, eps=0.0, betas=(0.0, 0.0), weight_decay=0.0)
    fa.Adam([np.zeros(3)], betas=[0.5, 0.5])          # a list is a pair too
    fa.RMSprop([np.zeros(3)], alpha=1.5, eps=0.0)
    fa.Adagrad([np.zeros(3)], lr=0.0, eps=0.0)


def test_sparse_adam_needs_positive_lr_and_eps():
    with pytest.raises(ValueError, match="lr"):
        fa.SparseAdam([np.zeros(3)], lr=0.0)
    with pytest.raises(ValueError, match="eps"):
        fa.SparseAdam([np.zeros(3)], eps=0.0)


@pytest.mark.parametrize("cls", [c.cls for c in OPTIMIZERS], ids=lambda c: c.__name__)
def test_nonfinite_option_validated(cls):
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        cls([np.zeros(3)], nonfinite="ignore")


def test_sparse_mode_validated():
    with pytest.raises(ValueError, match="sparse_mode must be one of"):
        fa.Adam([np.zeros(3)], sparse_mode="eager")


def test_params_argument_validated():
    with pytest.raises(TypeError, match=r"not an array itself.*Adam\(\[w\]\)"):
        fa.Adam(np.zeros(3))
    with pytest.raises(ValueError, match="empty parameter list"):
        fa.Adam([])
    with pytest.raises(TypeError, match="numpy arrays or CUDA arrays"):
        fa.Adam([[0.0, 1.0]])
    with pytest.raises(TypeError, match=r"unknown hyper-parameter.*'momentum'"):
        fa.Adam([{"params": [np.zeros(3)], "momentum": 0.9}])
    with pytest.raises(ValueError, match="needs a 'params' entry"):
        fa.Adam([{"lr": 0.1}])
    opt = fa.Adam([np.zeros(3)])
    with pytest.raises(TypeError, match="must be a dict"):
        opt.add_param_group([np.zeros(3)])


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float16, np.complex128, bool])
def test_non_float_parameter_rejected(dtype):
    with pytest.raises(TypeError, match=r"float32 or float64.*astype"):
        fa.Adam([np.zeros(4, dtype=dtype)])


@pytest.mark.parametrize("make", [lambda: np.zeros((4, 6))[:, ::2], lambda: np.zeros((4, 6)).T,
                                  lambda: np.zeros(10)[::-1]], ids=["strided", "transposed", "reversed"])
def test_non_contiguous_parameter_rejected(make):
    with pytest.raises(ValueError, match="not C-contiguous.*ascontiguousarray"):
        fa.RMSprop([make()])


def test_read_only_parameter_rejected():
    p = np.zeros(4)
    p.setflags(write=False)
    with pytest.raises(ValueError, match="read-only.*writeable"):
        fa.Adagrad([p])


def test_same_array_twice_rejected():
    a = np.zeros(10)
    with pytest.raises(ValueError, match="parameters 0 and 1 share memory"):
        fa.Adam([a, a])
    with pytest.raises(ValueError, match="share memory"):
        fa.Adam([a, a.reshape(2, 5)])                         # a view of the same buffer
    with pytest.raises(ValueError, match="share memory"):
        fa.Adam([{"params": [a]}, {"params": [np.zeros(2), a], "lr": 0.1}])
    with pytest.raises(ValueError, match="share memory"):
        fa.Adam([a[0:6], a[4:10]])                            # overlapping slices
    fa.Adam([a[0:5], a[5:10]])                                # adjacent, disjoint slices are fine
    fa.Adam([np.zeros(0), np.zeros(0)])                       # empty arrays overlap nothing


def test_add_param_group_rejects_known_parameter_and_changes_nothing():
    opt, ps = started("Adam")
    snap = snapshot(opt)
    n_groups = len(opt.param_groups)
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [np.zeros(3), ps[1]]})
    with pytest.raises(ValueError, match=r"invalid lr"):
        opt.add_param_group({"params": [np.zeros(3)], "lr": -1.0})
    with pytest.raises(TypeError, match="float32 or float64"):
        opt.add_param_group({"params": [np.zeros(3), np.zeros(3, dtype=np.int32)]})
    assert len(opt.param_groups) == n_groups
    assert_unchanged(opt, snap)
    opt.step(grads_like(ps))                                  # still usable, same parameter count


# --------------------------------------------------------------------------------------------------
# bad input at step(): a clear exception, nothing written (no partial step across parameters)
# --------------------------------------------------------------------------------------------------


def _bad_grads(ps):
    """(description, gradients, exception, message pattern); the bad gradient is always the LAST one,
    so a step that wrote before checking would already have changed parameters 0 and 1."""
    good = grads_like(ps, seed=99)
    cases = []

    def with_last(g, j=len(ps) - 1):
        gs = list(good)
        gs[j] = g
        return gs

    cases.append(("wrong shape", with_last(np.zeros((1,), ps[2].dtype)), ValueError, r"gradient 2 has shape \(1,\)"))
    other = np.float32 if ps[2].dtype == np.float64 else np.float64
    cases.append(("wrong dtype", with_last(np.zeros((), other)), TypeError, r"gradient 2 has dtype.*astype"))
    cases.append(("integer gradient", with_last(np.zeros((), np.int64)), TypeError, "gradient 2 has dtype int64"))
    cases.append(("non-contiguous", with_last(np.zeros((3, 2), ps[1].dtype).T, 1), ValueError,
                  "gradient 1 is not C-contiguous"))
    cases.append(("the parameter itself", with_last(ps[2]), ValueError,
                  "gradient 2 shares memory with its parameter"))
    cases.append(("a view of the parameter", with_last(ps[1][:], 1), ValueError, "gradient 1 shares memory"))
    alias = ps[0].reshape(-1)[:ps[2].size].reshape(ps[2].shape)   # a view of ANOTHER parameter
    cases.append(("another parameter's memory", with_last(alias), ValueError,
                  "gradient 2 shares memory with parameter 0"))
    cases.append(("a list", with_last([0.0]), TypeError, "gradient 2 has unsupported type list"))
    cases.append(("a Python float", with_last(1.0), TypeError, "gradient 2 has unsupported type float"))
    cases.append(("too few", good[:-1], ValueError, "got 2 gradients for 3 parameters"))
    cases.append(("too many", good + [good[0]], ValueError, "got 4 gradients for 3 parameters"))
    cases.append(("a bare array", good[0], TypeError, r"opt\.step\(\[g\]\)"))
    return cases


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", sorted(FULL))
def test_bad_gradient_raises_and_writes_nothing(name, dtype):
    opt, ps = started(name, dtype)
    for what, grads, exc, pattern in _bad_grads(ps):
        snap = snapshot(opt)
        with pytest.raises(exc, match=pattern):
            opt.step(grads)
        assert_unchanged(opt, snap)
    opt.step(grads_like(ps))                                  # and the optimizer still works
    assert opt.state[0]["step"] == 3


#: the table's refused values (plus a NaN lr and an unknown sparse_mode for every optimizer)
BAD_GROUP_VALUES = {c.name: c.refused for c in DENSE}
#: what the error message names, where it is not the key itself
_NAMED = {"betas": "beta", "sparse_mode": "sparse_mode"}


@pytest.mark.parametrize("name", sorted(FULL))
def test_bad_hyper_parameter_set_between_steps_raises_and_writes_nothing(name):
    """Hyper-parameters are read (and checked) at every step, in every group, before anything is written."""
    opt, ps = started(name)
    grads = grads_like(ps, seed=5)
    for key, value in BAD_GROUP_VALUES[name]:
        snap = snapshot(opt)
        old = opt.param_groups[1][key]
        opt.param_groups[1][key] = value                      # the LAST group is bad
        with pytest.raises((ValueError, TypeError), match=_NAMED.get(key, key)):
            opt.step(grads)
        opt.param_groups[1][key] = old
        assert_unchanged(opt, snap)
    assert opt.step(grads) is True


# --------------------------------------------------------------------------------------------------
# param groups, schedules, None gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_param_groups_use_their_own_hyper_parameters(dtype):
    rng = np.random.default_rng(3)
    ps = [np.array(rng.standard_normal(s), dtype=dtype) for s in [(6,), (2, 2), (3,)]]
    groups = [dict(), dict(lr=0.05, betas=(0.5, 0.9), amsgrad=True), dict(weight_decay=0.1, maximize=True)]
    opt = fa.Adam([{"params": [ps[0]]}, {"params": [ps[1]], **groups[1]}, {"params": [ps[2]], **groups[2]}],
                  lr=0.01, betas=(0.8, 0.99))
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[1]["lr"] == 0.05
    assert opt.param_groups[2]["betas"] == (0.8, 0.99) and opt.param_groups[2]["amsgrad"] is False
    assert set(opt.param_groups[1]) == set(opt.defaults) | {"params"}
    qs = [p.copy() for p in ps]
    hypers = [dict(dict(lr=0.01, betas=(0.8, 0.99)), **g) for g in groups]
    sts = [ref.init_state("adam", q, **h) for q, h in zip(qs, hypers)]
    for i in range(8):
        grads = grads_like(ps, seed=i)
        opt.step(grads)
        for q, g, s, h in zip(qs, grads, sts, hypers):
            ref.adam(q, g, s, **h)
    for p, q in zip(ps, qs):
        assert_close(p, q, RTOL[np.dtype(dtype)])
    assert "max_exp_avg_sq" in opt.state[1] and "max_exp_avg_sq" not in opt.state[0]


def test_add_param_group_later_starts_its_own_count():
    a, b = np.ones(4), np.ones(3)
    opt = fa.Adam([a], lr=0.1)
    for i in range(3):
        opt.step([np.full(4, 0.5)])
    opt.add_param_group({"params": b, "lr": 0.2})             # a single array is a one-parameter group
    assert opt.state[1] == {}
    opt.step([np.full(4, 0.5), np.full(3, 0.5)])
    assert opt.state[0]["step"] == 4 and opt.state[1]["step"] == 1
    q, st_ref = np.ones(3), {}
    ref.adam(q, np.full(3, 0.5), st_ref, lr=0.2)
    assert_close(b, q, 1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def _schedules():
    """(name, key, values): starting from the rich config, lr moved up and down, and every other
    option of the rich config switched between its plain and rich values (buffers appear
    mid-run: momentum, amsgrad, centered)."""
    out = []
    for c in DENSE:
        lr = c.rich.get("lr", c.algorithm.defaults["lr"])
        out.append((c.name, "lr", [lr, 5 * lr, 5 * lr, lr / 10, 2 * lr]))
        for key, b in c.rich.items():
            if key != "lr" and key not in c.constructor_only:
                a = c.group(c.plain)[key]
                if c.valid(dict(c.rich, **{key: a})):        # (SGD: nesterov needs momentum)
                    out.append((c.name, key, [a, b, b, a, b]))
    return out


SCHEDULES = _schedules()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name,key,values", SCHEDULES, ids=[f"{n}-{k}" for n, k, _ in SCHEDULES])
def test_schedule_changes_take_effect_at_the_next_step(name, key, values, dtype):
    cls, hyper = FULL[name]
    rng = np.random.default_rng(8)
    p0 = np.array(rng.standard_normal(11), dtype=dtype)
    other0 = np.array(rng.standard_normal(4), dtype=dtype)
    p, other = p0.copy(), other0.copy()
    opt = cls([{"params": [other]}, {"params": [p]}], **hyper)       # only group 1 follows the schedule
    q, q_other = p0.copy(), other0.copy()
    st_ref = CASES[name].init_state(q, **hyper)
    st_other = CASES[name].init_state(q_other, **hyper)
    for i, v in enumerate(values):
        opt.param_groups[1][key] = v
        g, g_other = grads_like([p, other], seed=i)
        opt.step([g_other, g])
        CASES[name].reference(q, g, st_ref, **dict(hyper, **{key: v}))
        CASES[name].reference(q_other, g_other, st_other, **hyper)
        assert_close(p, q, RTOL[np.dtype(dtype)])
        assert_close(other, q_other, RTOL[np.dtype(dtype)])


@pytest.mark.parametrize("name", sorted(FULL))
def test_none_gradient_skips_the_parameter_and_its_step_count(name):
    cls, hyper = FULL[name]
    rng = np.random.default_rng(4)
    ps0 = [rng.standard_normal(5), rng.standard_normal(3)]
    ps = [p.copy() for p in ps0]
    opt = cls(ps, **hyper)
    qs = [p.copy() for p in ps0]
    sts = [CASES[name].init_state(q, **hyper) for q in qs]
    pattern = [(True, False), (True, True), (False, True), (True, False), (True, True)]
    for i, mask in enumerate(pattern):
        grads = grads_like(ps, seed=i)
        opt.step([g if use else None for g, use in zip(grads, mask)])
        for q, g, s, use in zip(qs, grads, sts, mask):
            if use:
                CASES[name].reference(q, g, s, **hyper)
        if i == 0:                                             # never stepped: untouched, no state made
            assert np.array_equal(ps[1], ps0[1])
            eager = CASES[name].algorithm.eager_state               # Adagrad: state made at construction
            assert set(opt.state[1]) == (set(CASES[name].buffers(hyper)) | {"step"} if eager else set())
            assert opt.state[1].get("step", 0) == 0
    assert [s["step"] for s in opt.state] == [4, 3]
    for p, q in zip(ps, qs):
        assert_close(p, q, 1e-12)


def test_all_none_gradients_change_nothing():
    opt, ps = started("Adam")
    snap = snapshot(opt)
    assert opt.step([None, None, None]) is True
    assert_unchanged(opt, snap)


# --------------------------------------------------------------------------------------------------
# non-finite gradients (the spec, "Non-finite gradients")
# --------------------------------------------------------------------------------------------------

NONFINITE_VALUES = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("loop", ["serial", "parallel"])
@pytest.mark.parametrize("bad", NONFINITE_VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", sorted(FULL))
def test_nonfinite_skip_changes_nothing_and_continues_as_if_never_seen(name, bad, loop, monkeypatch):
    if loop == "parallel":
        monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 16)
    cls, hyper = FULL[name]
    rng = np.random.default_rng(6)
    ps0 = [rng.standard_normal(40), rng.standard_normal((5, 8))]
    ps, clean = [p.copy() for p in ps0], [p.copy() for p in ps0]
    opt = cls(ps, nonfinite="skip", **hyper)
    opt_clean = cls(clean, **hyper)
    for i in range(4):
        grads = grads_like(ps, seed=i)
        if i == 2:
            snap = snapshot(opt)
            poisoned = [grads[0], grads[1].copy()]
            poisoned[1][4, 7] = bad                            # the last element of the second gradient
            assert opt.step(poisoned) is False
            assert_unchanged(opt, snap, skipped_delta=1)
        assert opt.step(grads) is True
        opt_clean.step(grads)
    assert opt.skipped_steps == 1
    for p, q in zip(ps, clean):
        assert np.array_equal(p, q)
    for s, s_clean in zip(opt.state, opt_clean.state):
        assert s["step"] == s_clean["step"] == 4
        for k in s:
            if k != "step":
                assert np.array_equal(s[k], s_clean[k])


@pytest.mark.parametrize("loop", ["serial", "parallel"])
@pytest.mark.parametrize("bad", NONFINITE_VALUES, ids=["nan", "inf", "-inf"])
def test_nonfinite_raise(bad, loop, monkeypatch):
    if loop == "parallel":
        monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 16)
    ps = [np.ones(40), np.ones(20), np.ones(3)]
    opt = fa.Adam(ps, nonfinite="raise")
    opt.step(grads_like(ps))
    snap = snapshot(opt)
    grads = grads_like(ps, seed=1)
    grads[1][19] = bad
    with pytest.raises(FloatingPointError, match=r"non-finite gradient for parameter\(s\) \[1\].*nothing was changed"):
        opt.step(grads)
    assert_unchanged(opt, snap)
    grads[1][19] = 0.0
    assert opt.step([None, grads[1], grads[2]]) is True        # None gradients are not scanned
    assert [s["step"] for s in opt.state] == [1, 2, 2]


def test_nonfinite_propagate_is_torchs_behaviour():
    p = np.zeros(5)
    opt = fa.Adam([p], lr=0.1)                                 # nonfinite="propagate" is the default
    assert opt.nonfinite == "propagate"
    g = np.array([1.0, np.nan, np.inf, -np.inf, 1.0])
    assert opt.step([g]) is True
    q, st_ref = np.zeros(5), {}
    with np.errstate(invalid="ignore"):
        ref.adam(q, g, st_ref, lr=0.1)
    np.testing.assert_array_equal(p, q)                        # NaN where the reference has NaN
    assert np.isnan(p[1:4]).all() and np.isfinite(p[[0, 4]]).all()
    assert opt.skipped_steps == 0 and opt.state[0]["step"] == 1


# --------------------------------------------------------------------------------------------------
# Adagrad's eager state, per-group initial_accumulator_value (the spec, "Adagrad")
# --------------------------------------------------------------------------------------------------


def test_adagrad_state_is_eager_and_per_group_initial_accumulator_is_honoured():
    a, b = np.ones(3), np.ones((2, 2), np.float32)
    opt = fa.Adagrad([{"params": [a]}, {"params": [b], "initial_accumulator_value": 0.5}],
                     initial_accumulator_value=0.1)
    sd = opt.state_dict()
    assert sd["state"][0]["step"] == 0 and sd["state"][1]["step"] == 0
    np.testing.assert_array_equal(sd["state"][0]["sum"], np.full(3, 0.1))
    np.testing.assert_array_equal(sd["state"][1]["sum"], np.full((2, 2), 0.5, np.float32))
    assert sd["state"][1]["sum"].dtype == np.float32
    c, d = np.ones(2), np.ones(2)
    opt.add_param_group({"params": [c], "initial_accumulator_value": 2.0})
    opt.add_param_group({"params": [d]})
    np.testing.assert_array_equal(opt.state[2]["sum"], [2.0, 2.0])
    np.testing.assert_array_equal(opt.state[3]["sum"], [0.1, 0.1])
    ivs = [0.1, 0.5, 2.0, 0.1]
    qs = [np.ones(3), np.ones((2, 2), np.float32), np.ones(2), np.ones(2)]
    sts = [ref.init_state("adagrad", q, initial_accumulator_value=v) for q, v in zip(qs, ivs)]
    for i in range(3):
        grads = grads_like([a, b, c, d], seed=i)
        opt.step(grads)
        for q, g, s in zip(qs, grads, sts):
            ref.adagrad(q, g, s)
    for p, q in zip([a, b, c, d], qs):
        assert_close(p, q, RTOL[p.dtype])


# --------------------------------------------------------------------------------------------------
# the int64 step counter (the spec, "The step counter")
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [2**24, 2**24 + 7, 2**40])
def test_step_counter_advances_past_float32_range(start):
    """torch's float32 step stops at 2**24; fastadapt's counter is an int and bias correction sees it.

    With beta1 = 1 - 1e-8, 1 - beta1**t still changes measurably with t around 2**24, so using
    t = start + 1 (not start, as a stuck float32 counter would) shows in the parameter."""
    hyper = dict(lr=1.0, betas=(1 - 1e-8, 1 - 1e-9))
    rng = np.random.default_rng(2)
    m, v = rng.standard_normal(6) * 0.1, rng.random(6) + 0.5
    p = np.ones(6)
    opt = fa.Adam([p], **hyper)
    opt.load_state_dict({"state": {0: {"step": start, "exp_avg": m, "exp_avg_sq": v}},
                         "param_groups": [dict(opt.state_dict()["param_groups"][0])]})
    g = rng.standard_normal(6)
    for k in (1, 2):
        opt.step([g])
        assert opt.state[0]["step"] == start + k and type(opt.state[0]["step"]) is int
    q, st_ref = np.ones(6), {"step": start, "exp_avg": m.copy(), "exp_avg_sq": v.copy()}
    stuck, st_stuck = np.ones(6), {"step": start - 1, "exp_avg": m.copy(), "exp_avg_sq": v.copy()}
    for _ in range(2):
        ref.adam(q, g, st_ref, **hyper)
        ref.adam(stuck, g, st_stuck, **hyper)
        st_stuck["step"] = start - 1                           # a counter that cannot advance
    assert_close(p, q, 1e-12)
    if start <= 2**30:                                         # beyond that 1 - beta**t no longer moves
        assert not np.allclose(p, stuck, rtol=1e-12, atol=0)
    assert opt.state_dict()["state"][0]["step"] == start + 2


def test_functional_step_counter_is_an_int():
    p, q = np.ones(4), np.ones(4)
    m, v = np.full(4, 0.1), np.full(4, 0.2)
    F.adam(p, np.full(4, 0.3), m.copy(), v.copy(), step=2**24 + 1, lr=1.0, betas=(1 - 1e-8, 0.999))
    st_ref = {"step": 2**24, "exp_avg": m.copy(), "exp_avg_sq": v.copy()}
    ref.adam(q, np.full(4, 0.3), st_ref, lr=1.0, betas=(1 - 1e-8, 0.999))
    assert_close(p, q, 1e-12)


# --------------------------------------------------------------------------------------------------
# centered RMSprop: v - g_avg**2 clamped at 0 (the spec, "RMSprop")
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_centered_rmsprop_clamp(alpha):
    """Constant gradients make v - g_avg**2 round below 0: torch (and the unclamped reference) return NaN,
    fastadapt clamps and stays finite, equal to the clamped reference."""
    rng = np.random.default_rng(1)
    c = rng.standard_normal(200) * 10 ** rng.uniform(-1, 3, 200)
    hyper = dict(alpha=alpha, centered=True)
    p = np.zeros(200)
    opt = fa.RMSprop([p], **hyper)
    q, q_torchlike = np.zeros(200), np.zeros(200)
    st_ref = ref.init_state("rmsprop", q, **hyper)
    st_torchlike = ref.init_state("rmsprop", q_torchlike, **hyper)
    with np.errstate(invalid="ignore"):
        for _ in range(60):
            opt.step([c])
            ref.rmsprop(q, c, st_ref, **hyper)
            ref.rmsprop(q_torchlike, c, st_torchlike, clamp=False, **hyper)
    assert np.isnan(q_torchlike).sum() > 10                    # the clamp was exercised
    assert np.isfinite(p).all()
    np.testing.assert_array_equal(p, q)
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    p_t, _ = ref.torch_run("rmsprop", np.zeros(200), [c], steps=60, **hyper)
    assert np.isnan(p_t).any()                                 # torch does not clamp


def test_centered_rmsprop_clamp_lets_nan_through():
    p = np.zeros(3)
    opt = fa.RMSprop([p], centered=True)
    opt.step([np.array([1.0, np.nan, 2.0])])
    assert np.isnan(p[1]) and np.isfinite(p[[0, 2]]).all()


# --------------------------------------------------------------------------------------------------
# functional layer
# --------------------------------------------------------------------------------------------------


def _functional_run(case, p, grads, hyper):
    """Run fastadapt.functional with caller-kept state; return the state buffers.

    Every buffer the algorithm declares (its slots, under the functional layer's argument names),
    filled as the algorithm fills them (Adagrad: initial_accumulator_value, which only sets up
    state and is therefore no argument of the function)."""
    alg = case.algorithm
    group = case.group(hyper)
    bufs = {n: np.full(alg.state_shape(p.shape), alg.fill(group, n), p.dtype) for n in alg.slots if n is not None}
    args = {alg.functional_args.get(n, n): b for n, b in bufs.items()}
    takes = {h.name for h in alg.hypers if h.functional}
    carry = dict(alg.carry)                 # carried scalars (NAdam's mu_product): returned, passed back
    for t, g in enumerate(grads, 1):
        out = case.functional(p, g, step=t, **args, **carry, **{k: v for k, v in hyper.items() if k in takes})
        if alg.carry:
            carry = out
    return bufs


#: every functional function: defaults, the whole option grid and the rich config
FUNCTIONAL_CASES = [(c, o) for c in FUNCTIONAL if c.dense for o in [{}] + list(c.options) + [dict(c.rich)]]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,hyper", FUNCTIONAL_CASES, ids=[f"{c.name}-{i}" for i, (c, _) in enumerate(FUNCTIONAL_CASES)])
def test_functional_matches_reference_and_the_class(case, hyper, dtype):
    rng = np.random.default_rng(9)
    p0 = np.array(rng.standard_normal((3, 7)), dtype=dtype)
    grads = [np.array(rng.standard_normal((3, 7)), dtype=dtype) for _ in range(6)]
    p = p0.copy()
    bufs = _functional_run(case, p, grads, dict(hyper))
    q = p0.copy()
    st_ref = case.init_state(q, **hyper)
    for g in grads:
        case.reference(q, g, st_ref, **hyper)
    assert_close(p, q, RTOL[np.dtype(dtype)])
    for k, v in st_ref.items():
        if isinstance(v, np.ndarray):
            assert_close(bufs[k], v, RTOL[np.dtype(dtype)])
    cls = case.cls
    c = p0.copy()
    opt = cls([c], **hyper)
    for g in grads:
        opt.step([g])
    assert np.array_equal(c, p)                                # the same kernel: bit-identical
    assert p.dtype == dtype


def test_functional_adamw_default_weight_decay():
    rng = np.random.default_rng(0)
    p0, g = rng.standard_normal(5), rng.standard_normal(5)
    a, b = p0.copy(), p0.copy()
    z = np.zeros(5)
    F.adamw(a, g, z.copy(), z.copy(), step=1)
    F.adam(b, g, z.copy(), z.copy(), step=1, weight_decay=1e-2, decoupled_weight_decay=True)
    assert np.array_equal(a, b)


def _functional_bad_calls():
    p, g = np.ones(4), np.full(4, 0.5)
    z = np.zeros(4)
    return [
        ("step 0", lambda: F.adam(p, g, z.copy(), z.copy(), step=0), ValueError, "step must be"),
        ("step negative", lambda: F.adagrad(p, g, z.copy(), step=-1), ValueError, "step must be"),
        ("step float", lambda: F.rmsprop(p, g, z.copy(), step=1.0), ValueError, "step must be"),
        ("step bool", lambda: F.adam(p, g, z.copy(), z.copy(), step=True), ValueError, "step must be"),
        ("negative lr", lambda: F.adam(p, g, z.copy(), z.copy(), step=1, lr=-1.0), ValueError, "invalid lr"),
        ("bad betas", lambda: F.adam(p, g, z.copy(), z.copy(), step=1, betas=(0.9, 1.0)), ValueError, "beta2"),
        ("negative alpha", lambda: F.rmsprop(p, g, z.copy(), step=1, alpha=-0.1), ValueError, "invalid alpha"),
        ("negative lr_decay", lambda: F.adagrad(p, g, z.copy(), step=1, lr_decay=-0.1), ValueError, "lr_decay"),
        ("no momentum buffer", lambda: F.rmsprop(p, g, z.copy(), step=1, momentum=0.9), ValueError,
         "momentum_buffer"),
        ("no grad_avg", lambda: F.rmsprop(p, g, z.copy(), step=1, centered=True), ValueError, "grad_avg"),
        ("no max buffer", lambda: F.adam(p, g, z.copy(), z.copy(), step=1, amsgrad=True), ValueError,
         "max_exp_avg_sq"),
        ("buffer shape", lambda: F.adam(p, g, np.zeros(5), z.copy(), step=1), ValueError, "exp_avg has shape"),
        ("buffer dtype", lambda: F.adagrad(p, g, np.zeros(4, np.float32), step=1), ValueError, "state_sum"),
        ("int buffer", lambda: F.adagrad(p, g, np.zeros(4, np.int64), step=1), TypeError, "state_sum"),
        ("grad shape", lambda: F.adam(p, np.ones(3), z.copy(), z.copy(), step=1), ValueError, "grad has shape"),
        ("grad dtype", lambda: F.adam(p, g.astype(np.float32), z.copy(), z.copy(), step=1), TypeError,
         "grad has dtype"),
        ("grad is param", lambda: F.adam(p, p, z.copy(), z.copy(), step=1), ValueError, "shares memory"),
        ("buffer is param", lambda: F.adam(p, g, p, z.copy(), step=1), ValueError, "param and exp_avg share memory"),
        ("same buffer twice", lambda: F.adam(p, g, z, z, step=1), ValueError, "exp_avg and exp_avg_sq share memory"),
        ("int param", lambda: F.adagrad(np.ones(4, np.int64), g, z.copy(), step=1), TypeError, "float32 or float64"),
        ("sparse grad", lambda: F.adam(p, pytest.importorskip("scipy.sparse").csr_matrix(np.ones((1, 4))),
                                       z.copy(), z.copy(), step=1), TypeError, "takes dense gradients"),
    ], p, z


def test_functional_bad_input_raises_and_writes_nothing():
    cases, p, z = _functional_bad_calls()
    for what, call, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            call()
        assert np.array_equal(p, np.ones(4)), what
        assert np.array_equal(z, np.zeros(4)), what


def test_functional_read_only_buffer_rejected():
    s = np.zeros(4)
    s.setflags(write=False)
    p = np.ones(4)
    with pytest.raises(ValueError, match="state_sum is read-only"):
        F.adagrad(p, np.ones(4), s, step=1)
    assert np.array_equal(p, np.ones(4))


def test_functional_docstring_example():
    result = doctest.testmod(F, verbose=False)
    assert result.attempted >= 1 and result.failed == 0


# --------------------------------------------------------------------------------------------------
# repr, state_of
# --------------------------------------------------------------------------------------------------


def test_repr_lists_groups_and_hyper_parameters():
    opt = fa.Adam([{"params": [np.zeros(2)]}, {"params": [np.zeros(3)], "lr": 0.5}], betas=(0.8, 0.9))
    text = repr(opt)
    assert text.startswith("Adam (") and text.endswith(")")
    assert "Parameter Group 0" in text and "Parameter Group 1" in text
    assert "    lr: 0.001" in text and "    lr: 0.5" in text and "betas: (0.8, 0.9)" in text
    assert "params" not in text
    assert repr(fa.RMSprop([np.zeros(1)])).startswith("RMSprop (")


def test_state_of():
    a, b = np.zeros(2), np.zeros(3)
    opt = fa.Adam([a, b])
    opt.step([np.ones(2), None])
    assert opt.state_of(a)["step"] == 1 and opt.state_of(b) == {}
    with pytest.raises(KeyError, match="not a parameter"):
        opt.state_of(np.zeros(2))


# --------------------------------------------------------------------------------------------------
# property-based: any invalid hyper-parameter is refused, at construction and at step()
# --------------------------------------------------------------------------------------------------

#: name -> the keys whose invalid values the property test draws (from the algorithm's declaration)
_NONNEG = {c.name: c.nonneg_hypers() for c in DENSE}


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_property_invalid_hyper_parameter_refused_before_any_write(data):
    name = data.draw(st.sampled_from(sorted(FULL)), label="optimizer")
    keys = _NONNEG[name] + (["betas"] if CASES[name].has_hyper("betas") else [])
    key = data.draw(st.sampled_from(keys), label="key")
    if key == "betas":
        bad = st.floats(allow_nan=False).filter(lambda x: not 0.0 <= x < 1.0)
        good = st.floats(0.0, 0.999)
        value = data.draw(st.one_of(st.tuples(bad, good), st.tuples(good, bad)), label="betas")
    else:
        value = data.draw(st.one_of(st.floats(max_value=-1e-300, allow_nan=False), st.just(float("nan")),
                                    st.integers(max_value=-1)), label="value")
    cls, hyper = FULL[name]
    with pytest.raises(ValueError):
        cls([np.zeros(3)], **dict(hyper, **{key: value}))
    opt, ps = started(name)
    snap = snapshot(opt)
    opt.param_groups[data.draw(st.integers(0, 1), label="group")][key] = value
    with pytest.raises(ValueError):
        opt.step(grads_like(ps))
    assert all(np.array_equal(a, b) for a, b in zip(params_of(opt), snap[0]))
    assert [s["step"] for s in opt.state] == [s["step"] for s in snap[1]]


def test_sgd_nesterov_needs_momentum_and_no_dampening():
    """torch's rule, checked at construction and when set between steps (nothing written)."""
    for kw in (dict(nesterov=True), dict(nesterov=True, momentum=0.9, dampening=0.5)):
        with pytest.raises(ValueError, match="(?i)nesterov"):
            fa.SGD([np.zeros(3)], lr=0.1, **kw)
    p = np.zeros(3)
    opt = fa.SGD([p], lr=0.1, momentum=0.9, nesterov=True)
    opt.step([np.ones(3)])
    snap = p.copy()
    opt.param_groups[0]["momentum"] = 0.0
    with pytest.raises(ValueError, match="(?i)nesterov"):
        opt.step([np.ones(3)])
    assert np.array_equal(p, snap) and opt.state[0]["step"] == 1



def test_row_rule_with_a_decay_plan_is_refused_at_validation():
    """A row rule runs lazily or in a fused pass; declaring a closed-form Decay is an error the
    group validation reports (before any step writes)."""
    from fastadapt.algorithms import BY_NAME, Decay
    alg = BY_NAME["RowwiseAdagrad"].variant(exact=lambda h: Decay(0.9, (True, False, False)))
    with pytest.raises(TypeError, match="LAZY or FUSED"):
        alg.check_group(dict(alg.defaults))
