"""fastadapt against torch.optim 2.13 itself: 50 steps, every option combination, float32 and float64,
within SPEC Part A.2's tolerances (rel. 1e-5 float32, 1e-12 float64), step counts equal. Also param
groups, lr schedules, None gradients and both CPU loops. Skipped when torch is not importable."""

from __future__ import annotations

import itertools
import os
import sys

import numpy as np
import pytest

import fastadapt as fa
from fastadapt import config

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

N_STEPS = 50
DTYPES = [np.float64, np.float32]
DTYPE_IDS = ["f64", "f32"]
RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}
CLASSES = {"adagrad": fa.Adagrad, "rmsprop": fa.RMSprop, "adam": fa.Adam, "adamw": fa.AdamW}
TORCH_CLASSES = {"adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam", "adamw": "AdamW"}


def problem(shape, dtype, steps=N_STEPS, seed=0):
    rng = np.random.default_rng(seed)
    p0 = np.array(rng.standard_normal(shape), dtype=dtype)
    bias = rng.standard_normal(shape)
    grads = [np.array(bias + rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 1), dtype=dtype)
             for _ in range(steps)]
    return p0, grads


def assert_close(actual, desired, rtol, what=""):
    """Relative error <= rtol elementwise, with the array's scale as absolute floor (see test_reference)."""
    assert actual.dtype == desired.dtype and actual.shape == desired.shape, what
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale, err_msg=what)


def fastadapt_run(name, p0, grads, updates=None, **hyper):
    p = p0.copy()
    opt = CLASSES[name]([p], **hyper)
    for i, g in enumerate(grads):
        if updates is not None and updates[i]:
            opt.param_groups[0].update(updates[i])
        opt.step([g])
    return p, opt.state[0]


def check(name, dtype, hyper, shape=(7, 5), seed=0, grads_edit=None, updates=None):
    p0, grads = problem(shape, dtype, seed=seed)
    if grads_edit is not None:
        grads = grads_edit(grads)
    p, state = fastadapt_run(name, p0, grads, updates=updates, **hyper)
    p_t, state_t = ref.torch_run(name, p0, grads, updates=updates, **hyper)
    rtol = RTOL[np.dtype(dtype)]
    assert p.dtype == dtype
    assert np.isfinite(p).all()
    assert_close(p, p_t, rtol, "param")
    assert state["step"] == state_t["step"]
    buffers = {k for k, v in state_t.items() if isinstance(v, np.ndarray)}
    assert buffers == {k for k in state if k != "step"}
    for k in buffers:
        assert_close(state[k], state_t[k], rtol, k)
    return p, p0


GRID = (
    [("adagrad", dict(lr=0.05, lr_decay=ld, weight_decay=wd, initial_accumulator_value=iav, maximize=mx))
     for ld, wd, iav, mx in itertools.product([0.0, 0.1], [0.0, 0.1], [0.0, 0.5], [False, True])]
    + [("rmsprop", dict(lr=1e-2, alpha=a, weight_decay=wd, momentum=mo, centered=c, maximize=mx))
       for a, wd, mo, c, mx in itertools.product([0.99, 0.3], [0.0, 0.1], [0.0, 0.9], [False, True], [False, True])]
    + [("adam", dict(lr=1e-2, betas=b, weight_decay=wd, decoupled_weight_decay=dec, amsgrad=ams, maximize=mx))
       for b, wd, dec, ams, mx in itertools.product([(0.9, 0.999), (0.3, 0.9)], [0.0, 0.1], [False, True],
                                                     [False, True], [False, True])]
    + [("adamw", dict(lr=1e-2, amsgrad=ams, maximize=mx, **({} if wd is None else {"weight_decay": wd})))
       for wd, ams, mx in itertools.product([None, 0.0, 0.1], [False, True], [False, True])]
    + [("adagrad", {}), ("rmsprop", {}), ("adam", {}), ("adamw", {})]          # all defaults
)


