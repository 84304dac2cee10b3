"""ShardedTable under mpiexec (run by tests/test_distributed.py with -n 2 and -n 3).

Every rank recomputes every rank's row gradients from seeded generators and steps a
single-process optimizer over the whole table with them concatenated in rank order.
Dyadic values make every sum of duplicate rows exact in any order, so the sharded table
must match bit for bit, in lazy and exact mode.
"""

import copy
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: the optimizer table
from common import COMM, RANK, SIZE, expect_raise, passed  # noqa: E402

import fastadapt as fa  # noqa: E402
from fastadapt.distributed import ShardedTable  # noqa: E402
from optimizers import OPTIMIZERS  # noqa: E402

SHAPE = (13, 3)


def initial(shape, dtype):
    return np.random.default_rng(3).standard_normal(shape).astype(dtype)


def rank_grad(r, t, shape, dtype, dyadic=True):
    """Rank r's RowGrad at step t: duplicates, any order; sometimes empty or None."""
    if t % 7 == 5:
        return None                                  # no rank has a gradient: nothing happens
    if (t + r) % 5 == 2:
        return None                                  # this rank has none
    rng = np.random.default_rng((11, r, t))
    k = 0 if (t + r) % 6 == 1 else int(rng.integers(1, 9))
    rows = rng.integers(0, shape[0], k)
    vshape = (k,) + shape[1:]
    if dyadic:
        vals = rng.integers(-512, 513, vshape) * np.exp2(rng.integers(-10, -5, vshape))
    else:
        vals = rng.standard_normal(vshape)
    return fa.RowGrad(rows, vals.astype(dtype))


def combined(t, shape, dtype, dyadic=True):
    parts = [rank_grad(r, t, shape, dtype, dyadic) for r in range(SIZE)]
    parts = [g for g in parts if g is not None]
    if not parts:
        return None
    return fa.RowGrad(np.concatenate([g.rows for g in parts]), np.concatenate([g.values for g in parts]))


#: every case of tests/optimizers.py: lazy with its rich config, then exact once per distinct
#: plan of the algorithm (lazy == exact, fused pass, closed-form decay), under the three
#: non-finite policies in turn
CONFIGS = [(c.cls, dict(o, **c.mode_options(m), nonfinite=("propagate", "skip", "raise")[n % 3]))
           for n, (c, m, o) in enumerate((c, m, o) for c in OPTIMIZERS for m, o in c.exact_groups()
                                         if (m, o) != ("lazy", {}))]


def run(cls, kw, shape, dtype, steps, *, dyadic=True, table=None, ref=None, start=0):
    if table is None:
        table = ShardedTable(cls, shape, comm=COMM, dtype=dtype, init=initial(shape, dtype), **kw)
        ref_p = initial(shape, dtype)
        ref = (cls([ref_p], **kw), ref_p)
    for t in range(start, start + steps):
        if t == 6:
            table.param_groups[0]["lr"] = 0.02
            ref[0].param_groups[0]["lr"] = 0.02
        assert table.step(rank_grad(RANK, t, shape, dtype, dyadic)) is True
        g = combined(t, shape, dtype, dyadic)
        ref[0].step([g])
    return table, ref


def same_state(full, ref_sd):
    assert set(full["state"]) == set(ref_sd["state"])
    for j, st in ref_sd["state"].items():
        assert set(full["state"][j]) == set(st), (sorted(full["state"][j]), sorted(st))
        for name, v in st.items():
            got = full["state"][j][name]
            if name == "step" or isinstance(v, float):           # the count, or a carried scalar
                assert got == v, (name, got, v)
            else:
                assert got.shape == v.shape and got.tobytes() == v.tobytes(), (name, np.max(np.abs(got - v)))
    assert full["param_groups"] == ref_sd["param_groups"]


# ---------------------------------------------------------------------------------- equivalence

