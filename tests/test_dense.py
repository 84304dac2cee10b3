"""Dense steps of the optimizer classes against the numpy references of tests/reference.py.

Covers every option combination that changes the math (float32 and float64, 1 and many steps),
0-d / 1-d / n-d parameters and sizes that are not a multiple of the vector width, both CPU loops
(serial, and the parallel one by lowering ``config.PARALLEL_THRESHOLD``), dtype preservation, "a
second step compiles nothing new", and property-based tests over shapes and hyper-parameters.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastadapt as fa
from fastadapt import config
from fastadapt.backends import cpu

from conftest import DTYPES, DTYPE_IDS, RTOL, assert_close
from optimizers import CASES, DENSE, config_id, option_cases

#: a small threshold so that the parallel loop runs on the small arrays of these tests
SMALL_THRESHOLD = 16


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def problem(shape, dtype, steps, seed=0):
    """A parameter and ``steps`` gradients of varying magnitude with a persistent per-element bias."""
    rng = np.random.default_rng(seed)
    p0 = np.array(rng.standard_normal(shape), dtype=dtype)     # np.array: 0-d stays an array
    bias = rng.standard_normal(shape)
    grads = [np.array(bias + rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 1), dtype=dtype)
             for _ in range(steps)]
    return p0, grads




def assert_matches(opt, j, p, q, st_ref, dtype, what=""):
    """fastadapt parameter ``p`` (position j of ``opt``) and its state against the reference ``q``, ``st_ref``."""
    assert_close(p, q, RTOL[np.dtype(dtype)], f"{what} param")
    state = opt.state[j]
    assert state["step"] == st_ref["step"], what
    buffers = {k for k, v in st_ref.items() if isinstance(v, np.ndarray)}
    assert buffers <= set(state), (what, sorted(state))
    for k in buffers:
        assert state[k].dtype == dtype and state[k].shape == opt.algorithm.state_shape(p.shape), (what, k)
        assert_close(state[k], st_ref[k], RTOL[np.dtype(dtype)], f"{what} {k}")


@contextlib.contextmanager
def parallel_threshold(value):
    """Set ``config.PARALLEL_THRESHOLD`` (usable inside hypothesis tests, unlike monkeypatch)."""
    old = config.PARALLEL_THRESHOLD
    config.PARALLEL_THRESHOLD = value
    try:
        yield
    finally:
        config.PARALLEL_THRESHOLD = old


def run_pair(case, p0, grads, hyper, check_every_step=False):
    """Run fastadapt and the reference side by side; return (p, opt, q, ref_state)."""
    p = p0.copy()
    opt = case.cls([p], **hyper)
    q = p0.copy()
    st_ref = case.init_state(q, **hyper)
    for i, g in enumerate(grads):
        assert opt.step([g]) is True
        case.reference(q, g, st_ref, **hyper)
        if check_every_step or i == 0:
            assert_matches(opt, 0, p, q, st_ref, p0.dtype, f"step {i + 1}")
    return p, opt, q, st_ref


# --------------------------------------------------------------------------------------------------
# every option combination
# --------------------------------------------------------------------------------------------------

#: every option combination of every case that takes dense gradients, and the defaults
OPTION_GRID = option_cases(DENSE) + [(c, {}) for c in DENSE]


def _grid_id(case):
    return config_id(case)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", OPTION_GRID, ids=[_grid_id(c) for c in OPTION_GRID])
def test_every_option_matches_reference(case, dtype):
    """After 1 step and after 25 steps, parameter and every state buffer match the reference."""
    c, hyper = case
    p0, grads = problem((33,), dtype, 25, seed=len(_grid_id(case)))
    p, opt, q, st_ref = run_pair(c, p0, grads, hyper)
    assert_matches(opt, 0, p, q, st_ref, dtype, "final")
    assert opt.state[0]["step"] == 25
    assert not np.array_equal(p, p0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_operation_order_is_the_references_bit_for_bit(dtype):
    """The spec ("Conventions"): keep its evaluation order (lerp branches, where each scalar enters). Numba without
    fastmath neither contracts nor reassociates, and numpy's sqrt and division are correctly rounded, so
    kernel and reference agree bit for bit; a changed order shows here even when it stays inside the
    parity tolerance. (Contraction beyond the fma calls the rules make would break this; a change that enables it should
    turn this into a ~1-ulp comparison.)"""
    for case in OPTION_GRID:
        c, hyper = case
        p0, grads = problem((33,), dtype, 10, seed=len(_grid_id(case)))
        p, opt, q, st_ref = run_pair(c, p0, grads, hyper)
        assert np.array_equal(p, q), case
        for k, v in st_ref.items():
            if isinstance(v, np.ndarray):
                assert np.array_equal(opt.state[0][k], v), (case, k)


# --------------------------------------------------------------------------------------------------
# shapes, sizes and both loops
# --------------------------------------------------------------------------------------------------

SHAPES = [(0,), (1,), (7,), (33,), (1000,), (1003,), (), (3, 5), (2, 3, 4), (4, 0, 3)]


@pytest.mark.parametrize("loop", ["serial", "parallel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "0d")
@pytest.mark.parametrize("case", DENSE, ids=str)
def test_shapes_and_loops(case, shape, dtype, loop, monkeypatch):
    if loop == "parallel":
        monkeypatch.setattr(config, "PARALLEL_THRESHOLD", SMALL_THRESHOLD)
    p0, grads = problem(shape, dtype, 6, seed=7)
    p, opt, q, st_ref = run_pair(case, p0, grads, case.rich, check_every_step=True)
    assert p.shape == shape and p.dtype == dtype
    carried = {name for name, _ in case.algorithm.carry}        # scalars kept in the state (NAdam)
    for k, v in opt.state[0].items():
        if k != "step" and k not in carried:
            assert v.shape == case.algorithm.state_shape(shape) and v.dtype == dtype, k


@pytest.mark.parametrize("size,expected", [(7, "serial"), (15, "serial"), (16, "parallel"), (33, "parallel")])
def test_threshold_picks_the_loop(size, expected, monkeypatch):
    """The loop choice follows config.PARALLEL_THRESHOLD, read at every step (the first step runs
    the one-tensor loops, the next the steady-state plan's many-tensor loops)."""
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", SMALL_THRESHOLD)
    calls = []
    for kind in ("dense", "many"):
        for loop in ("serial", "parallel"):
            real = getattr(cpu, f"_{kind}_{loop}")

            def spy(*args, _real=real, _loop=loop):
                calls.append(_loop)
                return _real(*args)

            monkeypatch.setattr(cpu, f"_{kind}_{loop}", spy)
    p0, grads = problem((size,), np.float64, 2)
    run_pair(CASES["Adam"], p0, grads, {})
    assert calls == [expected, expected]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_serial_and_parallel_loops_agree_bitwise(dtype, monkeypatch):
    """Elementwise updates: the prange loop must give exactly the serial loop's numbers."""
    results = []
    for threshold in (10**9, SMALL_THRESHOLD):
        monkeypatch.setattr(config, "PARALLEL_THRESHOLD", threshold)
        for case in DENSE:
            p0, grads = problem((1003,), dtype, 5, seed=3)
            p = p0.copy()
            opt = case.cls([p], **case.rich)
            for g in grads:
                opt.step([g])
            results.append((p, opt.state_dict()["state"][0]))
    half = len(results) // 2
    for (pa, sa), (pb, sb) in zip(results[:half], results[half:]):
        assert np.array_equal(pa, pb)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert np.array_equal(sa[k], sb[k])


# --------------------------------------------------------------------------------------------------
# dtype, in-place, inputs untouched
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", DENSE, ids=str)
def test_in_place_dtype_preserved_gradient_untouched(case, dtype):
    p0, grads = problem((4, 5), dtype, 3)
    p = p0.copy()
    address = p.__array_interface__["data"][0]
    opt = case.cls([p], **case.rich)
    copies = [g.copy() for g in grads]
    for g in grads:
        opt.step([g])
    assert opt.param_groups[0]["params"][0] is p
    assert p.__array_interface__["data"][0] == address and p.dtype == dtype and p.shape == (4, 5)
    assert not np.array_equal(p, p0)
    for g, c in zip(grads, copies):
        assert np.array_equal(g, c)                       # gradients are read, never written
    sd = opt.state_dict()
    for k, v in sd["state"][0].items():
        if k == "step":
            assert type(v) is int and v == 3
        elif k in dict(case.algorithm.carry):                 # a carried scalar (NAdam's mu_product)
            assert type(v) is float
        else:
            assert isinstance(v, np.ndarray) and v.dtype == dtype and v.shape == case.algorithm.state_shape((4, 5))


def test_float32_math_stays_float32():
    """A float32 parameter updated by float32 math differs from the same update done in float64
    and rounded (that would be a silent promotion), while matching the float32 reference."""
    p0, grads = problem((257,), np.float32, 10, seed=11)
    p, opt, q, st_ref = run_pair(CASES["Adam"], p0, grads, dict(lr=1e-2, amsgrad=True))
    p64 = p0.astype(np.float64)
    opt64 = fa.Adam([p64], lr=1e-2, amsgrad=True)
    for g in grads:
        opt64.step([g.astype(np.float64)])
    assert_close(p, q, RTOL[np.dtype(np.float32)])
    assert not np.array_equal(p, p64.astype(np.float32))


# --------------------------------------------------------------------------------------------------
# compilation: one specialisation per (rule, dtype, loop), whatever the options
# --------------------------------------------------------------------------------------------------

def _signature_counts():
    """Number of compiled specialisations of every numba CPU function in the loaded fastadapt modules
    (loops, rules, finite checks, whatever a backend adds later)."""
    from numba.core.registry import CPUDispatcher
    counts = {}
    for modname, mod in list(sys.modules.items()):
        if modname.startswith("fastadapt") and mod is not None:
            for attr, value in vars(mod).items():
                if isinstance(value, CPUDispatcher):
                    counts[f"{modname}.{attr}"] = len(value.signatures)
    return counts


def _all_option_runs(dtype):
    for case, hyper in OPTION_GRID:
        for shape in [(), (5,), (2, 20)]:
            p0, grads = problem(shape, dtype, 2)
            yield case, hyper, p0, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_second_step_compiles_nothing_new(dtype, monkeypatch):
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", SMALL_THRESHOLD)
    # first steps: whatever needs compiling (or loading from the cache) happens here
    for case in DENSE:
        for size in (3, 40):
            p0, grads = problem((size,), dtype, 1)
            case.cls([p0.copy()], nonfinite="skip").step(grads)
            if case.functional is not None:
                _functional_step(case, p0.copy(), grads[0], {})
    before = _signature_counts()
    assert before["fastadapt.backends.cpu._dense_serial"] >= 3 and before["fastadapt.backends.cpu._dense_parallel"] >= 3
    # every option combination, every shape, both loops, the non-finite scan and the functional layer
    for case, hyper, p0, grads in _all_option_runs(dtype):
        opt = case.cls([p0.copy()], nonfinite="skip", **hyper)
        for g in grads:
            opt.step([g])
        opt.step([np.full_like(p0, np.nan)])
    for case in DENSE:                             # the functional layer, every buffer, other options
        if case.functional is not None:
            _functional_step(case, np.ones(40, dtype), np.ones(40, dtype), case.rich, step=3)
    assert _signature_counts() == before


def _functional_step(case, p, g, hyper, step=1):
    """One functional-layer update with every state buffer (fresh zeros) and ``hyper``'s
    functional hyper-parameters."""
    alg = case.algorithm
    names = {h.name for h in alg.hypers if h.functional}
    bufs = {alg.functional_args.get(n, n): np.zeros(alg.state_shape(p.shape), p.dtype) for n in alg.slots if n is not None}
    case.functional(p, g, step=step, **bufs, **{k: v for k, v in hyper.items() if k in names})


def test_one_specialisation_per_rule_and_dtype():
    """No loop was ever specialised twice for the same rule and dtype (flags are runtime values)."""
    for kernel in ("_dense_serial", "_dense_parallel"):
        keys = [(sig[0], sig[1].dtype) for sig in getattr(cpu, kernel).signatures]
        assert len(keys) == len(set(keys)), kernel
        for sig in getattr(cpu, kernel).signatures:
            # contiguous 1-D arrays, scalars in the array dtype
            assert all(a.ndim == 1 and a.layout == "C" for a in sig[1:6]), sig
            assert {t for t in sig[6].types if str(t) != "bool"} <= {sig[1].dtype}, sig


# --------------------------------------------------------------------------------------------------
# property-based: shapes and hyper-parameters
# --------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_property_matches_reference(data):
    case = data.draw(st.sampled_from(DENSE), label="optimizer")
    hyper = data.draw(case.hyper_strategy(), label="hyper")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7), label="shape")
    steps = data.draw(st.integers(1, 5), label="steps")
    threshold = data.draw(st.sampled_from([config.PARALLEL_THRESHOLD, SMALL_THRESHOLD]), label="threshold")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    p0, grads = problem(shape, dtype, steps, seed)
    with parallel_threshold(threshold), np.errstate(all="ignore"):
        p, opt, q, st_ref = run_pair(case, p0, grads, hyper, check_every_step=True)
    assert p.dtype == dtype and p.shape == shape


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_property_hyper_parameter_changes_between_steps(data):
    """Any sequence of per-step hyper-parameter values (a schedule) matches the reference with them."""
    case = data.draw(st.sampled_from(DENSE), label="optimizer")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    steps = data.draw(st.integers(2, 5), label="steps")
    schedule = [data.draw(case.hyper_strategy(), label=f"hyper at step {i}") for i in range(steps)]
    p0, grads = problem((9,), dtype, steps, data.draw(st.integers(0, 2**31 - 1), label="seed"))
    p = p0.copy()
    opt = case.cls([p], **schedule[0])
    q = p0.copy()
    st_ref = case.init_state(q, **schedule[0])
    with np.errstate(all="ignore"):
        for hyper, g in zip(schedule, grads):
            opt.param_groups[0].update(hyper)
            opt.step([g])
            case.reference(q, g, st_ref, **hyper)
            assert_close(p, q, RTOL[np.dtype(dtype)])
