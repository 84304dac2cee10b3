"""The many-tensor path (fastadapt.many): one kernel call for all dense CPU gradients of a step.

Its results must be bit-identical to one launch per parameter, for every rule and option, with
mixed sizes (empty, 0-d, tiny, and large enough to be cut into several work units), several
param groups, None gradients, and state buffers that change between steps (an option switched
on, load_state_dict).  Bit-identical is the right test: the update is element by element, so
how the elements are grouped into calls cannot change a single bit.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastadapt as fa
from fastadapt import config
from fastadapt.backends import cpu
from fastadapt.optim import many

from conftest import DTYPE_IDS, DTYPES
from optimizers import DENSE, ELEMENTWISE, ROWWISE, rich_and_plain

#: every dense case, its rich config and its plain one
CONFIGS = {f"{c.name}-{label}": (c.cls, o) for c, label, o in rich_and_plain(ELEMENTWISE)}
#: row rules: several parameters in one optimizer, each its own kernel call
ROW_CONFIGS = {f"{c.name}-{label}": (c.cls, o) for c, label, o in rich_and_plain(ROWWISE)}
SHAPES = [(0,), (), (1,), (7,), (3, 5), (1003,), (40, 37)]


def _grads(rng, params):
    return [np.array(rng.standard_normal(p.shape), dtype=p.dtype) for p in params]


def _run(name, dtype, steps, grads_at, params0, groups=None):
    """(params, optimizer) after `steps` steps of one optimizer over all params, and the same
    with one optimizer per parameter (each a single-tensor launch)."""
    cls, hyper = {**CONFIGS, **ROW_CONFIGS}[name]
    together = [p.copy() for p in params0]
    alone = [p.copy() for p in params0]
    if groups is None:
        opt = cls(together, **hyper)
    else:
        opt = cls([{"params": [together[i] for i in idx], **extra} for idx, extra in groups], **hyper)
    order = [i for idx, _ in groups for i in idx] if groups else list(range(len(params0)))
    extras = {i: extra for idx, extra in (groups or []) for i in idx}
    singles = {i: cls([alone[i]], **{**hyper, **extras.get(i, {})}) for i in order}
    for s in range(steps):
        grads = grads_at(s)
        opt.step([grads[i] for i in order])
        for i in order:
            if grads[i] is not None:
                singles[i].step([grads[i]])
    return together, opt, alone, singles, order


def _assert_same(together, opt, alone, singles, order):
    for pos, i in enumerate(order):
        assert np.array_equal(together[i], alone[i]), i
        mine, ref = opt.state[pos], singles[i].state[0]
        assert mine.keys() == ref.keys(), i
        for key in ref:
            assert np.array_equal(mine[key], ref[key]), (i, key)


@pytest.mark.parametrize("loop", ["serial", "parallel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_many_tensors_equal_one_launch_each(name, dtype, loop, monkeypatch):
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 16 if loop == "parallel" else 10**9)
    monkeypatch.setattr(config, "PARALLEL_MIN_CHUNK", 256)    # large tensors cut into several units
    monkeypatch.setattr(config, "PARALLEL_CHUNK", 256)
    rng = np.random.default_rng(3)
    params0 = [np.array(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
    calls = []
    real = cpu.dense_step_many
    monkeypatch.setattr(many, "dense_step_many", lambda *a: calls.append((len(a[2]), a[-1])) or real(*a))
    result = _run(name, dtype, 4, lambda s: _grads(rng, params0), params0)
    # one call per step over every element (the one-parameter optimizers' calls have one table row)
    assert [c for c in calls if c[0] > 1] == [(len(params0), sum(p.size for p in params0))] * 4
    _assert_same(*result)


def test_groups_none_gradients_and_mixed_dtypes(monkeypatch):
    """Each (group, step count, dtype) is one call with its own scalars; a parameter left
    out (None) keeps its step count, so it lands in its own batch afterwards."""
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 16)
    rng = np.random.default_rng(5)
    params0 = [np.array(rng.standard_normal(n), dtype=np.float32) for n in (50, 3, 700, 1, 64)]
    params0.append(rng.standard_normal(30))                  # float64 in the same group
    groups = [([0, 1, 5], {"lr": 0.05}), ([2, 3, 4], {"lr": 0.001, "weight_decay": 0.3})]

    def grads_at(s):
        g = _grads(rng, params0)
        if s in (1, 2):
            g[1] = None                                       # parameter 1 falls behind by two steps
        return g

    calls = []
    real = cpu.dense_step_many
    monkeypatch.setattr(many, "dense_step_many", lambda *a: calls.append((len(a[2]), a[-1])) or real(*a))
    together, opt, alone, singles, order = _run("Adam-rich", np.float32, 5, grads_at, params0, groups)
    _assert_same(together, opt, alone, singles, order)
    assert opt.state[1]["step"] == 3 and opt.state[0]["step"] == 5
    # group 1: one call per step; group 0's float32 pair: one call at step 0 only (then
    # parameter 0 is alone in its (step count, dtype) batch); calls of one tensor (one table row:
    # lone parameters, the one-parameter optimizers) are not counted
    assert len([c for c in calls if c[0] > 1]) == 5 + 1


def test_state_buffers_replaced_between_steps_are_followed():
    """The kept table must notice new state arrays: amsgrad switched on (a new buffer) and
    load_state_dict (state arrays replaced)."""
    rng = np.random.default_rng(7)
    params0 = [rng.standard_normal(n) for n in (10, 200, 3)]
    a = [p.copy() for p in params0]
    b = [p.copy() for p in params0]
    opt = fa.Adam(a, lr=0.01)
    singles = [fa.Adam([x], lr=0.01) for x in b]
    for s in range(6):
        grads = _grads(rng, params0)
        if s == 2:
            opt.param_groups[0]["amsgrad"] = True
            for o in singles:
                o.param_groups[0]["amsgrad"] = True
        if s == 4:
            saved = opt.state_dict()
            fresh = fa.Adam(a, lr=0.01, amsgrad=True)
            fresh.load_state_dict(saved)
            opt = fresh
        opt.step(grads)
        for o, g in zip(singles, grads):
            o.step([g])
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    for j, o in enumerate(singles):
        for key, v in o.state[0].items():
            assert np.array_equal(opt.state[j][key], v), key


def test_new_gradient_arrays_every_step():
    """Gradients are new arrays at every step (their addresses change); each step reads the
    current ones, never a stale address."""
    rng = np.random.default_rng(9)
    p = [np.zeros(100, np.float32), np.zeros(5, np.float32)]
    opt = fa.Adagrad(p, lr=1.0)
    for _ in range(3):
        opt.step([np.ones(100, np.float32), np.full(5, 2.0, np.float32)])
        rng.standard_normal(1000)            # allocate in between
    ref = [np.zeros(100, np.float32), np.zeros(5, np.float32)]
    o2 = [fa.Adagrad([r], lr=1.0) for r in ref]
    for _ in range(3):
        o2[0].step([np.ones(100, np.float32)])
        o2[1].step([np.full(5, 2.0, np.float32)])
    assert np.array_equal(p[0], ref[0]) and np.array_equal(p[1], ref[1])


def test_plan_segments_cover_every_element_once():
    lengths = np.array([0, 5, 1, 300, 0, 129, 128, 1000], dtype=np.int64)
    segments, units = cpu.plan_segments(lengths, 128)
    covered = {r: np.zeros(n, int) for r, n in enumerate(lengths)}
    for row, start, stop in segments:
        assert 0 <= start < stop <= lengths[row]
        covered[row][start:stop] += 1
    assert all((c == 1).all() for c in covered.values())
    assert units[0] == 0 and units[-1] == len(segments) and (np.diff(units) > 0).all()
    weights = [sum(s[2] - s[1] for s in segments[units[u]:units[u + 1]]) for u in range(len(units) - 1)]
    assert all(w == 128 for w in weights[:-1]) and 0 < weights[-1] <= 128


def test_many_kernels_compile_once_per_rule_and_dtype(monkeypatch):
    """Options are runtime values: a second round of steps with other options compiles nothing."""
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 16)
    kernels = ("_many_serial", "_many_parallel", "_segment", "address")

    def counts():
        return {k: len(getattr(cpu, k).signatures) for k in kernels}

    def run(configs):
        for cls, hyper in configs:
            for dtype in DTYPES:
                for size in (4, 40):   # serial (8 elements) and parallel (80) loops
                    opt = cls([np.ones(size, dtype), np.ones(size, dtype)], **hyper)
                    opt.step([np.ones(size, dtype), np.ones(size, dtype)])

    run(CONFIGS.values())
    before = counts()
    run([(c.cls, o) for c in DENSE for o in [{}] + list(c.options)])     # every other option combination
    assert counts() == before


def test_carried_scalars_split_batches(monkeypatch):
    """NAdam carries mu_product per parameter: parameters with the same step count but different
    carried values (here after a state_dict load) are stepped in separate calls, each with its own
    scalars, and the result equals one optimizer per parameter."""
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 10**9)
    rng = np.random.default_rng(11)
    params0 = [rng.standard_normal(n) for n in (40, 7, 300)]
    grads = [[rng.standard_normal(p.shape) for p in params0] for _ in range(3)]
    ps = [p.copy() for p in params0]
    opt = fa.NAdam(ps, lr=0.01)
    opt.step(grads[0])
    sd = opt.state_dict()
    sd["state"][1]["mu_product"] *= 0.5                       # parameter 1 now carries another value
    opt.load_state_dict(sd)
    calls = []
    real = cpu.dense_step_many
    monkeypatch.setattr(many, "dense_step_many", lambda *a: calls.append((len(a[2]), a[-1])) or real(*a))
    for g in grads[1:]:
        opt.step(g)
    assert [c for c in calls if c[0] > 1] == [(2, 40 + 300)] * 2      # 0 and 2 together; 1 on its own
    for j, p0 in enumerate(params0):                         # one optimizer per parameter, same history
        q = [p0.copy()]
        single = fa.NAdam(q, lr=0.01)
        single.step([grads[0][j]])
        one = single.state_dict()
        one["state"][0]["mu_product"] = sd["state"][j]["mu_product"]
        single.load_state_dict(one)
        for g in grads[1:]:
            single.step([g[j]])
        assert np.array_equal(q[0], ps[j])
        assert single.state[0]["mu_product"] == opt.state[j]["mu_product"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", sorted(ROW_CONFIGS))
def test_row_rule_many_tensors_equal_one_optimizer_each(name, dtype):
    """A row rule has no many-tensor kernel: each parameter is stepped by its own row loop, and
    several parameters in one optimizer (param groups, None gradients) give each one's results."""
    rng = np.random.default_rng(3)
    params0 = [np.array(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
    calls = []
    real = many.apply_dense
    many.apply_dense = lambda *a: calls.append(1) or real(*a)
    try:
        for groups in (None, [([0, 2, 4, 6], {}), ([1, 3, 5], {"lr": 0.03})]):
            out = _run(name, dtype, 3, lambda s: [None if (s + i) % 3 == 2 else
                                                  np.array(rng.standard_normal(p.shape), dtype=dtype)
                                                  for i, p in enumerate(params0)], params0, groups=groups)
            _assert_same(*out)
    finally:
        many.apply_dense = real
    assert calls == []