for n, (cls, kw) in enumerate(CONFIGS):
    dtype = np.float32 if n % 2 else np.float64
    shape = SHAPE if n != 3 else (SHAPE[0],)                   # a 1-D table too
    table, (ref, ref_p) = run(cls, kw, shape, dtype, 14)
    full = table.gather(root=None)
    assert full.dtype == dtype and full.tobytes() == ref_p.tobytes(), (cls.__name__, kw, np.max(np.abs(full - ref_p)))
    state = table.consolidated_state_dict(root=None)
    same_state(state, ref.state_dict())
    assert COMM.allreduce(table.state_nbytes()) == sum(
        v.nbytes for v in ref.state_dict()["state"][0].values() if isinstance(v, np.ndarray))
    # lookups: any rows, duplicates, any order, from every rank
    ask = np.random.default_rng((5, RANK)).integers(0, shape[0], 9)
    got = table.lookup(ask)
    assert got.shape == (9,) + shape[1:] and got.tobytes() == ref_p[ask].tobytes()
    assert table.lookup(np.array([], dtype=np.int64)).shape == (0,) + shape[1:]
    assert table.local.tobytes() == ref_p[table.lo:table.hi].tobytes()
passed("bit-for-bit equivalence with one process on the concatenated row gradients, lazy and exact, "
       "every optimizer")

table, (ref, ref_p) = run(fa.Adam, dict(lr=0.05), SHAPE, np.float64, 10, dyadic=False)
np.testing.assert_allclose(table.gather(root=None), ref_p, rtol=1e-12, atol=1e-12)
passed("general row gradients within the spec's tolerances")

# each rank owns a contiguous block of rows and only their state
table = ShardedTable(fa.Adam, (1000, 4), comm=COMM, init=lambda lo, hi: np.arange(lo * 4, hi * 4).reshape(-1, 4))
whole = table.gather(root=0)
assert np.array_equal(whole, np.arange(4000).reshape(1000, 4)) if RANK == 0 else whole is None
table.step(fa.RowGrad(np.arange(1000), np.ones((1000, 4), np.float32)))
assert table.state_nbytes() == 2 * (table.hi - table.lo) * 4 * 4
assert abs(table.state_nbytes() - 2 * 1000 * 4 * 4 / SIZE) <= 2 * 4 * 4
passed("rows sharded in contiguous blocks, init(lo, hi) per rank, state ~ 1/P per rank")

# ---------------------------------------------------------------------------------- state_dict

cls, kw = fa.RMSprop, dict(lr=0.01, sparse_mode="exact")
table, ref = run(cls, kw, SHAPE, np.float64, 6)
shard, full = copy.deepcopy(table.state_dict()), table.consolidated_state_dict(root=None)
saved = table.gather(root=None)
run(cls, kw, SHAPE, np.float64, 6, table=table, ref=ref, start=6)
expected = table.gather(root=None)
for sd in (shard, full):
    t2 = ShardedTable(cls, SHAPE, comm=COMM, dtype=np.float64, init=saved, **kw)
    t2.load_state_dict(sd)
    for t in range(6, 12):
        if t == 6:
            t2.param_groups[0]["lr"] = 0.02
        t2.step(rank_grad(RANK, t, SHAPE, np.float64))
    assert t2.gather(root=None).tobytes() == expected.tobytes()
if SIZE > 1:
    other = COMM.sendrecv(shard, dest=(RANK + 1) % SIZE, source=(RANK - 1) % SIZE)
    expect_raise(ValueError, table.load_state_dict, other, match="shard")
table.param_groups[0]["lr"] = 0.125
assert table.state_dict()["param_groups"][0]["lr"] == 0.125
passed("state_dict: shards and consolidated dicts load back and continue bit-exactly")

# ---------------------------------------------------------------------------------- faults, validation

