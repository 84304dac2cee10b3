"""The recommender example (``python -m fastadapt recsys``) trained over MPI with row-sharded tables.

Run on one machine or many, with any MPI launcher::

    mpiexec -n 2 python examples/distributed_recsys.py --quick
    mpiexec -n 2 python examples/distributed_recsys.py --compare     # also train in one process, compare

Same data, model and batches as :func:`fastadapt.apps.recsys.train` -- BPR on implicit feedback with
user and item embedding tables, one sampled negative per interaction -- but the tables are
:class:`fastadapt.distributed.ShardedTable` s: each rank owns a contiguous block of rows and only
their optimizer state.  Each global batch is split between the ranks; a rank looks up the rows
its share needs from their owners, computes the BPR gradients (``fastadapt.apps.recsys.bpr_gradients``),
and steps the tables with a ``RowGrad`` -- the rows travel to their owners, which sum them and run
fastadapt's sparse kernel in ``--mode`` lazy or exact.  The result is the single-process run's
up to float rounding (duplicate rows are summed in another order); ``--compare`` measures it.

Evaluation (recall@k) gathers the item table on every rank; everything else stays sharded.
"""

import argparse
import time

import numpy as np
from mpi4py import MPI

import fastadapt as fa
from fastadapt.apps import recsys
from fastadapt.distributed import ShardedTable, shard_bounds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--interactions", type=int, default=2_000_000)
    ap.add_argument("--topics", type=int, default=50)
    ap.add_argument("--optimizer", choices=sorted(recsys.OPTIMIZERS), default="adagrad")
    ap.add_argument("--mode", choices=["lazy", "exact"], default="lazy", help="sparse_mode")
    ap.add_argument("--lr", type=float, default=None, help="default: as python -m fastadapt recsys")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4096, help="global batch, split between the ranks")
    ap.add_argument("--reg", type=float, default=1e-4)
    ap.add_argument("--k", type=int, default=10, help="recall@k")
    ap.add_argument("--eval-users", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="5k users, 2k items, 100k interactions, 2 epochs")
    ap.add_argument("--compare", action="store_true",
                    help="rank 0 then trains the same model in one process (fastadapt.apps.recsys.train) and "
                         "reports the largest difference between the tables")
    args = ap.parse_args()
    if args.quick:
        args.users, args.items, args.interactions, args.epochs = 5_000, 2_000, 100_000, 2
        args.batch_size = min(args.batch_size, 2048)

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    cls, default_lr = recsys.OPTIMIZERS[args.optimizer]
    lr = default_lr if args.lr is None else args.lr

    # the same data on every rank (seeded), split as python -m fastadapt recsys does
    R = recsys.generate_interactions(args.users, args.items, args.interactions, args.topics, seed=args.seed)
    train_R, test_users, test_items = recsys.split_leave_one_out(R, args.seed)
    if test_users.size > args.eval_users:
        pick = np.sort(np.random.default_rng(args.seed).choice(test_users.size, args.eval_users, replace=False))
        test_users, test_items = test_users[pick], test_items[pick]
    n_users, n_items = train_R.shape

    # initial tables as fastadapt.apps.recsys.train draws them; each rank keeps only its rows
    # (with a table too big for one machine, pass init=lambda lo, hi: ... instead)
    init = np.random.default_rng(args.seed)
    U0 = (init.standard_normal((n_users, args.dim)) * 0.1).astype(np.float32)
    V0 = (init.standard_normal((n_items, args.dim)) * 0.1).astype(np.float32)
    U = ShardedTable(cls, U0.shape, comm=comm, init=U0, lr=lr, sparse_mode=args.mode)
    V = ShardedTable(cls, V0.shape, comm=comm, init=V0, lr=lr, sparse_mode=args.mode)
    if not args.compare:
        del U0, V0

    users_all = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(train_R.indptr))
    items_all = train_R.indices.astype(np.int64)
    n = users_all.size
    lo_t, hi_t = shard_bounds(test_users.size, size)[rank:rank + 2]

    def recall():
        """recall@k, each rank scoring its share of the held-out users against the whole item table."""
        tu, ti = test_users[lo_t:hi_t], test_items[lo_t:hi_t]
        r = recsys.recall_at_k(U.lookup(tu), V.gather(root=None), train_R[tu], np.arange(tu.size), ti, args.k)
        return comm.allreduce(int(round(r * tu.size))) / test_users.size

    say(f"{size} rank(s): {n_users:,} users x {n_items:,} items, {n:,} training interactions; BPR dim "
        f"{args.dim}, {cls.__name__} (sparse_mode={args.mode!r}, lr {lr:g}), global batch {args.batch_size}")
    math_s, steps, train_s = 0.0, 0, []
    for epoch in range(1, args.epochs + 1):
        rng = np.random.default_rng([args.seed, epoch])             # as fastadapt.apps.recsys.train
        order = rng.permutation(n)
        negatives = rng.integers(0, n_items, n)
        total_loss = 0.0
        comm.Barrier()
        start = time.perf_counter()
        for b in range(0, n, args.batch_size):
            idx = order[b:b + args.batch_size]
            lo, hi = shard_bounds(idx.size, size)[rank:rank + 2]
            mine = idx[lo:hi]                                     # this rank's share of the batch
            users, pos, neg = users_all[mine], items_all[mine], negatives[mine]
            item_rows = np.concatenate([pos, neg])
            Ur, Vr = U.lookup(users), V.lookup(item_rows)         # rows from their owners
            t = time.perf_counter()
            m = users.size
            loss, gU, _, gV = recsys.bpr_gradients(Ur, Vr, np.arange(m), np.arange(m), np.arange(m, 2 * m),
                                                   args.reg)
            math_s += time.perf_counter() - t
            U.step(fa.RowGrad(users, gU))                         # rows go to their owners, summed there
            V.step(fa.RowGrad(item_rows, gV))
            total_loss += loss * m
            steps += 1
        comm.Barrier()
        train_s.append(time.perf_counter() - start)
        loss = comm.allreduce(total_loss) / n
        say(f"  epoch {epoch}: loss {loss:.4f}  recall@{args.k} {recall():.4f}  {train_s[-1]:.2f} s", flush=True)

    # per-rank memory, and where a training step's time goes (the slowest rank's figures)
    mem = comm.gather((U.local.nbytes + V.local.nbytes, U.state_nbytes() + V.state_nbytes()))
    phases = {name: comm.allreduce((U.timings[name] + V.timings[name]) / steps, op=MPI.MAX)
              for name in ("prepare", "agree", "lookup", "route", "kernel")}
    phases["bpr math"] = comm.allreduce(math_s / steps, op=MPI.MAX)
    steady = train_s[1:] or train_s
    if rank == 0:
        print("per rank: tables " + ", ".join(f"{a / 2**20:.2f} MiB" for a, _ in mem)
              + "; optimizer state " + ", ".join(f"{s / 2**20:.2f} MiB" for _, s in mem))
        print(f"{np.mean(steady):.2f} s per epoch (after the first), "
              f"{np.mean(steady) / (steps / len(train_s)) * 1e3:.2f} ms per step; per step (whole run, incl. the "
              "first epoch): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in phases.items()) + " ms")

    if args.compare:
        Uall, Vall = U.gather(root=0), V.gather(root=0)
        if rank == 0:
            single = recsys.train(train_R, test_users, test_items, dim=args.dim, epochs=args.epochs,
                                  batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                                  mode=args.mode, reg=args.reg, k=args.k, seed=args.seed, log=None,
                                  progress=False)
            d = max(float(np.abs(Uall - single["U"]).max()), float(np.abs(Vall - single["V"]).max()))
            print(f"one process (fastadapt.apps.recsys.train): recall@{args.k} {single['epochs'][-1]['recall']:.4f}; "
                  f"largest |difference| between the tables: {d:.2e}")
        else:
            done = comm.Ibarrier()                                # wait without spinning on a core
            while not done.Test():
                time.sleep(0.05)
        if rank == 0:
            comm.Ibarrier().Wait()


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        # an error on one rank must not leave the others waiting in a collective
        # (``mpiexec -n 2 python -m mpi4py script.py`` does the same for any script)
        import traceback
        traceback.print_exc()
        MPI.COMM_WORLD.Abort(1)
