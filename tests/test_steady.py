"""The steady-state step (fastadapt.optim.steady) against the general path it stands in for.

Every test runs the same history twice -- once as users get it (after the first step the
optimizer runs its plan) and once with plans switched off (every step through the general path
of fastadapt.optim.base) -- and requires the same arrays, bit for bit, and the same exceptions
with the same messages.  The attacks are the changes a caller can make between two steps.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastadapt as fa
from fastadapt.optim import steady
from optimizers import ELEMENTWISE, ROWWISE, config_id, rich_and_plain

SHAPES = [(7,), (3, 4), (0,), (1,), (2, 3, 2), (50,)]


def _params(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(s), dtype=dtype) for s in SHAPES]


def _grads(params, rng):
    return [np.asarray(rng.standard_normal(p.shape), dtype=p.dtype) for p in params]


def _build(case, options, params):
    half = len(params) // 2
    return case.cls([{"params": params[:half]}, {"params": params[half:], "lr": options.get("lr", 1e-3) * 0.5}],
                    **options)


def _run(case, options, use_plan, monkeypatch, steps=5, dtype=np.float64):
    with monkeypatch.context() as m:
        if not use_plan:
            m.setattr(steady, "build", lambda opt, work: None)
        ps = _params(dtype)
        opt = _build(case, options, ps)
        rng = np.random.default_rng(1)
        used = 0
        for _ in range(steps):
            before = opt._plan
            opt.step(_grads(ps, rng))
            used += before is not None and before is opt._plan
        return ps, opt, used


def _same(a, b):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        assert np.array_equal(x, y)
    for sa, sb in zip(oa.state, ob.state):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert np.array_equal(sa[k], sb[k]), k


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("item", rich_and_plain(ELEMENTWISE), ids=config_id)
def test_plan_equals_general_path(item, dtype, monkeypatch):
    case, _, options = item
    ps, opt, used = _run(case, options, True, monkeypatch, dtype=dtype)
    assert used == 4                                  # every step after the first ran the plan
    ps2, opt2, used2 = _run(case, options, False, monkeypatch, dtype=dtype)
    assert used2 == 0
    _same((ps, opt), (ps2, opt2))


def _misaligned(g):
    out = np.zeros(g.nbytes + 1, np.uint8)[1:].view(g.dtype)
    out[:] = g
    return out


def _set(i, make):
    """An attack replacing gradient ``i`` by ``make(ps, gs, opt)``."""
    def attack(ps, gs, opt):
        gs[i] = make(ps, gs, opt)
    return attack


def _add_group(ps, gs, opt):
    opt.add_param_group({"params": [np.ones(3)]})
    gs.append(np.ones(3))


# each attack changes something between two steps: it edits ``gs`` (the next step's gradients),
# the parameters or the optimizer in place, or returns what the next step is given instead of ``gs``
ATTACKS = {
    # gradients
    "grad wrong dtype": _set(0, lambda ps, gs, opt: gs[0].astype(np.float32)),
    "grad big-endian": _set(0, lambda ps, gs, opt: gs[0].astype(">f8")),
    "grad wrong shape": _set(1, lambda ps, gs, opt: gs[1].reshape(4, 3)),
    "grad wrong rank": _set(1, lambda ps, gs, opt: gs[1].reshape(-1)),
    "grad strided": _set(5, lambda ps, gs, opt: np.repeat(gs[5], 2)[::2]),
    "grad is a parameter": _set(3, lambda ps, gs, opt: ps[3]),
    "grad views another parameter": _set(0, lambda ps, gs, opt: ps[5][:7]),
    "grad subclass": _set(0, lambda ps, gs, opt: gs[0].view(type("Sub", (np.ndarray,), {}))),
    "grad None": _set(2, lambda ps, gs, opt: None),
    "grad list": _set(0, lambda ps, gs, opt: list(gs[0])),
    "grad misaligned": _set(5, lambda ps, gs, opt: _misaligned(gs[5])),
    "too few grads": lambda ps, gs, opt: gs[:-1],
    "grads as tuple": lambda ps, gs, opt: tuple(gs),
    "grads as generator": lambda ps, gs, opt: (g for g in gs),
    # parameters
    "param read-only": lambda ps, gs, opt: setattr(ps[0].flags, "writeable", False),
    "param reshaped in place": lambda ps, gs, opt: setattr(ps[1], "shape", (4, 3)),
    "param big-endian in place": lambda ps, gs, opt: setattr(ps[0], "dtype", np.dtype(">f8")),
    "param replaced in group": lambda ps, gs, opt: opt.param_groups[0]["params"].__setitem__(0, ps[0].copy()),
    "params list replaced": lambda ps, gs, opt: opt.param_groups[0].__setitem__(
        "params", list(opt.param_groups[0]["params"])),
    "group removed": lambda ps, gs, opt: opt.param_groups.pop() and None,
    "group added": _add_group,
    # hyper-parameters and state
    "lr changed": lambda ps, gs, opt: opt.param_groups[1].__setitem__("lr", 0.25),
    "lr as numpy scalar": lambda ps, gs, opt: opt.param_groups[0].__setitem__("lr", np.float32(0.01)),
    "lr invalid": lambda ps, gs, opt: opt.param_groups[0].__setitem__("lr", -1.0),
    "lr as list": lambda ps, gs, opt: opt.param_groups[0].__setitem__("lr", [0.1]),
    "amsgrad switched on": lambda ps, gs, opt: opt.param_groups[0].__setitem__("amsgrad", True),
    "state buffer replaced": lambda ps, gs, opt: opt.state[0].__setitem__(
        "exp_avg", np.ones_like(opt.state[0]["exp_avg"])),
    "step edited": lambda ps, gs, opt: opt.state[4].__setitem__("step", 100),
    "state_dict reloaded": lambda ps, gs, opt: opt.load_state_dict(opt.state_dict()),
}


def _attack(name, use_plan, monkeypatch):
    with monkeypatch.context() as m:
        if not use_plan:
            m.setattr(steady, "build", lambda opt, work: None)
        ps = _params()
        opt = fa.Adam([{"params": ps[:3]}, {"params": ps[3:], "lr": 0.01}], weight_decay=0.1)
        rng = np.random.default_rng(2)
        for _ in range(2):
            opt.step(_grads(ps, rng))
        assert (opt._plan is not None) == use_plan
        gs = _grads(ps, rng)
        out = ATTACKS[name](ps, gs, opt)
        if out is not None:
            gs = out
        try:
            opt.step(gs)
            outcome = None
        except Exception as exc:                          # noqa: BLE001 - compared below
            outcome = (type(exc), str(exc))
        try:
            opt.step(_grads(ps, rng))                     # and the step after it
            after = None
        except Exception as exc:                          # noqa: BLE001
            after = (type(exc), str(exc))
        return outcome, after, [p.copy() for p in ps], opt


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_between_steps(name, monkeypatch):
    outcome, after, ps, opt = _attack(name, True, monkeypatch)
    outcome2, after2, ps2, opt2 = _attack(name, False, monkeypatch)
    assert outcome == outcome2
    assert after == after2
    for x, y in zip(ps, ps2):
        assert x.shape == y.shape and np.array_equal(x, y)
    for sa, sb in zip(opt.state, opt2.state):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert np.array_equal(sa[k], sb[k]), k


def test_sparse_gradients_do_not_build_plans():
    table = np.zeros((100, 4))
    opt = fa.Adagrad([table])
    for _ in range(3):
        opt.step([fa.RowGrad(np.array([1, 5]), np.ones((2, 4)))])
        assert opt._plan is None


def test_plan_refuses_without_writing(monkeypatch):
    """A gradient that fails the compiled check (overlap) leaves no trace: the general path raises."""
    ps = _params()
    opt = fa.Adam(ps)
    rng = np.random.default_rng(0)
    opt.step(_grads(ps, rng))
    plan = opt._plan
    assert plan is not None
    before = [p.copy() for p in ps], [dict(st) for st in opt.state]
    gs = _grads(ps, rng)
    gs[5] = ps[5]
    assert plan.run(opt, gs) is steady.NOT_MINE
    for p, q in zip(ps, before[0]):
        assert np.array_equal(p, q)
    for st, old in zip(opt.state, before[1]):
        assert st["step"] == old["step"]


@pytest.mark.parametrize("case", ROWWISE, ids=str)
def test_row_rules_make_no_plan(case):
    """A row rule (one kernel per parameter) never builds a steady-state plan."""
    p = np.ones((4, 3))
    opt = case.cls([p], **case.rich)
    for _ in range(3):
        opt.step([np.full((4, 3), 0.5)])
        assert opt._plan is None
