"""Matrix factorisation with row-sharded embedding tables over MPI (fastadapt.distributed).

Run on one machine or many, with any MPI launcher::

    mpiexec -n 2 python examples/distributed_recsys.py
    mpiexec -n 1 python examples/distributed_recsys.py        # the same training, one process

The user and item tables are :class:`~fastadapt.distributed.ShardedTable` s: each rank owns a
contiguous block of rows and only their optimizer state.  Every global batch of interactions
is split between the ranks; each rank looks up the rows it needs from their owners, computes
its rows' gradients, and steps the tables with a ``RowGrad`` -- the rows travel to their
owners, which sum them and run fastadapt's sparse kernel.  The global bias is a dense
parameter under :class:`~fastadapt.distributed.ShardedOptimizer`.  The data (synthetic,
Zipf-popular items, a low-rank truth plus noise) and the initial rows depend only on the
seed, so P ranks train the same model as one process (up to float rounding: the ranks' row
gradients are summed in another order) -- compare the RMSE lines of P = 1 and P = 2.
"""

import argparse
import time

import numpy as np
from mpi4py import MPI

import fastadapt as fa
from fastadapt.distributed import ShardedOptimizer, ShardedTable, shard_bounds

OPTIMIZERS = {"adam": fa.Adam, "sparseadam": fa.SparseAdam, "adagrad": fa.Adagrad, "rmsprop": fa.RMSprop}


def make_data(args):
    """The same interactions on every rank: (users, items, ratings), train/test split."""
    rng = np.random.default_rng(args.seed)
    truth_u = rng.standard_normal((args.users, 8)) / 8 ** 0.25
    truth_i = rng.standard_normal((args.items, 8)) / 8 ** 0.25
    users = rng.integers(0, args.users, args.interactions)
    items = (rng.zipf(1.3, args.interactions) - 1) % args.items           # a few items are popular
    ratings = np.einsum("ij,ij->i", truth_u[users], truth_i[items]) + 0.1 * rng.standard_normal(users.size)
    cut = int(0.9 * users.size)
    split = lambda a: (a[:cut], a[cut:])                                  # noqa: E731
    return [split(a) for a in (users, items, ratings.astype(np.float32))]


def init_rows(seed, dim):
    """``init(lo, hi)`` for a ShardedTable: rows drawn in fixed chunks, so the same for any P."""
    chunk = 4096

    def init(lo, hi):
        out = np.empty((hi - lo, dim), np.float32)
        for c in range(lo // chunk, (hi - 1) // chunk + 1):
            rows = np.random.default_rng((seed, c)).normal(0, 0.1, (chunk, dim)).astype(np.float32)
            a, b = max(lo, c * chunk), min(hi, (c + 1) * chunk)
            out[a - lo:b - lo] = rows[a - c * chunk:b - c * chunk]
        return out
    return init


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--interactions", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8192, help="global batch (split between the ranks)")
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--sparse-mode", choices=["lazy", "exact"], default="lazy")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    cls = OPTIMIZERS[args.optimizer]
    hyper = dict(lr=args.lr)
    if cls is not fa.SparseAdam:
        hyper["sparse_mode"] = args.sparse_mode
    (u_tr, u_te), (i_tr, i_te), (r_tr, r_te) = make_data(args)
    U = ShardedTable(cls, (args.users, args.dim), comm=comm, init=init_rows(args.seed + 1, args.dim), **hyper)
    V = ShardedTable(cls, (args.items, args.dim), comm=comm, init=init_rows(args.seed + 2, args.dim), **hyper)
    mu = np.zeros(1, np.float32)
    bias = ShardedOptimizer(fa.Adam, [mu], comm=comm, lr=args.lr)

    def evaluate(users, items, ratings):
        lo, hi = shard_bounds(users.size, size)[rank:rank + 2]
        e = np.einsum("ij,ij->i", U.lookup(users[lo:hi]), V.lookup(items[lo:hi])) + mu[0] - ratings[lo:hi]
        return float(np.sqrt(comm.allreduce(float(e @ e)) / users.size))

    if rank == 0:
        print(f"{size} rank(s); {args.users:,} users x {args.items:,} items, dim {args.dim}, "
              f"{u_tr.size:,} training interactions, {cls.__name__} ({args.sparse_mode}), global batch {args.batch}")
        print(f"epoch 0: test RMSE {evaluate(u_te, i_te, r_te):.6f}", flush=True)
    else:
        evaluate(u_te, i_te, r_te)
    compute = 0.0
    steps = 0
    t_train = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = np.random.default_rng((args.seed, epoch)).permutation(u_tr.size)
        for start in range(0, order.size, args.batch):
            batch = order[start:start + args.batch]
            lo, hi = shard_bounds(batch.size, size)[rank:rank + 2]
            mine = batch[lo:hi]                                  # this rank's share of the global batch
            users, items = u_tr[mine], i_tr[mine]
            pu, qi = U.lookup(users), V.lookup(items)
            t = time.perf_counter()
            e = (np.einsum("ij,ij->i", pu, qi) + mu[0] - r_tr[mine]) * np.float32(2.0 / batch.size)
            gu, gi = e[:, None] * qi, e[:, None] * pu                # d(mean squared error)/d rows
            gmu = np.array([e.sum()], np.float32)
            compute += time.perf_counter() - t
            U.step(fa.RowGrad(users, gu))
            V.step(fa.RowGrad(items, gi))
            bias.step([gmu])
            steps += 1
        train, test = evaluate(u_tr, i_tr, r_tr), evaluate(u_te, i_te, r_te)
        if rank == 0:
            print(f"epoch {epoch}: train RMSE {train:.6f}  test RMSE {test:.6f}", flush=True)
    t_train = time.perf_counter() - t_train

    # per-rank memory and where a training step's time goes (the slowest rank's figures)
    state = comm.gather((U.local.nbytes + V.local.nbytes, U.state_nbytes() + V.state_nbytes()))
    phases = {}
    for name in ("prepare", "agree", "route", "lookup", "kernel"):
        phases[name] = comm.allreduce((U.timings[name] + V.timings[name]) / steps, op=MPI.MAX)
    phases["dense bias"] = comm.allreduce(sum(v for k, v in bias.timings.items() if k != "steps") / steps,
                                          op=MPI.MAX)
    phases["gradient math"] = comm.allreduce(compute / steps, op=MPI.MAX)
    if rank == 0:
        print("per rank: tables " + ", ".join(f"{a / 2**20:.2f} MiB" for a, _ in state)
              + "; optimizer state " + ", ".join(f"{b / 2**20:.2f} MiB" for _, b in state))
        print(f"{t_train / steps * 1e3:.2f} ms per training step (incl. evaluation): "
              + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in phases.items()) + " ms")


if __name__ == "__main__":
    main()