def _id(case):
    name, hyper = case
    return name + ("-" + "-".join(f"{k}={v}" for k, v in hyper.items() if k != "lr") if hyper else "-defaults")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_50_steps_match_torch(case, dtype):
    name, hyper = case
    p, p0 = check(name, dtype, hyper)
    assert not np.array_equal(p, p0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(), (1,), (33,), (2, 3, 4)], ids=["0d", "1", "33", "2x3x4"])
@pytest.mark.parametrize("name,hyper", [
    ("adagrad", dict(lr=0.05, lr_decay=0.1, weight_decay=0.1)),
    ("rmsprop", dict(alpha=0.9, momentum=0.9, centered=True)),
    ("adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    ("adamw", dict(lr=1e-2, amsgrad=True)),
], ids=["adagrad", "rmsprop", "adam", "adamw"])
def test_shapes_and_the_parallel_loop_match_torch(name, hyper, shape, dtype, monkeypatch):
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 16)           # sizes >= 16 take the prange loop
    check(name, dtype, hyper, shape=shape, seed=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name,hyper,key,values", [
    ("adam", dict(lr=1e-2), "lr", {10: 0.05, 30: 0.001}),
    ("adamw", dict(lr=1e-2, weight_decay=0.1), "lr", {10: 0.1, 30: 0.001}),
    ("rmsprop", dict(momentum=0.9), "lr", {20: 0.05}),
    ("adagrad", dict(lr=0.1, lr_decay=0.01), "lr", {25: 0.01}),
    ("adam", dict(lr=1e-2), "betas", {15: (0.5, 0.9)}),
    ("adam", dict(lr=1e-2), "weight_decay", {5: 0.1, 40: 0.0}),
])
def test_schedule_matches_torch(name, hyper, key, values, dtype):
    updates = [({key: values[i]} if i in values else None) for i in range(N_STEPS)]
    check(name, dtype, hyper, updates=updates, seed=5)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_none_gradients_match_torch(name):
    """torch skips a parameter whose .grad is None: no state change, no step counted."""
    def holes(grads):
        return [None if i % 7 in (0, 3) else g for i, g in enumerate(grads)]
    check(name, np.float64, dict(lr=1e-2), grads_edit=holes, seed=6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_param_groups_match_torch(name, dtype):
    group_hyper = {
        "adagrad": [dict(lr=0.1), dict(lr=0.02, lr_decay=0.1, weight_decay=0.1)],
        "rmsprop": [dict(lr=1e-2), dict(lr=3e-3, alpha=0.9, momentum=0.5, centered=True, maximize=True)],
        "adam": [dict(lr=1e-2), dict(lr=3e-3, betas=(0.5, 0.9), amsgrad=True, weight_decay=0.1)],
        "adamw": [dict(lr=1e-2), dict(lr=3e-3, weight_decay=0.3, maximize=True)],
    }[name]
    rng = np.random.default_rng(7)
    shapes = [(4,), (3, 3), (5,)]
    ps0 = [np.array(rng.standard_normal(s), dtype=dtype) for s in shapes]
    ps = [p.copy() for p in ps0]
    opt = CLASSES[name]([{"params": ps[:1], **group_hyper[0]}, {"params": ps[1:], **group_hyper[1]}])
    tps = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in ps0]
    topt = getattr(torch.optim, TORCH_CLASSES[name])([{"params": tps[:1], **group_hyper[0]},
                                                      {"params": tps[1:], **group_hyper[1]}])
    for i in range(N_STEPS):
        grads = [np.array(rng.standard_normal(s), dtype=dtype) for s in shapes]
        if i % 9 == 4:
            grads[2] = None
        opt.step(grads)
        for t, g in zip(tps, grads):
            t.grad = None if g is None else torch.from_numpy(g.copy())
        topt.step()
    for j, (p, t) in enumerate(zip(ps, tps)):
        assert_close(p, t.detach().numpy(), RTOL[np.dtype(dtype)], f"param {j}")
        assert opt.state[j]["step"] == int(topt.state[t]["step"])
