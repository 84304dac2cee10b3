"""ShardedOptimizer under mpiexec (run by tests/test_distributed.py with -n 2 and -n 3).

Every check compares P ranks with one process given the combined gradients, which
every rank recomputes from seeded generators.  The gradients are dyadic (few
significant bits, per-element powers of two), so their sum is exact in any order and
the sharded run must match the single process bit for bit.
"""

import copy
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: the optimizer table
from common import COMM, RANK, SIZE, expect_raise, passed, same_everywhere  # noqa: E402

import fastadapt as fa  # noqa: E402
from fastadapt import config  # noqa: E402
from fastadapt.distributed import ShardedOptimizer  # noqa: E402
from optimizers import ELEMENTWISE, rich_and_plain  # noqa: E402

config.MPI_CHUNK_ELEMENTS = 8           # many reduce-scatter rounds even on these small parameters

SHAPES = [((6, 5), np.float64), ((4, 3), np.float32), ((7,), np.float64)]   # w, e, b; two dtype buckets


def make_params(rank_offset=0.0, flat=False):
    rng = np.random.default_rng(1)
    vals = [rng.standard_normal(s).astype(d) + d(rank_offset) for s, d in SHAPES]
    if not flat:
        return vals
    # the float64 parameters back to back in one buffer (the no-copy path)
    buf = np.empty(30 + 7)
    w, b = buf[:30].reshape(6, 5), buf[30:]
    w[...], b[...] = vals[0], vals[2]
    return [w, vals[1].copy(), b]


def groups_of(ps, lr):
    return [{"params": [ps[0], ps[1]], "lr": lr}, {"params": [ps[2]]}]


def rank_grads(r, t, dyadic=True, flat=False, nones=True):
    """Rank r's gradients at step t (None where that rank has none)."""
    rng = np.random.default_rng((7, r, t))
    out = []
    for j, (s, d) in enumerate(SHAPES):
        if dyadic:
            g = (rng.integers(-1024, 1025, s) * np.exp2(rng.integers(-12, -6, s))).astype(d)
        else:
            g = (rng.standard_normal(s) * 10.0 ** rng.uniform(-2, 1)).astype(d)
        out.append(g)
    if nones and (t + r) % 4 == 0:
        out[2] = None                      # this rank has no gradient for b
    if nones and t % 5 == 3:
        out[1] = None                      # no rank has one for e: e is not stepped
    if flat and out[2] is not None:
        buf = np.empty(37)
        buf[:30], buf[30:] = out[0].reshape(-1), out[2]
        out[0], out[2] = buf[:30].reshape(6, 5), buf[30:]
    return out


def combined(t, reduce, dyadic=True, nones=True):
    """What one process is given: the ranks' gradients summed (in rank order), or averaged."""
    out = []
    for j, (s, d) in enumerate(SHAPES):
        parts = [rank_grads(r, t, dyadic, nones=nones)[j] for r in range(SIZE)]
        parts = [g for g in parts if g is not None]
        if not parts:
            out.append(None)
            continue
        g = parts[0].copy()
        for x in parts[1:]:
            g += x
        if reduce == "mean":
            g = np.divide(g, d(SIZE))
        out.append(g)
    return out


#: the rich and the plain config of every dense case of tests/optimizers.py, under the three
#: non-finite policies in turn
CONFIGS = [(c.cls, dict(o, nonfinite=("propagate", "skip", "raise")[n % 3]))
           for n, (c, _, o) in enumerate(rich_and_plain(ELEMENTWISE))]


def assert_same_state(full, ref_sd):
    assert set(full["state"]) == set(ref_sd["state"]), (sorted(full["state"]), sorted(ref_sd["state"]))
    for j, st in ref_sd["state"].items():
        assert set(full["state"][j]) == set(st), (j, sorted(full["state"][j]), sorted(st))
        for name, v in st.items():
            got = full["state"][j][name]
            if name == "step" or isinstance(v, float):           # the count, or a carried scalar
                assert got == v and type(got) is type(v), (j, got, v)
            else:
                assert got.dtype == v.dtype and got.shape == v.shape, (j, name)
                assert got.tobytes() == v.tobytes(), (j, name, np.max(np.abs(got - v)))
    assert full["param_groups"] == ref_sd["param_groups"]


