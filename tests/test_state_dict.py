"""state_dict / load_state_dict: torch's layout with numpy arrays, copies both ways, a round trip that
continues bit-exactly, and every mismatch refused before anything is replaced (the spec, "State and state_dict")."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DTYPE_IDS, DTYPES
from optimizers import DENSE

#: every dense case with its rich config (every buffer) and with the defaults
CONFIGS = {**{c.name: (c, dict(c.rich)) for c in DENSE}, **{f"{c.name}-defaults": (c, {}) for c in DENSE}}
#: (source, target) cases whose state_dicts the target does not know (group keys or buffers)
FOREIGN = [(a.name, b.name) for a in DENSE for b in DENSE
           if a is not b and not (set(a.algorithm.defaults) <= set(b.algorithm.defaults)
                                  and set(a.buffers(a.rich)) <= set(b.algorithm.slots))]
SHAPES = [(5,), (2, 3), (), (4,)]


def make(name, dtype=np.float64, seed=0, **override):
    """An optimizer over four parameters in two groups (the second with its own lr)."""
    case, hyper = CONFIGS[name]
    rng = np.random.default_rng(seed)
    ps = [np.array(rng.standard_normal(s), dtype=dtype) for s in SHAPES]
    opt = case.cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.03}], **dict(hyper, **override))
    return opt, ps


def gradients(ps, i, none_at=None):
    rng = np.random.default_rng(100 + i)
    gs = [np.array(rng.standard_normal(p.shape), dtype=p.dtype) for p in ps]
    if none_at is not None:
        gs[none_at] = None
    return gs


def params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def assert_same_state(opt_a, opt_b):
    assert len(opt_a.state) == len(opt_b.state)
    for sa, sb in zip(opt_a.state, opt_b.state):
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], np.ndarray):
                assert sa[k].dtype == sb[k].dtype and np.array_equal(sa[k], sb[k]), k
            else:
                assert sa[k] == sb[k], k


def snapshot(opt):
    return ([p.copy() for p in params_of(opt)], copy.deepcopy(opt.state),
            copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]))


def assert_unchanged(opt, snap):
    params, state, groups = snap
    for now, before in zip(params_of(opt), params):
        assert np.array_equal(now, before)
    assert len(opt.state) == len(state)
    for now, before in zip(opt.state, state):
        assert now.keys() == before.keys()
        for k in now:
            assert np.array_equal(now[k], before[k]) if isinstance(now[k], np.ndarray) else now[k] == before[k]
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


# --------------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layout(name):
    opt, ps = make(name)
    case, hyper = CONFIGS[name]
    eager = case.algorithm.eager_state
    buffers = set(case.buffers(hyper))                         # the algorithm's declaration
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    if eager:                                                  # eager state (Adagrad), step 0
        assert sorted(sd["state"]) == [0, 1, 2, 3]
        assert all(s["step"] == 0 and set(s) == buffers | {"step"} for s in sd["state"].values())
    else:
        assert sd["state"] == {}                               # lazy, like torch
    opt.step(gradients(ps, 0, none_at=3))
    sd = opt.state_dict()
    assert sorted(sd["state"]) == ([0, 1, 2, 3] if eager else [0, 1, 2])
    for idx, s in sd["state"].items():
        assert type(s["step"]) is int and s["step"] == (0 if idx == 3 else 1)
        assert set(s) == buffers | {"step"} | {n for n, _ in case.algorithm.carry}
        for k in buffers:
            assert isinstance(s[k], np.ndarray) and s[k].shape == case.algorithm.state_shape(SHAPES[idx]) \
                and s[k].dtype == np.float64
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    assert sd["param_groups"][1]["lr"] == 0.03
    for g in sd["param_groups"]:
        assert set(g) == set(opt.defaults) | {"params"}
        if "betas" in g:
            assert isinstance(g["betas"], tuple)


def test_state_dict_holds_copies():
    opt, ps = make("Adam")
    opt.step(gradients(ps, 0))
    sd = opt.state_dict()
    kept = copy.deepcopy(sd)
    sd["state"][0]["exp_avg"][...] = 123.0                     # writing into the dict ...
    sd["param_groups"][0]["lr"] = 9.0
    assert not np.any(opt.state[0]["exp_avg"] == 123.0)        # ... does not touch the optimizer
    assert opt.param_groups[0]["lr"] == 1e-2
    opt.step(gradients(ps, 1))                                 # and stepping does not touch the dict
    assert kept["state"][1]["step"] == 1
    sd2 = opt.state_dict()
    assert sd2["state"][1]["step"] == 2
    assert not np.array_equal(sd2["state"][1]["exp_avg"], kept["state"][1]["exp_avg"])
    loaded = make("Adam")[0]
    loaded.load_state_dict(kept)
    kept["state"][0]["exp_avg"][...] = -1.0                    # loading copies too
    assert not np.any(loaded.state[0]["exp_avg"] == -1.0)


# --------------------------------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("via_pickle", [False, True], ids=["dict", "pickle"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_continues_bit_exactly(name, dtype, via_pickle):
    opt, ps = make(name, dtype)
    for i in range(3):
        opt.step(gradients(ps, i, none_at=2 if i == 1 else None))
    sd = opt.state_dict()
    if via_pickle:
        sd = pickle.loads(pickle.dumps(sd))
    # a fresh optimizer over copies of the parameters, built with other hyper-parameters: load restores them
    qs = [p.copy() for p in ps]
    cls = CONFIGS[name][0].cls
    other = cls([{"params": qs[:2]}, {"params": qs[2:]}], lr=0.5)
    other.load_state_dict(sd)
    assert [{k: v for k, v in g.items() if k != "params"} for g in other.param_groups] == \
           [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert_same_state(opt, other)
    for i in range(3, 7):
        gs = gradients(ps, i, none_at=0 if i == 4 else None)
        opt.step(gs)
        other.step(gs)
    for p, q in zip(ps, qs):
        assert p.dtype == q.dtype == dtype and np.array_equal(p, q)
    assert_same_state(opt, other)
    assert [s["step"] for s in other.state] == [6, 7, 6, 7]


def test_load_into_the_same_optimizer_rewinds_it():
    opt, ps = make("RMSprop")
    opt.step(gradients(ps, 0))
    sd = opt.state_dict()
    saved_params = [p.copy() for p in ps]
    opt.step(gradients(ps, 1))
    after_two = [p.copy() for p in ps]
    opt.load_state_dict(sd)                                    # the state goes back ...
    for p, q in zip(ps, saved_params):
        p[...] = q                                             # ... the parameters are the caller's
    opt.step(gradients(ps, 1))
    for p, q in zip(ps, after_two):
        assert np.array_equal(p, q)


def test_load_resets_state_missing_from_the_dict():
    opt, ps = make("Adagrad", initial_accumulator_value=0.25)
    fresh_sd = make("Adam")[0].state_dict()                    # no state at all
    adam, aps = make("Adam")
    adam.step(gradients(aps, 0))
    adam.load_state_dict(fresh_sd)
    assert adam.state == [{}, {}, {}, {}]
    opt.step(gradients(ps, 0))
    sd = opt.state_dict()
    del sd["state"][1]
    opt.load_state_dict(sd)
    assert opt.state[1]["step"] == 0 and np.array_equal(opt.state[1]["sum"], np.full((2, 3), 0.25))
    assert opt.state[0]["step"] == 1


def test_loaded_step_may_be_any_integer_type():
    opt, ps = make("Adam-defaults")
    opt.step(gradients(ps, 0))
    sd = opt.state_dict()
    sd["state"][0]["step"] = np.int64(2**40)
    opt.load_state_dict(sd)
    opt.step(gradients(ps, 1))
    assert opt.state[0]["step"] == 2**40 + 1 and isinstance(opt.state[0]["step"], int)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(CONFIGS)), dtype=st.sampled_from(DTYPES), before=st.integers(0, 4),
       after=st.integers(1, 4), nones=st.lists(st.integers(0, 4), min_size=8, max_size=8))
def test_property_round_trip(name, dtype, before, after, nones):
    opt, ps = make(name, dtype, seed=before)
    for i in range(before):
        opt.step(gradients(ps, i, none_at=nones[i] if nones[i] < 4 else None))
    qs = [p.copy() for p in ps]
    other = CONFIGS[name][0].cls([{"params": qs[:2]}, {"params": qs[2:]}])
    other.load_state_dict(opt.state_dict())
    for i in range(before, before + after):
        gs = gradients(ps, i, none_at=nones[i] if nones[i] < 4 else None)
        opt.step(gs)
        other.step(gs)
    assert all(np.array_equal(p, q) for p, q in zip(ps, qs))
    assert_same_state(opt, other)


# --------------------------------------------------------------------------------------------------
# mismatches: ValueError, nothing replaced
# --------------------------------------------------------------------------------------------------


def _corruptions():
    """(description, function editing a valid state_dict in place, message pattern)."""
    def set_state(idx, key, value):
        def edit(sd):
            sd["state"][idx][key] = value
        return edit

    def drop_group(sd):
        sd["param_groups"].pop()

    def add_group(sd):
        sd["param_groups"].append(dict(sd["param_groups"][0], params=[4]))

    def shrink_group(sd):
        sd["param_groups"][1]["params"] = [2]

    def group_key(key, value):
        def edit(sd):
            sd["param_groups"][1][key] = value
        return edit

    def state_for_unknown_index(sd):
        sd["state"][7] = copy.deepcopy(sd["state"][0])

    def no_step(sd):
        del sd["state"][3]["step"]

    return [
        ("one group fewer", drop_group, "has 1 param groups, this optimizer has 2"),
        ("one group more", add_group, "has 3 param groups, this optimizer has 2"),
        ("group size", shrink_group, "param group 1 has 1 parameters in the state_dict and 2 here"),
        ("buffer shape", set_state(3, "exp_avg", np.zeros(5)), r"'exp_avg' has shape \(5,\)"),
        ("buffer transposed", set_state(1, "exp_avg_sq", np.zeros((3, 2))), r"has shape \(3, 2\)"),
        ("0-d buffer as 1-d", set_state(2, "exp_avg", np.zeros(1)), r"has shape \(1,\)"),
        ("buffer dtype f32", set_state(3, "exp_avg", np.zeros(4, np.float32)), "dtype float32"),
        ("buffer dtype int", set_state(3, "max_exp_avg_sq", np.zeros(4, np.int64)), "dtype int64"),
        ("unknown buffer", set_state(3, "momentum_buffer", np.zeros(4)), r"unknown entries \['momentum_buffer'\]"),
        ("negative step", set_state(3, "step", -1), "'step' must be a non-negative int"),
        ("float step", set_state(3, "step", 2.0), "'step' must be a non-negative int"),
        ("bool step", set_state(3, "step", True), "'step' must be a non-negative int"),
        ("no step", no_step, "'step' must be a non-negative int"),
        ("unknown group key", group_key("momentum", 0.9), r"unknown keys \['momentum'\]"),
        ("negative lr in group", group_key("lr", -1.0), "invalid lr"),
        ("bad betas in group", group_key("betas", (1.0, 0.999)), "beta1"),
        ("state for an unknown index", state_for_unknown_index, r"parameter indices \[7\]"),
    ]


@pytest.mark.parametrize("what,edit,pattern", _corruptions(), ids=[c[0] for c in _corruptions()])
def test_mismatched_state_dict_refused_and_nothing_changes(what, edit, pattern):
    source, sps = make("Adam")
    for i in range(2):
        source.step(gradients(sps, i))
    sd = source.state_dict()
    edit(sd)
    target, tps = make("Adam", seed=1)
    target.step(gradients(tps, 9))                             # state that must survive the failed load
    snap = snapshot(target)
    with pytest.raises(ValueError, match=pattern):
        target.load_state_dict(sd)
    assert_unchanged(target, snap)
    target.step(gradients(tps, 10))                            # still usable
    assert [s["step"] for s in target.state] == [2, 2, 2, 2]


def _malformed():
    opt, ps = make("Adagrad")
    sd = opt.state_dict()
    return [None, [], {}, {"state": {}}, {"param_groups": []}, "state", dict(sd, state=[]),
            dict(sd, state={0: 5}), dict(sd, param_groups=[5, 6]), dict(sd, param_groups={"a": 1})]


@pytest.mark.parametrize("bad", _malformed(), ids=range(len(_malformed())))
def test_not_a_state_dict(bad):
    opt, ps = make("Adagrad")
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="not a fastadapt state_dict"):
        opt.load_state_dict(bad)
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("src,dst", FOREIGN, ids=[f"{a}-{b}" for a, b in FOREIGN])
def test_state_dict_of_another_optimizer_refused(src, dst):
    source, sps = make(src)
    source.step(gradients(sps, 0))
    target, _ = make(dst)
    snap = snapshot(target)
    with pytest.raises(ValueError, match="unknown|looks like"):       # names what it is, where it can
        target.load_state_dict(source.state_dict())
    assert_unchanged(target, snap)


def test_state_dict_of_other_dtype_refused():
    source, sps = make("Adam", np.float32)
    source.step(gradients(sps, 0))
    target, _ = make("Adam", np.float64)
    snap = snapshot(target)
    with pytest.raises(ValueError, match="float32.*float64"):
        target.load_state_dict(source.state_dict())
    assert_unchanged(target, snap)
