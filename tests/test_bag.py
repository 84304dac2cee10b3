"""Embedding bags: fastadapt.BagGrad (coalesced into a RowGrad's form) and fastadapt.embedding_bag.

* the coalescing pass against a numpy reference (``np.add.at`` in lookup order), bit for bit, on
  each of its three grouping paths (counting sort, key sort, argsort), sum/mean/weights, empty bags,
  duplicate ids within and across bags, float32/float64;
* ``opt.step([BagGrad])`` equals ``opt.step([RowGrad(rows, values)])`` of the reference's rows and
  values bit for bit, for every optimizer, lazy and exact;
* the forward against numpy, and both against torch's ``embedding_bag`` where torch is importable;
* hostile input: a clear exception, parameters and state bit-identical; non-finite values follow
  ``nonfinite=`` as a RowGrad's do;
* 1e6 lookups: fast, and no per-lookup ``(n, dim)`` array.
"""

from __future__ import annotations

import doctest
import time
import tracemalloc

import numpy as np
import pytest

import fastadapt as fa
from fastadapt import config, grads
from fastadapt.grads import bag as bagmod
from fastadapt.grads.bag import BagIndexError, canonical_bag

from conftest import DTYPES, DTYPE_IDS
from optimizers import OPTIMIZERS, config_id

NROWS, DIM = 23, 5


# --------------------------------------------------------------------------------------------------
# numpy references
# --------------------------------------------------------------------------------------------------


def bag_of(offsets):
    offsets = np.asarray(offsets, np.int64)
    return np.repeat(np.arange(offsets.size - 1), np.diff(offsets))


def scales(offsets, weights, mode, dtype, n):
    s = np.ones(n, dtype) if weights is None else np.asarray(weights).astype(dtype)
    if mode == "mean":
        s = s / np.diff(np.asarray(offsets, np.int64))[bag_of(offsets)].astype(dtype)
    return s


def ref_coalesce(indices, offsets, grad_out, weights, mode, nrows, dtype):
    """(rows, values): np.add.at of grad_out[bag] * s in lookup order, in ``dtype``."""
    indices = np.asarray(indices, np.int64)
    contrib = np.asarray(grad_out).astype(dtype)[bag_of(offsets)] * scales(offsets, weights, mode, dtype,
                                                                          indices.size)[:, None]
    out = np.zeros((nrows, contrib.shape[1]), dtype)
    np.add.at(out, indices, contrib)
    rows = np.unique(indices)
    return rows, out[rows]


def ref_forward(table, indices, offsets, weights, mode):
    dtype = table.dtype
    indices = np.asarray(indices, np.int64)
    s = np.ones(indices.size, dtype) if weights is None else np.asarray(weights).astype(dtype)
    out = np.zeros((len(offsets) - 1, table.shape[1]), dtype)
    np.add.at(out, bag_of(offsets), table[indices] * s[:, None])
    if mode == "mean":
        sizes = np.diff(np.asarray(offsets, np.int64))
        nz = sizes > 0
        out[nz] = out[nz] / sizes[nz, None].astype(dtype)
    return out