def run(cls, kw, reduce, steps, *, dyadic=True, flat=False, nones=True, opt=None, params=None, ref=None,
        start=0):
    """Step a sharded optimizer and a single-process one side by side."""
    if opt is None:
        params = make_params(rank_offset=RANK, flat=flat)     # rank 0's values win (broadcast)
        opt = ShardedOptimizer(cls, groups_of(params, 0.05), comm=COMM, reduce=reduce, **kw)
        ref_params = make_params()
        ref = (cls(groups_of(ref_params, 0.05), **kw), ref_params)
    for t in range(start, start + steps):
        if t == 6:                                             # a schedule: same change everywhere
            opt.param_groups[0]["lr"] = 0.02
            ref[0].param_groups[0]["lr"] = 0.02
        assert opt.step(rank_grads(RANK, t, dyadic, flat, nones)) is True
        ref[0].step(combined(t, reduce, dyadic, nones))
    return opt, params, ref


# ---------------------------------------------------------------------------------- equivalence

for n, (cls, kw) in enumerate(CONFIGS):
    reduce = "mean" if n % 2 else "sum"
    opt, params, (ref, ref_params) = run(cls, kw, reduce, 12)
    for p, q in zip(params, ref_params):
        assert p.dtype == q.dtype and p.tobytes() == q.tobytes(), (cls.__name__, kw, np.max(np.abs(p - q)))
    full = opt.consolidated_state_dict(root=0)
    if RANK == 0:
        assert_same_state(full, ref.state_dict())
    else:
        assert full is None
    # each rank holds its shard of the state, the shards add up to the whole
    total = COMM.allreduce(opt.state_nbytes())
    ref_bytes = sum(v.nbytes for st in ref.state for v in st.values() if isinstance(v, np.ndarray))
    assert total == ref_bytes, (total, ref_bytes)
    assert opt.state_nbytes() <= ref_bytes // SIZE + 3 * 2 * 8 + 1, (opt.state_nbytes(), ref_bytes)
    assert opt.timings["steps"] == 12 and opt.timings["kernel"] > 0
passed("bit-for-bit equivalence, every optimizer and option, sum and mean, uneven shards, None gradients")

# gradients whose sum depends on the order: the ranks' gradients are added in rank order, as
# combined() does, so still the same bits (and the replicas are identical)
for reduce in ("sum", "mean"):
    opt, params, (ref, ref_params) = run(fa.Adam, dict(lr=0.01, amsgrad=True), reduce, 12, dyadic=False)
    for p, q in zip(params, ref_params):
        assert p.tobytes() == q.tobytes(), np.max(np.abs(p - q))
        assert same_everywhere(p)
passed("general gradients: summed in rank order, bit-for-bit, replicas identical")

# parameters and gradients back to back in one buffer: no packing, all-gather into the parameters
opt, params, (ref, ref_params) = run(fa.Adam, dict(lr=0.01), "sum", 8, flat=True, nones=False)
assert opt._buckets[0].param_block is not None and opt._buckets[0]._buffer is None
for p, q in zip(params, ref_params):
    assert p.tobytes() == q.tobytes()
passed("contiguous parameters and gradients: no copies, same bits")

# ---------------------------------------------------------------------------------- state_dict

cls, kw = fa.Adam, dict(lr=0.01, amsgrad=True)
opt, params, ref = run(cls, kw, "sum", 6)
shard = copy.deepcopy(opt.state_dict())
full = opt.consolidated_state_dict(root=None)
saved = [p.copy() for p in params]
run(cls, kw, "sum", 6, opt=opt, params=params, ref=ref, start=6)
expected = [p.copy() for p in params]
for sd in (shard, full):                       # per-rank shard, and the consolidated dict
    ps = [p.copy() for p in saved]
    opt2 = ShardedOptimizer(cls, groups_of(ps, 0.05), comm=COMM, **kw)
    opt2.load_state_dict(sd)
    for t in range(6, 12):
        if t == 6:
            opt2.param_groups[0]["lr"] = 0.02
        opt2.step(rank_grads(RANK, t))
    for p, q in zip(ps, expected):
        assert p.tobytes() == q.tobytes()
