"""fastadapt against torch.optim 2.13 itself: 50 steps, every option combination, float32 and float64,
within the spec's tolerances ("Agreement with torch.optim") (rel. 1e-5 float32, 1e-12 float64), step counts equal. Also param
groups, lr schedules, None gradients and both CPU loops. Skipped when torch is not importable."""

from __future__ import annotations

import numpy as np
import pytest

from fastadapt import config

from conftest import DTYPES, DTYPE_IDS, RTOL, assert_close
import reference as ref
from optimizers import DENSE_TORCH, config_id, option_cases

torch = pytest.importorskip("torch")

N_STEPS = 50


def problem(shape, dtype, steps=N_STEPS, seed=0):
    rng = np.random.default_rng(seed)
    p0 = np.array(rng.standard_normal(shape), dtype=dtype)
    bias = rng.standard_normal(shape)
    grads = [np.array(bias + rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 1), dtype=dtype)
             for _ in range(steps)]
    return p0, grads




def fastadapt_run(case, p0, grads, updates=None, **hyper):
    p = p0.copy()
    opt = case.cls([p], **hyper)
    for i, g in enumerate(grads):
        if updates is not None and updates[i]:
            opt.param_groups[0].update(updates[i])
        opt.step([g])
    return p, opt.state[0]


def check(case, dtype, hyper, shape=(7, 5), seed=0, grads_edit=None, updates=None):
    p0, grads = problem(shape, dtype, seed=seed)
    if grads_edit is not None:
        grads = grads_edit(grads)
    p, state = fastadapt_run(case, p0, grads, updates=updates, **hyper)
    p_t, state_t = case.torch_run(p0, grads, updates=updates, **hyper)
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


#: every option combination of every case with a dense torch counterpart, and its defaults
GRID = option_cases(DENSE_TORCH) + [(c, {}) for c in DENSE_TORCH]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,hyper", GRID, ids=map(config_id, GRID))
def test_50_steps_match_torch(case, hyper, dtype):
    p, p0 = check(case, dtype, hyper)
    assert not np.array_equal(p, p0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(), (1,), (33,), (2, 3, 4)], ids=["0d", "1", "33", "2x3x4"])
@pytest.mark.parametrize("case", DENSE_TORCH, ids=str)
def test_shapes_and_the_parallel_loop_match_torch(case, shape, dtype, monkeypatch):
    """The rich config of every case."""
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 16)           # sizes >= 16 take the prange loop
    check(case, dtype, case.rich, shape=shape, seed=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def _schedules():
    """(case, options, key, {step: value}): from the plain config, lr raised then lowered, and each
    of the rich config's schedulable hyper-parameters switched to its rich value and back."""
    out = []
    for c in DENSE_TORCH:
        plain = c.plain
        out.append((c, plain, "lr", {10: plain["lr"] * 5, 30: plain["lr"] / 10}))
        for key in c.schedulable():
            out.append((c, plain, key, {5: c.rich[key], 40: c.group(plain)[key]}))
        out.append((c, dict(c.rich), "lr", {25: c.rich["lr"] / 5}))
    return out


SCHEDULES = _schedules()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,hyper,key,values", SCHEDULES, ids=[f"{c.name}-{k}-{i}" for i, (c, _, k, _) in
                                                                  enumerate(SCHEDULES)])
def test_schedule_matches_torch(case, hyper, key, values, dtype):
    updates = [({key: values[i]} if i in values else None) for i in range(N_STEPS)]
    check(case, dtype, hyper, updates=updates, seed=5)


@pytest.mark.parametrize("case", DENSE_TORCH, ids=str)
def test_none_gradients_match_torch(case):
    """torch skips a parameter whose .grad is None: no state change, no step counted."""
    def holes(grads):
        return [None if i % 7 in (0, 3) else g for i, g in enumerate(grads)]
    check(case, np.float64, dict(lr=1e-2), grads_edit=holes, seed=6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", DENSE_TORCH, ids=str)
def test_param_groups_match_torch(case, dtype):
    """A plain group and a rich one (other lr); what torch reads at construction only (Adagrad's
    initial_accumulator_value) is given to the constructor."""
    rich = dict(case.rich, lr=3e-3)
    common = {k: rich.pop(k) for k in case.constructor_only if k in rich}
    group_hyper = [dict(lr=1e-2), rich]
    rng = np.random.default_rng(7)
    shapes = [(4,), (3, 3), (5,)]
    ps0 = [np.array(rng.standard_normal(s), dtype=dtype) for s in shapes]
    ps = [p.copy() for p in ps0]
    opt = case.cls([{"params": ps[:1], **group_hyper[0]}, {"params": ps[1:], **group_hyper[1]}], **common)
    tps = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in ps0]
    topt = getattr(torch.optim, case.name)([{"params": tps[:1], **group_hyper[0]},
                                            {"params": tps[1:], **group_hyper[1]}], **common)
    for i in range(N_STEPS):
        grads = [np.array(rng.standard_normal(s), dtype=dtype) for s in shapes]
        if i % 9 == 4:
            grads[2] = None
        opt.step(grads)
        for t, g in zip(tps, grads):
            t.grad = None if g is None else torch.from_numpy(g.copy())
        with ref.torch_default_dtype(dtype):
            topt.step()
    for j, (p, t) in enumerate(zip(ps, tps)):
        assert_close(p, t.detach().numpy(), RTOL[np.dtype(dtype)], f"param {j}")
        if "step" in topt.state[t]:                           # (torch's SGD keeps no count)
            assert opt.state[j]["step"] == int(topt.state[t]["step"])