def random_bags(rng, nrows, n_bags, max_bag=6, dim=DIM, hot=None):
    """indices, offsets, grad_out: empty bags, duplicate ids inside a bag and across bags."""
    sizes = rng.integers(0, max_bag + 1, n_bags)
    sizes[::4] = 0                                          # empty bags
    offsets = np.zeros(n_bags + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    n = int(offsets[-1])
    indices = rng.integers(0, nrows if hot is None else hot, n)
    for b in range(n_bags):
        a, e = offsets[b], offsets[b + 1]
        if e - a >= 3:
            indices[e - 1] = indices[a]                     # duplicate within the bag
    if n >= 2:
        indices[-1] = indices[0]                            # and across bags
    grad_out = rng.standard_normal((n_bags, dim)) * 10.0 ** rng.uniform(-2, 1, (n_bags, 1))
    return indices, offsets, grad_out


# --------------------------------------------------------------------------------------------------
# the coalescing pass and the forward vs numpy
# --------------------------------------------------------------------------------------------------

PATHS = {"counting": 40, "keysort": 10**7, "argsort": 2**60}      # nrows selecting each grouping path


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("path", list(PATHS))
def test_coalesce_matches_numpy_bit_for_bit(path, mode, weighted, dtype):
    rng = np.random.default_rng(1)
    nrows = PATHS[path]
    indices, offsets, grad_out = random_bags(rng, nrows, 60, hot=40)
    weights = rng.standard_normal(indices.size) if weighted else None
    rows, values = canonical_bag(fa.BagGrad(indices.astype(np.int32), offsets, grad_out, weights, mode),
                                 nrows, DIM, dtype)
    r_ref, v_ref = ref_coalesce(indices, offsets, grad_out, weights, mode, 40, dtype)
    assert rows.dtype == np.int64 and np.array_equal(rows, r_ref)
    assert values.dtype == np.dtype(dtype) and values.flags.c_contiguous
    assert np.array_equal(values, v_ref)
    assert np.all(np.diff(rows) > 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_coalesce_corner_cases(dtype):
    # no lookups at all; no bags; every bag empty; one row everywhere; a zero weight still touches its row
    for indices, offsets in (([], [0]), ([], [0, 0, 0]), ([4, 4, 4], [0, 1, 3]), ([2, 5], [0, 2])):
        n_bags = len(offsets) - 1
        g = np.arange(n_bags * DIM, dtype=np.float64).reshape(n_bags, DIM)
        w = np.array([0.0, 1.0])[: len(indices)] if len(indices) == 2 else None
        for mode in ("sum", "mean"):
            rows, values = canonical_bag(fa.BagGrad(indices, offsets, g, w, mode), NROWS, DIM, dtype)
            r_ref, v_ref = ref_coalesce(indices, offsets, g, w, mode, NROWS, dtype)
            assert np.array_equal(rows, r_ref) and np.array_equal(values, v_ref)
            assert values.shape == (len(r_ref), DIM)


def test_caller_arrays_are_not_modified():
    rng = np.random.default_rng(2)
    indices, offsets, grad_out = random_bags(rng, NROWS, 9)
    weights = rng.standard_normal(indices.size).astype(np.float32)
    copies = [a.copy() for a in (indices, offsets, grad_out, weights)]
    p = rng.standard_normal((NROWS, DIM)).astype(np.float32)
    fa.Adam([p]).step([fa.BagGrad(indices, offsets, grad_out, weights)])
    fa.embedding_bag(p, indices, offsets, per_sample_weights=weights)
    for a, b in zip(copies, (indices, offsets, grad_out, weights)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_forward_matches_numpy(mode, weighted, dtype):
    rng = np.random.default_rng(3)
    table = rng.standard_normal((NROWS, DIM)).astype(dtype)
    indices, offsets, _ = random_bags(rng, NROWS, 30)
    weights = rng.standard_normal(indices.size) if weighted else None
    out = fa.embedding_bag(table, indices, offsets, mode=mode, per_sample_weights=weights)
    assert out.dtype == np.dtype(dtype) and out.shape == (30, DIM)
    assert np.array_equal(out, ref_forward(table, indices, offsets, weights, mode))
    assert not out[::4].any()                                   # the empty bags
    # a non-contiguous table is read as it is
    wide = np.zeros((NROWS, 2 * DIM), dtype)
    wide[:, ::2] = table
    assert np.array_equal(fa.embedding_bag(wide[:, ::2], indices, offsets, mode=mode, per_sample_weights=weights),
                          out)


def test_forward_and_backward_agree_with_the_linear_map():
    """<grad_out, forward(E)> == <E, backward(grad_out)>: the two use one convention."""
    rng = np.random.default_rng(4)
    E = rng.standard_normal((NROWS, DIM))
    indices, offsets, grad_out = random_bags(rng, NROWS, 20)
    w = rng.standard_normal(indices.size)
    for mode in ("sum", "mean"):
        lhs = np.sum(grad_out * fa.embedding_bag(E, indices, offsets, mode, w))
        rows, values = canonical_bag(fa.BagGrad(indices, offsets, grad_out, w, mode), NROWS, DIM, np.float64)
        np.testing.assert_allclose(lhs, np.sum(E[rows] * values), rtol=1e-12)


def test_docstring_examples():
    assert doctest.testmod(bagmod, verbose=False).failed == 0


def test_public_names():
    assert fa.BagGrad is bagmod.BagGrad and fa.embedding_bag is bagmod.embedding_bag
    assert {"BagGrad", "embedding_bag"} <= set(fa.__all__)
    assert "BagGrad(n=3, n_bags=2" in repr(fa.BagGrad([1, 2, 3], [0, 1, 3], np.zeros((2, 4))))


# --------------------------------------------------------------------------------------------------
# opt.step([BagGrad]) == opt.step([RowGrad(rows, values)]), bit for bit, every optimizer and mode
# --------------------------------------------------------------------------------------------------

STEP_GRID = [(c, m, o) for c in OPTIMIZERS for m in c.modes for o in ({}, dict(c.rich))]


def _raw_state(opt, p):
    out = {}
    for k, v in opt.state_of(p).items():
        if k == "_decay":                       # exact mode's pending decay: its per-row stamps
            out[k] = (v.stamp.copy(), v.pending)
        else:
            out[k] = np.asarray(v).copy() if hasattr(v, "shape") else v
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case,mode,hyper", STEP_GRID, ids=map(config_id, STEP_GRID))
def test_step_equals_row_grad_bit_for_bit(case, mode, hyper, dtype):
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal((NROWS, DIM)).astype(dtype)
    p, q = p0.copy(), p0.copy()
    opt_b = case.cls([p], **case.mode_options(mode), **hyper)
    opt_r = case.cls([q], **case.mode_options(mode), **hyper)
    for i in range(4):
        bag_mode = ("sum", "mean")[i % 2]
        indices, offsets, grad_out = random_bags(rng, NROWS - 1, 8)       # the last row is never touched
        weights = rng.standard_normal(indices.size) if i >= 2 else None
        rows, values = ref_coalesce(indices, offsets, grad_out, weights, bag_mode, NROWS, dtype)
        assert opt_b.step([fa.BagGrad(indices, offsets, grad_out, weights, bag_mode)]) is True
        assert opt_r.step([fa.RowGrad(rows, values)]) is True
    assert np.array_equal(p, q)
    sb, sr = _raw_state(opt_b, p), _raw_state(opt_r, q)
    assert sb.keys() == sr.keys()
    for k in sb:
        if k == "_decay":
            assert np.array_equal(sb[k][0], sr[k][0]) and sb[k][1] == sr[k][1]
        else:
            assert np.array_equal(sb[k], sr[k]), k
    if mode == "lazy":
        assert np.array_equal(p[-1], p0[-1])


def test_bag_and_dense_gradients_mix_in_one_step():
    rng = np.random.default_rng(6)
    E, W = rng.standard_normal((NROWS, DIM)), rng.standard_normal(7)
    E2, W2 = E.copy(), W.copy()
    indices, offsets, grad_out = random_bags(rng, NROWS, 5)
    gW = rng.standard_normal(7)
    fa.Adam([E, W], lr=0.1).step([fa.BagGrad(indices, offsets, grad_out), gW])
    rows, values = ref_coalesce(indices, offsets, grad_out, None, "sum", NROWS, np.float64)
    fa.Adam([E2, W2], lr=0.1).step([fa.RowGrad(rows, values), gW])
    assert np.array_equal(E, E2) and np.array_equal(W, W2)


def test_compressed_state_takes_bag_gradients():
    rng = np.random.default_rng(7)
    E = rng.standard_normal((64, 128)).astype(np.float32)
    E2 = E.copy()
    indices, offsets, grad_out = random_bags(rng, 64, 10, dim=128)
    rows, values = ref_coalesce(indices, offsets, grad_out, None, "mean", 64, np.float32)
    fa.Adam([E], state_dtype="bfloat16", state_rounding="nearest").step(
        [fa.BagGrad(indices, offsets, grad_out, mode="mean")])
    fa.Adam([E2], state_dtype="bfloat16", state_rounding="nearest").step([fa.RowGrad(rows, values)])
    assert np.array_equal(E, E2)


# --------------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_forward_and_backward_vs_torch(mode, weighted, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    table = rng.standard_normal((NROWS, DIM)).astype(dtype)
    indices, offsets, grad_out = random_bags(rng, NROWS, 25)
    grad_out = grad_out.astype(dtype)
    weights = rng.standard_normal(indices.size).astype(dtype) if weighted else None
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)

    weight = torch.tensor(table, requires_grad=True)
    for include_last in (True, False):
        t_off = torch.tensor(offsets if include_last else offsets[:-1])
        out = torch.nn.functional.embedding_bag(
            torch.tensor(indices), weight, t_off, mode=mode, include_last_offset=include_last,
            per_sample_weights=None if weights is None else torch.tensor(weights))
        mine = fa.embedding_bag(table, indices, offsets, mode=mode, per_sample_weights=weights)
        np.testing.assert_allclose(mine, out.detach().numpy(), **tol)
        weight.grad = None
        out.backward(torch.tensor(grad_out))
        dense = weight.grad.numpy()
        rows, values = canonical_bag(fa.BagGrad(indices, offsets, grad_out, weights, mode), NROWS, DIM, dtype)
        assert np.array_equal(rows, np.unique(indices))
        np.testing.assert_allclose(values, dense[rows], **tol)
        untouched = np.setdiff1d(np.arange(NROWS), rows)
        assert not dense[untouched].any()


# --------------------------------------------------------------------------------------------------
# hostile input: a clear exception, nothing changed
# --------------------------------------------------------------------------------------------------

G2 = np.ones((2, DIM))


class FakeDevice:
    """Looks like a CUDA array to fastadapt (``__cuda_array_interface__``), is not one."""

    __cuda_array_interface__ = {"shape": (2,), "typestr": "<i8", "data": (0, False), "version": 3}
    shape = (2,)
    ndim = 1
    dtype = np.dtype(np.int64)


#: (name, BagGrad arguments (indices, offsets, grad_out, weights), exception, match) -- checked by step()
#: and, but for grad_out's own problems, by embedding_bag
HOSTILE = [
    ("id too large", ([1, NROWS], [0, 1, 2], G2, None), BagIndexError, rf"index {NROWS} \(lookup 1\)"),
    ("id negative", ([1, -1], [0, 1, 2], G2, None), BagIndexError, r"index -1 .*not wrapped"),
    ("huge uint id", (np.array([2**64 - 1, 0], np.uint64), [0, 1, 2], G2, None), BagIndexError, "out of range"),
    ("float ids", ([1.0, 2.0], [0, 1, 2], G2, None), TypeError, r"indices must be an integer array.*astype"),
    ("bool ids", ([True, False], [0, 1, 2], G2, None), TypeError, "indices must be an integer array"),
    ("2-d ids", ([[1, 2]], [0, 1, 2], G2, None), ValueError, "indices must be 1-D"),
    ("float offsets", ([1, 2], [0.0, 1.0, 2.0], G2, None), TypeError, "offsets must be an integer array"),
    ("empty offsets", ([], [], np.ones((0, DIM)), None), ValueError, "offsets is empty"),
    ("offsets start", ([1, 2], [1, 1, 2], G2, None), ValueError, r"offsets\[0\] is 1; offsets start at 0"),
    ("offsets decrease", ([1, 2, 3], [0, 2, 1, 3], np.ones((3, DIM)), None), ValueError,
     r"offsets decrease at bag 1 \(offsets\[1\] = 2, offsets\[2\] = 1\)"),
    ("offsets short end", ([1, 2, 3], [0, 1, 2], G2, None), ValueError,
     r"offsets end at 2 but indices has 3 entries.*append"),
    ("offsets past end", ([1, 2], [0, 1, 5], G2, None), ValueError, "offsets end at 5 but indices has 2"),
    ("offsets vs grad_out", ([1, 2], [0, 2], G2, None), ValueError,
     r"grad_out has 2 rows but offsets describes 1 bags"),
    ("weights length", ([1, 2], [0, 1, 2], G2, [1.0]), ValueError, r"one weight per lookup, shape \(2,\)"),
    ("weights integer", ([1, 2], [0, 1, 2], G2, [1, 2]), TypeError, r"per_sample_weights has integer dtype"),
    ("weights complex", ([1, 2], [0, 1, 2], G2, np.ones(2, complex)), TypeError, "complex dtype"),
    ("grad_out 1-d", ([1, 2], [0, 1, 2], np.ones(DIM), None), ValueError, r"grad_out must be 2-D"),
    ("grad_out 3-d", ([1, 2], [0, 1, 2], np.ones((2, DIM, 1)), None), ValueError, r"grad_out must be 2-D"),
    ("grad_out dim", ([1, 2], [0, 1, 2], np.ones((2, DIM + 1)), None), ValueError,
     rf"rows of {DIM + 1} elements but the table's rows have {DIM}"),
    ("grad_out integer", ([1, 2], [0, 1, 2], np.ones((2, DIM), np.int64), None), TypeError,
     "grad_out has integer dtype"),
    ("device ids", (FakeDevice(), [0, 1, 2], G2, None), TypeError, "host \\(numpy\\) only"),
    ("device grad_out", ([1, 2], [0, 1, 2], type("D", (FakeDevice,), {"shape": (2, DIM), "ndim": 2})(), None),
     TypeError, "grad_out is a device array"),
]
FORWARD_ONLY_NOT = ("offsets vs grad_out", "grad_out 1-d", "grad_out 3-d", "grad_out dim", "grad_out integer",
                    "device grad_out")


def _optimizer(mode, rng):
    good, p, flat = rng.standard_normal((NROWS, DIM)), rng.standard_normal((NROWS, DIM)), rng.standard_normal(9)
    opt = fa.RMSprop([good, p, flat], sparse_mode=mode, centered=True, momentum=0.9)
    for _ in range(2):     # state exists, and (exact) decay is pending
        opt.step([fa.RowGrad([1], np.ones((1, DIM))), fa.BagGrad([2, 3], [0, 2], np.ones((1, DIM))),
                  fa.RowGrad([3], np.ones(1))])
    return opt, [good, p, flat]


def snapshot(opt, params):
    return ([q.copy() for q in params], [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
                                         for st in opt.state], opt.skipped_steps)


def assert_unchanged(before, opt, params):
    ps, states, skipped = before
    for a, b in zip(ps, params):
        assert np.array_equal(a, b, equal_nan=True)
    assert opt.skipped_steps == skipped
    for sa, sb in zip(states, opt.state):
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], np.ndarray):
                assert np.array_equal(sa[k], sb[k], equal_nan=True), k
            elif k == "_decay":
                assert np.array_equal(sa[k].stamp, sb[k].stamp) and sa[k].pending == sb[k].pending
            else:
                assert sa[k] == sb[k], k


