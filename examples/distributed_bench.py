"""Per-rank state memory and step-time breakdown of fastadapt.distributed.

Run with any number of ranks and compare (the README's figures come from this script)::

    mpiexec -n 1 python examples/distributed_bench.py
    mpiexec -n 2 python examples/distributed_bench.py

Two workloads, both timed after a warm-up step (numba compile or cache load):

* dense ZeRO-1: ``ShardedOptimizer(fa.Adam)`` over one float32 parameter of ``--dense``
  elements, a dense gradient per rank at every step;
* sparse table: ``ShardedTable(fa.Adam)`` of ``--rows`` x ``--dim`` float32, each rank
  looking up and stepping ``--batch`` random rows (Zipf-distributed ids, so with
  duplicates, scattered over the table as hashed ids are) per step.

For each phase rank 0 prints the mean seconds per step, taken as the maximum over the
ranks (a collective step is as slow as its slowest rank), and every rank's state bytes.
"""

import argparse
import json
import time

import numpy as np
from mpi4py import MPI

import fastadapt as fa
from fastadapt.distributed import ShardedOptimizer, ShardedTable


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", type=int, default=16_000_000, help="elements of the dense parameter")
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the table")
    ap.add_argument("--dim", type=int, default=32, help="row width of the table")
    ap.add_argument("--batch", type=int, default=8192, help="rows looked up and stepped per rank per step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", help="also write the results to this file (rank 0)")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    out = {"ranks": size}

    # ------------------------------------------------------------------ dense ZeRO-1
    w = np.zeros(args.dense, np.float32)
    g = np.random.default_rng(rank).standard_normal(args.dense).astype(np.float32)
    opt = ShardedOptimizer(fa.Adam, [w], comm=comm, lr=1e-3, reduce="mean")
    opt.step([g])                                            # warm-up: compile / cache load
    opt.timings.update(dict.fromkeys(opt.timings, 0))
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        opt.step([g])
    comm.Barrier()
    total = (time.perf_counter() - t0) / args.steps
    phases = {k: v / args.steps for k, v in opt.timings.items() if k != "steps"}
    out["dense"] = {
        "elements": args.dense,
        "state_bytes_per_rank": comm.gather(opt.state_nbytes()),
        "step_s": total,
        "phases_s": {k: comm.allreduce(v, op=MPI.MAX) for k, v in phases.items()},
    }

    # ------------------------------------------------------------------ sparse table
    rng = np.random.default_rng(100 + rank)
    table = ShardedTable(fa.Adam, (args.rows, args.dim), comm=comm, lr=1e-2,
                         init=lambda lo, hi: np.full((hi - lo, args.dim), 0.01, np.float32))
    # Zipf-popular ids, scattered over the id space by a fixed permutation (as hashed ids are): with
    # contiguous row ownership, popular rows clustered at low ids would all land on rank 0
    scatter = np.random.default_rng(0).permutation(args.rows)
    batches = [scatter[(rng.zipf(1.2, args.batch) - 1) % args.rows] for _ in range(args.steps + 1)]
    grads = rng.standard_normal((args.batch, args.dim)).astype(np.float32)

    def one(ids):
        vecs = table.lookup(ids)
        table.step(fa.RowGrad(ids, grads * vecs))

    one(batches[0])
    table.timings.update(dict.fromkeys(table.timings, 0))
    comm.Barrier()
    t0 = time.perf_counter()
    for ids in batches[1:]:
        one(ids)
    comm.Barrier()
    total = (time.perf_counter() - t0) / args.steps
    phases = {k: v / args.steps for k, v in table.timings.items() if k not in ("steps", "lookups")}
    out["table"] = {
        "shape": [args.rows, args.dim], "batch_per_rank": args.batch,
        "table_bytes_per_rank": comm.gather(table.local.nbytes),
        "state_bytes_per_rank": comm.gather(table.state_nbytes()),
        "step_s": total,
        "phases_s": {k: comm.allreduce(v, op=MPI.MAX) for k, v in phases.items()},
    }

    if rank == 0:
        d, t = out["dense"], out["table"]
        print(f"P = {size}")
        print(f"dense Adam, {d['elements']:,} float32: state per rank "
              + ", ".join(f"{b / 2**20:.1f} MiB" for b in d["state_bytes_per_rank"])
              + f"; step {d['step_s'] * 1e3:.2f} ms = "
              + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in d["phases_s"].items()))
        print(f"table Adam, {t['shape'][0]:,} x {t['shape'][1]} float32, {t['batch_per_rank']} rows/rank/step: "
              "state per rank " + ", ".join(f"{b / 2**20:.1f} MiB" for b in t["state_bytes_per_rank"])
              + f"; lookup+step {t['step_s'] * 1e3:.2f} ms = "
              + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in t["phases_s"].items()))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        # an error on one rank must not leave the others waiting in a collective
        # (``mpiexec -n 2 python -m mpi4py script.py`` does the same for any script)
        import traceback
        traceback.print_exc()
        MPI.COMM_WORLD.Abort(1)