if RANK == 0:                                  # the consolidated dict is an ordinary state_dict
    ps = [p.copy() for p in saved]
    single = cls(groups_of(ps, 0.05), **kw)
    single.load_state_dict(full)
    for t in range(6, 12):
        if t == 6:
            single.param_groups[0]["lr"] = 0.02
        single.step(combined(t, "sum"))
    for p, q in zip(ps, expected):
        assert p.tobytes() == q.tobytes()
opt.param_groups[1]["lr"] = 0.125                       # a change not yet stepped is saved too
assert opt.state_dict()["param_groups"][1]["lr"] == 0.125
assert opt.consolidated_state_dict(root=None)["param_groups"][1]["lr"] == 0.125
opt.param_groups[1]["lr"] = 0.05
passed("state_dict: per-rank shards and consolidated dicts load back and continue bit-exactly")

# a shard of another rank is refused by every rank; a bad dict on one rank only changes nothing anywhere
if SIZE > 1:
    other = COMM.sendrecv(shard, dest=(RANK + 1) % SIZE, source=(RANK - 1) % SIZE)
    expect_raise(ValueError, opt.load_state_dict, other, match="shard")
bad = copy.deepcopy(shard)
if RANK == SIZE - 1:
    j = next(iter(bad["state"]))
    bad["state"][j]["exp_avg"] = bad["state"][j]["exp_avg"][:-1]
before = opt.consolidated_state_dict(root=None)
e = expect_raise((ValueError, RuntimeError), opt.load_state_dict, bad)
assert isinstance(e, ValueError if RANK == SIZE - 1 else RuntimeError), e
assert_same_state(opt.consolidated_state_dict(root=None), before)
passed("load_state_dict: wrong shards and bad dicts are refused on every rank, nothing changes")

# ---------------------------------------------------------------------------------- faults, validation

params = make_params()
opt = ShardedOptimizer(fa.Adam, groups_of(params, 0.05), comm=COMM, lr=0.01)
good = rank_grads(RANK, 0)
bad = list(good)
if RANK == SIZE - 1:
    bad[0] = np.zeros((5, 6))
e = expect_raise((ValueError, RuntimeError), opt.step, bad)
if RANK == SIZE - 1:
    assert isinstance(e, ValueError) and "shape" in str(e)
else:
    assert isinstance(e, RuntimeError) and f"rank {SIZE - 1}" in str(e) and "nothing was changed" in str(e)
assert all(p.tobytes() == q.tobytes() for p, q in zip(params, make_params()))
assert opt.step(good) is True                  # and it carries on
if SIZE > 1:
    if RANK == 0:
        opt.param_groups[1]["lr"] = 0.5        # a schedule applied on one rank only
    expect_raise(ValueError, opt.step, good, match="hyper-parameters differ")
opt.param_groups[1]["lr"] = 0.01
opt.param_groups[1]["lr"] = -1.0               # the same bad value everywhere
expect_raise(ValueError, opt.step, good, match="lr")
passed("step validation: one rank's bad gradient makes every rank raise, then training continues")

if SIZE > 1:
    shape = (6, 5) if RANK == 0 else (5, 6)
    e = expect_raise(ValueError, ShardedOptimizer, fa.Adam, [np.zeros(shape)], comm=COMM)
    assert "parameter 0 has shape (6, 5)" in str(e) and "(5, 6)" in str(e), e
    expect_raise(ValueError, ShardedOptimizer, fa.Adam, [np.zeros(3)], comm=COMM, lr=0.1 * (RANK + 1),
                 match="hyper-parameters differ")
    arg = np.zeros(3, dtype=np.int64 if RANK == 1 else np.float64)
    e = expect_raise((TypeError, RuntimeError), ShardedOptimizer, fa.Adam, [arg], comm=COMM)
    assert isinstance(e, TypeError if RANK == 1 else RuntimeError), e