@pytest.mark.parametrize("args,exc,match", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
@pytest.mark.parametrize("mode", ["lazy", "exact"])
def test_hostile_bag_gradient_raises_and_changes_nothing(args, exc, match, mode):
    opt, params = _optimizer(mode, np.random.default_rng(9))
    before = snapshot(opt, params)
    with pytest.raises(exc, match=match):
        opt.step([fa.RowGrad([0], np.ones((1, DIM))), fa.BagGrad(*args), None])   # the good gradient comes first
    assert_unchanged(before, opt, params)
    assert opt.step([None, fa.BagGrad([1, 2], [0, 1, 2], G2), None]) is True      # and it carries on


@pytest.mark.parametrize("args,exc,match", [h[1:] for h in HOSTILE if h[0] not in FORWARD_ONLY_NOT],
                         ids=[h[0] for h in HOSTILE if h[0] not in FORWARD_ONLY_NOT])
def test_hostile_forward_input_raises_the_same(args, exc, match):
    table = np.ones((NROWS, DIM))
    indices, offsets, _, weights = args
    with pytest.raises(exc, match=match):
        fa.embedding_bag(table, indices, offsets, per_sample_weights=weights)


def test_out_of_range_id_is_an_index_error_and_a_value_error():
    for exc in (IndexError, ValueError):
        with pytest.raises(exc):
            fa.embedding_bag(np.ones((3, 2)), [3], [0, 1])


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be 'sum' or 'mean', got 'max'.*not supported"):
        fa.BagGrad([1], [0, 1], np.ones((1, DIM)), mode="max")
    with pytest.raises(ValueError, match="mode must be 'sum' or 'mean'"):
        fa.embedding_bag(np.ones((3, 2)), [1], [0, 1], mode="Sum")
    g = fa.BagGrad([1], [0, 1], np.ones((1, DIM)))
    g.mode = "max"                               # changed after construction: step() checks it too
    opt, params = _optimizer("lazy", np.random.default_rng(10))
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="mode must be"):
        opt.step([None, g, None])
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("shape", [(9,), (NROWS, DIM, 1)], ids=["1-d", "3-d"])
def test_bag_gradient_needs_a_2d_table(shape):
    p = np.zeros(shape)
    opt = fa.Adam([p])
    with pytest.raises(ValueError, match=r"BagGrad needs a 2-D table \(nrows, dim\)"):
        opt.step([fa.BagGrad([1], [0, 1], np.ones((1, shape[-1])))])
    assert not p.any() and opt.state_of(p).get("step", 0) == 0