table = ShardedTable(fa.Adam, SHAPE, comm=COMM, lr=0.1)
bad = fa.RowGrad([1, SHAPE[0] + RANK], np.ones((2, 3), np.float32)) if RANK == SIZE - 1 else \
    fa.RowGrad([1], np.ones((1, 3), np.float32))
e = expect_raise((IndexError, RuntimeError), table.step, bad)
assert isinstance(e, IndexError if RANK == SIZE - 1 else RuntimeError), e
assert not table.local.any() and table.state_dict()["state"] == {}
e = expect_raise((IndexError, RuntimeError), table.lookup, [0, -1] if RANK == SIZE - 1 else [0])
assert isinstance(e, IndexError if RANK == SIZE - 1 else RuntimeError), e
expect_raise((ValueError, RuntimeError), table.step, fa.RowGrad([1], np.ones((1, 4), np.float32))
             if RANK == 0 else None)
assert table.step(fa.RowGrad([1], np.ones((1, 3), np.float32))) is True
if SIZE > 1:
    expect_raise(ValueError, ShardedTable, fa.Adam, (13 + RANK, 3), comm=COMM, match="table shape")
if SIZE > 1:
    expect_raise(ValueError, ShardedTable, fa.Adam, (SIZE - 1, 3), comm=COMM, match="ranks")
passed("validation: one rank's bad rows make every rank raise, nothing changes, training continues")

table = ShardedTable(fa.Adam, SHAPE, comm=COMM, lr=0.1, nonfinite="skip")
g = fa.RowGrad([RANK], np.full((1, 3), np.nan if RANK == SIZE - 1 else 1.0, np.float32))
assert table.step(g) is False and table.skipped_steps == 1 and not table.local.any()
passed("nonfinite='skip' decided on the routed rows, the same on every rank")

with ShardedTable(fa.Adagrad, SHAPE, comm=COMM, lr=0.1) as t3:        # close() frees the communicator
    t3.step(fa.RowGrad([RANK], np.ones((1, 3), np.float32)))
assert t3.comm is None
passed("close() frees the duplicated communicator")

from fastadapt import config  # noqa: E402

config.STATE_COMPRESS_MIN = 0
T0 = np.random.default_rng(9).standard_normal((60, 32)).astype(np.float32)
ROWS = [np.array([1, 5, 30, 59]), np.array([0, 5, 44]), np.array([2, 31, 32, 33, 58])]
for kind in ("bfloat16", "int8"):
    # each rank compresses its rows; int8 blocks are rows, so one process gets the same codes
    tab = ShardedTable(fa.Adam, T0.shape, comm=COMM, init=T0, lr=0.01, state_dtype=kind)
    ref_table = T0.copy()
    ref = fa.Adam([ref_table], lr=0.01, state_dtype=kind)
    for rows in ROWS:
        tab.step(fa.RowGrad(rows, np.ones((len(rows), 32), np.float32)))   # every rank: summed over ranks
        ref.step([fa.RowGrad(rows, np.full((len(rows), 32), SIZE, np.float32))])
    shard = tab.state_dict()
    assert all(isinstance(v, dict) for k, v in shard["state"][0].items() if k != "step")   # compact per rank
    full = tab.consolidated_state_dict(root=None)
    decoded = ref.state_dict(dtype="float32")["state"][0]
    for name in ("exp_avg", "exp_avg_sq"):
        assert full["state"][0][name].dtype == np.float32
        if kind == "int8":                   # rows are blocks: the shards' codes are one process's codes
            assert np.array_equal(full["state"][0][name], decoded[name]), name
    assert tab.state_nbytes() > 0
    again = ShardedTable(fa.Adam, T0.shape, comm=COMM, init=T0, lr=0.01, state_dtype=kind)
    again.load_state_dict(full)                                            # consolidated: re-quantized per rank
    again.load_state_dict(shard)                                           # this rank's shard: bit-exact
config.STATE_COMPRESS_MIN = 4096
passed("compressed state on the table's rows: compact shard state_dicts, float32 consolidation")