expect_raise(TypeError, ShardedOptimizer, fa.SparseAdam, [np.zeros(3)], comm=COMM, match="ShardedTable")
expect_raise(ValueError, ShardedOptimizer, fa.Adam, [np.zeros(0)], comm=COMM, match="no elements")
expect_raise(ValueError, ShardedOptimizer, fa.Adam, [np.zeros(3)], comm=COMM, reduce="max")
passed("construction: shapes, dtypes and hyper-parameters compared across ranks before any step")

for policy in ("skip", "raise"):
    params = make_params()
    opt = ShardedOptimizer(fa.Adam, groups_of(params, 0.05), comm=COMM, lr=0.01, nonfinite=policy)
    opt.step(rank_grads(RANK, 0))
    before = [p.copy() for p in params], opt.consolidated_state_dict(root=None)
    g = rank_grads(RANK, 1)
    if RANK == SIZE - 1:
        g[1] = g[1].copy()
        g[1][2, 1] = np.nan
    if policy == "skip":
        assert opt.step(g) is False and opt.skipped_steps == 1
    else:
        expect_raise(FloatingPointError, opt.step, g, match="parameter(s) [1]")
    assert all(p.tobytes() == q.tobytes() for p, q in zip(params, before[0]))
    assert_same_state(opt.consolidated_state_dict(root=None), before[1])
passed("nonfinite skip/raise decided on the combined gradient, the same on every rank")

w = np.zeros(5)
with ShardedOptimizer(fa.Adam, [w], comm=COMM, lr=0.1) as o:          # close() frees the communicator
    o.step([np.ones(5)])
assert o.comm is None and np.all(w < 0)
passed("close() frees the duplicated communicator")

for kind in ("bfloat16", "int8"):
    # compressed state on each rank's shard: the codec loops run on the shard's piece
    config.STATE_COMPRESS_MIN = 0
    rng = np.random.default_rng(7)
    w = rng.standard_normal(3000).astype(np.float32)
    gs = [rng.standard_normal(3000).astype(np.float32) for _ in range(4)]
    opt = ShardedOptimizer(fa.Adam, [w], comm=COMM, lr=0.01, state_dtype=kind)
    for g in gs[:2]:
        opt.step([g])
    assert same_everywhere(w)
    inner = opt._inner.state[0]
    assert type(inner["exp_avg"]).__name__ == "CompressedBuffer" and inner["exp_avg"].kind == kind
    per = 2.0 if kind == "bfloat16" else 1.0
    assert per * 2 * inner["exp_avg"].size <= opt.state_nbytes() < 4 * 2 * inner["exp_avg"].size
    shard, full = opt.state_dict(), opt.consolidated_state_dict(root=None)
    assert isinstance(shard["state"][0]["exp_avg"], dict)                   # compact per rank
    assert full["state"][0]["exp_avg"].dtype == np.float32 and full["state"][0]["exp_avg"].shape == (3000,)
    w2 = w.copy()
    again = ShardedOptimizer(fa.Adam, [w2], comm=COMM, lr=0.01, state_dtype=kind)
    again.load_state_dict(shard)                                           # the same rank: bit-exact
    for g in gs[2:]:
        opt.step([g])
        again.step([g])
    assert np.array_equal(w, w2)
    plain = fa.Adam([w.copy()], lr=0.01)                                   # consolidated: loads anywhere
    full["param_groups"][0]["state_dtype"] = None
    plain.load_state_dict(full)
    config.STATE_COMPRESS_MIN = 4096
passed("compressed state (bfloat16, int8) on the shards: compact shard state_dicts, float32 consolidation")

# a row rule (one state value per row) cannot be cut into flat element ranges: refused, naming ShardedTable
expect_raise(TypeError, ShardedOptimizer, fa.RowwiseAdagrad, [np.ones((8, 3))], comm=COMM, match="ShardedTable")
passed("a row rule (RowwiseAdagrad) is refused, pointing to ShardedTable")