def test_forward_table_checks():
    with pytest.raises(ValueError, match="table must be 2-D"):
        fa.embedding_bag(np.ones(4), [1], [0, 1])
    with pytest.raises(TypeError, match="the table has integer dtype"):
        fa.embedding_bag(np.ones((4, 2), np.int32), [1], [0, 1])
    with pytest.raises(TypeError, match="host"):
        fa.embedding_bag(type("D", (FakeDevice,), {"shape": (4, 2), "ndim": 2})(), [1], [0, 1])


def test_device_parameter_refused():
    p = type("D", (FakeDevice,), {"shape": (NROWS, DIM), "ndim": 2, "dtype": np.dtype(np.float32)})()
    with pytest.raises(TypeError, match=r"BagGrad is host only for now.*RowGrad of device arrays"):
        grads.prepare_grad(fa.BagGrad([1], [0, 1], np.ones((1, DIM))), p, None, "gradient 0")


# --------------------------------------------------------------------------------------------------
# non-finite values: as a RowGrad with the coalesced values
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("where", ["grad_out", "weights", "overflow"])
def test_nonfinite_follows_the_policy(policy, where):
    dtype = np.float32 if where == "overflow" else np.float64
    p = np.zeros((NROWS, DIM), dtype)
    opt = fa.RMSprop([p], nonfinite=policy, sparse_mode="exact")
    opt.step([fa.BagGrad([0], [0, 1], np.ones((1, DIM)))])
    before = snapshot(opt, [p])
    g_out, w = np.ones((2, DIM)), np.ones(3)
    if where == "grad_out":
        g_out[1, 2] = np.nan
    elif where == "weights":
        w[0] = np.inf
    else:
        g_out[0, 0] = 1e300                           # finite in float64, inf once cast to float32
    bad = fa.BagGrad([4, 5, 4], [0, 2, 3], g_out, w)
    if policy == "skip":
        assert opt.step([bad]) is False
        before = (before[0], before[1], before[2] + 1)
    else:
        with pytest.raises(FloatingPointError):
            opt.step([bad])
    assert_unchanged(before, opt, [p])
    assert opt.step([fa.BagGrad([0], [0, 1], np.ones((1, DIM)))]) is True
    assert opt.state_of(p)["step"] == 2


