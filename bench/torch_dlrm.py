"""fastadapt.torch inside a torch training loop: ``python bench/torch_dlrm.py`` (``--quick``: a smoke run).

1. A DLRM-like CPU training step: ``nn.EmbeddingBag(--rows, 64, sparse=True, mode="sum")`` + an MLP
   64 -> 256 -> 256 -> 1, a batch of ``--batch`` bags of ``--bag`` ids.  torch.optim.SparseAdam (table)
   + torch.optim.Adam(fused=True) (MLP) against fastadapt.torch.SparseAdam + fastadapt.torch.Adam:
   the optimizer part (both ``step()`` calls, on the same gradients) and the whole step (zero_grad,
   forward, backward, both steps) in ms;
2. a dense MLP of a few million float32 parameters, the optimizer step alone: fastadapt.torch.Adam vs
   torch.optim.Adam(fused=True), fastadapt.torch.RMSprop vs torch.optim.RMSprop(foreach=True).

Rounds are interleaved (fastadapt.apps.benchmark.interleaved); ratios are medians of per-round ratios.
Targets: optimizer part >= 5x, whole step >= 1.5x, dense Adam >= 1.0x fused, RMSprop >= 3x foreach.
Exit status 0 either way (``--strict``: 1 when a target is missed).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import numpy as np  # noqa: E402

from fastadapt.apps import benchmark as B  # noqa: E402

#: (label, key of the measurement, threshold): x = torch's time / fastadapt's
TARGETS = (
    ("DLRM optimizer part >= 5x torch (SparseAdam + fused Adam)", "x_dlrm_optimizer", 5.0),
    ("DLRM whole step >= 1.5x torch", "x_dlrm_step", 1.5),
    ("dense MLP Adam >= 1.0x torch fused", "x_mlp_adam_fused", 1.0),
    ("dense MLP RMSprop >= 3x torch foreach", "x_mlp_rmsprop_foreach", 3.0),
)


def _dlrm(torch, rows, dim, seed=0):
    torch.manual_seed(seed)
    bag = torch.nn.EmbeddingBag(rows, dim, sparse=True, mode="sum")
    mlp = torch.nn.Sequential(torch.nn.Linear(dim, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, 1))
    return bag, mlp


def dlrm_cases(rows, batch, bag_size, n_batches=4, dim=64):
    """{name: callable}: the optimizer part and the whole step, torch and fastadapt."""
    import torch
    import fastadapt.torch as fat

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, rows, (batch * bag_size,), generator=gen),
                torch.arange(0, batch * bag_size, bag_size), torch.randn(batch, 1, generator=gen))
               for _ in range(n_batches)]
    cases = {}
    for who in ("torch", "fastadapt"):
        bag, mlp = _dlrm(torch, rows, dim)
        if who == "torch":
            opts = [torch.optim.SparseAdam(bag.parameters(), lr=1e-3),
                    torch.optim.Adam(mlp.parameters(), lr=1e-3, fused=True)]
        else:
            opts = [fat.SparseAdam(bag.parameters(), lr=1e-3), fat.Adam(mlp.parameters(), lr=1e-3)]
        counter = [0]

        def step(bag=bag, mlp=mlp, opts=opts, counter=counter, update=True):
            ids, offsets, y = batches[counter[0] % len(batches)]
            counter[0] += 1
            for o in opts:
                o.zero_grad()
            loss = torch.nn.functional.mse_loss(mlp(bag(ids, offsets)), y)
            loss.backward()
            if update:
                for o in opts:
                    o.step()

        step(update=False)                     # gradients for the optimizer-part case

        def optimizer_part(opts=opts):
            for o in opts:
                o.step()

        cases[f"{who}_opt"] = optimizer_part
        cases[f"{who}_step"] = step
    return cases


def mlp_cases(width, depth):
    """{name: callable}: the optimizer step of a dense MLP (``depth`` square layers of ``width``)."""
    import torch
    import fastadapt.torch as fat

    cases = {}
    for name, torch_kw in (("adam", {"fused": True}), ("rmsprop", {"foreach": True})):
        for who in ("torch", "fastadapt"):
            torch.manual_seed(0)
            model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            cls = getattr(torch.optim if who == "torch" else fat, "Adam" if name == "adam" else "RMSprop")
            opt = cls(model.parameters(), lr=1e-4, **(torch_kw if who == "torch" else {}))
            cases[f"{who}_{name}"] = opt.step
    return cases


def measure(rows=1_000_000, batch=4096, bag_size=20, width=1024, depth=3, rounds=9):
    """The figures of sections 1 and 2 (ms: medians of every timed call; x: torch / fastadapt, medians
    of per-round ratios)."""
    import torch

    block = 3
    cases = dlrm_cases(rows, batch, bag_size)
    times = B.interleaved(cases, rounds, warmup=1, block=block)
    ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    out = {"rows": rows, "batch": batch, "bag": bag_size, "rounds": rounds,
           "dlrm_ms": ms,
           "x_dlrm_optimizer": B.ratio(times, "torch_opt", "fastadapt_opt", block),
           "x_dlrm_step": B.ratio(times, "torch_step", "fastadapt_step", block)}
    mcases = mlp_cases(width, depth)
    mtimes = B.interleaved(mcases, rounds, warmup=1, block=block)
    out["mlp_params"] = depth * (width * width + width)
    out["mlp_ms"] = {k: float(np.median(v)) * 1e3 for k, v in mtimes.items()}
    out["x_mlp_adam_fused"] = B.ratio(mtimes, "torch_adam", "fastadapt_adam", block)
    out["x_mlp_rmsprop_foreach"] = B.ratio(mtimes, "torch_rmsprop", "fastadapt_rmsprop", block)
    out["torch_version"] = torch.__version__
    return out


def targets(result):
    """[(label, measured, threshold)] of :data:`TARGETS`."""
    return [(label, result[key], bar) for label, key, bar in TARGETS]


def print_report(r):
    d, m = r["dlrm_ms"], r["mlp_ms"]
    print(f"   DLRM-like step: EmbeddingBag({r['rows']:,}, 64, sparse) + MLP 64-256-256-1, "
          f"{r['batch']:,} bags of {r['bag']} ids; ms")
    print(f"   {'':<34}{'torch':>9}{'fastadapt':>11}{'x':>7}")
    print(f"   {'optimizer part (SparseAdam+Adam)':<34}{d['torch_opt']:>9.2f}{d['fastadapt_opt']:>11.2f}"
          f"{r['x_dlrm_optimizer']:>7.2f}")
    print(f"   {'whole step':<34}{d['torch_step']:>9.2f}{d['fastadapt_step']:>11.2f}{r['x_dlrm_step']:>7.2f}")
    print(f"   dense MLP, {r['mlp_params']:,} float32 parameters, optimizer step; ms")
    print(f"   {'Adam (torch fused=True)':<34}{m['torch_adam']:>9.2f}{m['fastadapt_adam']:>11.2f}"
          f"{r['x_mlp_adam_fused']:>7.2f}")
    print(f"   {'RMSprop (torch foreach=True)':<34}{m['torch_rmsprop']:>9.2f}{m['fastadapt_rmsprop']:>11.2f}"
          f"{r['x_mlp_rmsprop_foreach']:>7.2f}")
    print("   x: torch's time / fastadapt's, median of per-round ratios")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, default="1e6", help="rows of the embedding table")
    parser.add_argument("--batch", type=int, default=4096, help="bags per batch")
    parser.add_argument("--bag", type=int, default=20, help="ids per bag")
    parser.add_argument("--width", type=int, default=1024, help="width of the dense MLP's layers")
    parser.add_argument("--depth", type=int, default=3, help="layers of the dense MLP")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (a smoke run, not a measurement)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch is not installed: nothing to compare (pip install torch --index-url "
              "https://download.pytorch.org/whl/cpu)")
        return 0
    if args.quick:
        r = measure(rows=10_000, batch=64, bag_size=5, width=64, depth=2, rounds=2)
    else:
        r = measure(int(args.rows), args.batch, args.bag, args.width, args.depth, args.rounds)
    print("fastadapt.torch in a torch training loop (bench/torch_dlrm.py"
          + (", --quick: not a measurement" if args.quick else "") + f"; {B.describe_threads(B.threads_info())})")
    print_report(r)
    missed = 0
    for label, value, bar in targets(r):
        ok = value >= bar
        missed += not ok
        print(f"{label:<60}{value:>8.2f}  {'MET' if ok else 'MISSED'}")
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