def test_nonfinite_propagates_as_a_row_grad_and_an_empty_bag_carries_nothing():
    g_out = np.ones((3, DIM))
    g_out[0, 1] = np.nan
    g_out[1, :] = np.inf                              # bag 1 is empty: contributes nothing
    p, q = np.zeros((NROWS, DIM)), np.zeros((NROWS, DIM))
    rows, values = ref_coalesce([2, 7, 2], [0, 2, 2, 3], g_out, None, "sum", NROWS, np.float64)
    assert np.isnan(values).any() and not np.isinf(values).any()
    fa.Adam([p]).step([fa.BagGrad([2, 7, 2], [0, 2, 2, 3], g_out)])
    fa.Adam([q]).step([fa.RowGrad(rows, values)])
    assert np.array_equal(p, q, equal_nan=True) and np.isnan(p[2, 1])
    g_out = np.ones((2, DIM))
    g_out[0] = np.inf                                 # bag 0 is empty: the step is finite
    assert fa.Adam([np.zeros((NROWS, DIM))], nonfinite="raise").step([fa.BagGrad([2], [0, 0, 1], g_out)]) is True


# --------------------------------------------------------------------------------------------------
# scale
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nrows", [200_000, 50_000_000], ids=["counting-sort", "key-sort"])
def test_a_million_lookups_fast_and_without_a_per_lookup_array(nrows):
    rng = np.random.default_rng(11)
    n, dim, n_bags = 1_000_000, 64, 20_000
    offsets = np.linspace(0, n, n_bags + 1).astype(np.int64)
    indices = rng.integers(0, nrows, n)
    indices[: 9 * n // 10] = rng.integers(0, 1000, 9 * n // 10)    # hot rows: many duplicates
    grad_out = rng.standard_normal((n_bags, dim)).astype(np.float32)
    g = fa.BagGrad(indices, offsets, grad_out, mode="mean")
    canonical_bag(g, nrows, dim, np.float32)                      # compiled (or loaded from the cache)
    tracemalloc.start()
    t0 = time.perf_counter()
    rows, values = canonical_bag(g, nrows, dim, np.float32)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 3.0, elapsed                                # ~0.1 s on the project's 2-core machine
    # the result and a few int64 per lookup: far below one (n, dim) float32 array of contributions
    assert peak <= values.nbytes + 48 * n < n * dim * 4, (peak, values.nbytes)
    assert np.array_equal(rows, np.unique(indices))
    # the total gradient mass: each bag's grad_out once (mean), in float64 for the comparison
    np.testing.assert_allclose(values.astype(np.float64).sum(0), grad_out.astype(np.float64).sum(0),
                               rtol=1e-3, atol=1e-2)
    # a few rows against the reference, bit for bit
    bags = bag_of(offsets)
    s = (np.float32(1) / np.diff(offsets)[bags].astype(np.float32))
    for u in (0, 1, rows.size // 2, rows.size - 1):
        ts = np.flatnonzero(indices == rows[u])
        acc = np.zeros(dim, np.float32)
        for t in ts:
            acc = acc + grad_out[bags[t]] * s[t]
        assert np.array_equal(values[u], acc)
