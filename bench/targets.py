"""fastadapt's speed targets, measured in one run: ``python bench/targets.py``.

Prints medians of interleaved rounds (in each round every candidate runs one untimed settling
call and three timed ones, the order rotating, so that a change of machine load hits all alike
and each is timed in its own steady state; see fastadapt.apps.benchmark.interleaved):

1. one 10M-element float32 parameter, per optimizer: fastadapt, torch ``fused=True`` and
   ``foreach=True`` (when torch is installed), the seed-style numpy code (bench/seed_numpy.py)
   and the streaming ceiling ``a[i] = a[i]*s + b[i]`` (numba prange, 12 B/element);
2. 200 float32 tensors of log-uniform sizes 100..200k, per optimizer, against the same, and the
   per-parameter cost of a step in microseconds (200 tensors of 100 elements);
3. the memory a 10M-element step allocates (tracemalloc, after the first step);
4. ``import fastadapt`` + the first step in a fresh process with a warm numba cache;
5. 1 and 2 numba threads giving bit-identical results;
6. the per-step fixed cost on small models (bench/small_steps.py) beside a bare numba loop and torch;
7. compressed optimizer state (issue #13, bench/compressed_state.py): Adam/AdamW with state_dtype
   None / "bfloat16" / "int8" on one ``--compressed-size`` parameter vs torch fused, the slow 8-bit
   anchors (bitsandbytes, torchao when importable) in ``--anchor-rounds`` rounds, and the state
   bytes per parameter (``--no-compressed`` skips it);
8. embedding tables against FBGEMM's CPU table-batched embeddings (bench/tables.py): a
   ``--tables-rows`` x 64 float32 table at 0.1 / 1 / 10 % of the rows, ``RowwiseAdagrad`` (RowGrad
   and BagGrad) vs FBGEMM ``EXACT_ROWWISE_ADAGRAD``'s backward with the fused update, ``Adagrad``
   vs ``EXACT_ADAGRAD``, BagGrad vs a numpy-built RowGrad on Zipf bags, and the rowwise step vs a
   same-bytes numba loop (``--no-tables`` skips it; FBGEMM's rows are skipped, with a note, where
   fbgemm_gpu is not installed, and fastadapt's where it lacks RowwiseAdagrad / BagGrad);
9. fastadapt.torch in a torch training loop (bench/torch_dlrm.py): a DLRM-like step (EmbeddingBag of
   ``--dlrm-rows`` x 64, sparse, + MLP 64-256-256-1, 4096 bags of 20 ids) with torch.optim.SparseAdam +
   Adam(fused=True) vs fastadapt.torch.SparseAdam + Adam (optimizer part and whole step), and a dense
   MLP's optimizer step (Adam vs torch fused, RMSprop vs torch foreach) (``--no-torch`` skips it; it is
   skipped, with a note, where torch is not installed).

and a last table of the targets, each MET or MISSED.  Exit status 0 either way (this is a
measurement, not a test); ``--strict`` exits 1 when a target is missed.  Takes ~2 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import fastadapt as fa  # noqa: E402
from fastadapt.apps import benchmark as B  # noqa: E402
from fastadapt.apps.cli import HelpFormatter  # noqa: E402
import small_steps  # noqa: E402
import compressed_state  # noqa: E402
import tables  # noqa: E402
import torch_dlrm  # noqa: E402
from seed_numpy import seed_case, seed_many_case  # noqa: E402

NAMES = ["adagrad", "rmsprop", "adam", "adamw"]


def dense_table(n, rounds):
    rows = []
    for name in NAMES:
        cases = {"stream": B.stream_case(n), "fastadapt": B.dense_case(name, n)}
        for mode in B.TORCH_MODES:
            case = B.torch_dense_case(name, n, mode)
            if case is not None:
                cases[f"torch_{mode}"] = case
        cases["numpy"] = seed_case(name, n)
        times = B.interleaved(cases, rounds)
        med = {k: float(np.median(v)) for k, v in times.items()}
        fa_t = med["fastadapt"]
        gbps = B.bytes_per_element(name) * n / fa_t / 1e9
        ceiling = B.bytes_per_element("stream") * n / med["stream"] / 1e9
        of_ceiling = B.ratio(times, "stream", "fastadapt") * B.bytes_per_element(name) / B.bytes_per_element("stream")
        rows.append(dict(name=name, fastadapt_ms=fa_t * 1e3, gbps=gbps, ceiling_gbps=ceiling,
                         of_ceiling=of_ceiling,
                         **{f"{k}_ms": med[k] * 1e3 for k in med if k not in ("fastadapt",)},
                         **{f"x_{k}": B.ratio(times, k, "fastadapt") for k in med if k not in ("fastadapt", "stream")}))
        del cases
    return rows


def many_table(sizes, rounds):
    rows = []
    for name in NAMES:
        cases = {"fastadapt": B.many_case(name, sizes)}
        for mode in B.TORCH_MODES:
            case = B.torch_many_case(name, sizes, mode)
            if case is not None:
                cases[f"torch_{mode}"] = case
        cases["numpy"] = seed_many_case(name, sizes)
        times = B.interleaved(cases, rounds)
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows.append(dict(name=name, **{f"{k}_ms": v * 1e3 for k, v in med.items()},
                         **{f"x_{k}": B.ratio(times, k, "fastadapt") for k in med if k != "fastadapt"}))
        del cases
    return rows


def overhead_per_parameter(rounds, count=200, size=100):
    """Microseconds per parameter of a step over `count` tensors of `size` elements (Adam)."""
    sizes = [size] * count
    cases = {"fastadapt": B.many_case("adam", sizes)}
    for mode in B.TORCH_MODES:
        case = B.torch_many_case("adam", sizes, mode)
        if case is not None:
            cases[f"torch_{mode}"] = case
    med = {k: float(np.median(v)) for k, v in B.interleaved(cases, rounds).items()}
    return {k: v / count * 1e6 for k, v in med.items()}


def step_allocation(n):
    """Peak bytes traced by tracemalloc during 5 steps of each optimizer (after the first)."""
    out = {}
    for name in NAMES:
        step = B.dense_case(name, n)
        step()                                            # state buffers are created here
        tracemalloc.start()
        for _ in range(5):
            step()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[name] = peak
        del step
    return out


COLD = textwrap.dedent("""
    import time
    t0 = time.perf_counter()
    import numpy as np
    import fastadapt as fa
    w = np.zeros(1_000_000, np.float32)
    fa.Adam([w]).step([np.ones_like(w)])
    print(time.perf_counter() - t0)
""")


def cold_start(repeats=5):
    """Seconds for `import fastadapt` + the first step (1M float32, the parallel loop) in fresh
    processes, after one process warmed the numba cache; and the whole processes' wall time."""
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "..") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", COLD], check=True, env=env, capture_output=True)
    inside, wall = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", COLD], check=True, env=env, capture_output=True, text=True)
        wall.append(time.perf_counter() - t0)
        inside.append(float(out.stdout.strip().splitlines()[-1]))
    return float(np.median(inside)), float(np.median(wall))


def threads_identical():
    """Bit-identical parameters and state with numba.set_num_threads(1) and (2), every optimizer."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        return None
    sizes = [3, 100_000, 7, 50_000]
    results = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        run = []
        for name in NAMES:
            rng = np.random.default_rng(0)
            params = [rng.standard_normal(s).astype(np.float32) for s in sizes]
            opt = B.OPTIMIZERS[name](params)
            single = [rng.standard_normal(200_000).astype(np.float32)]
            opt1 = B.OPTIMIZERS[name](single)
            for _ in range(3):
                opt.step([rng.standard_normal(s).astype(np.float32) for s in sizes])
                opt1.step([rng.standard_normal(200_000).astype(np.float32)])
            run.append((params + single, [opt.state_dict(), opt1.state_dict()]))
        results.append(run)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for (pa, sa), (pb, sb) in zip(*results):
        if not all(np.array_equal(x, y) for x, y in zip(pa, pb)):
            return False
        for da, db in zip(sa, sb):
            for j in da["state"]:
                for k, v in da["state"][j].items():
                    if not np.array_equal(v, db["state"][j][k]):
                        return False
    return True


def _load():
    """The 1-minute load average (other processes competing for the cores) as text: "1.33", or
    "unknown" where the system has none."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "unknown"


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description="fastadapt's speed targets, measured in one run.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--size", type=float, default="1e7", help="elements of the one-parameter tables")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per table")
    parser.add_argument("--quick", action="store_true", help="1e6 elements, 5 rounds (a smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--compressed-size", type=float, default="1e8",
                        help="elements of the compressed-state section's parameter (7.)")
    parser.add_argument("--anchor-rounds", type=int, default=2,
                        help="interleaved rounds (1 timed call each) of the slow 8-bit anchors in 7.")
    parser.add_argument("--no-compressed", action="store_true", help="skip the compressed-state section (7.)")
    parser.add_argument("--no-anchors", action="store_true", help="7. without bitsandbytes and torchao")
    parser.add_argument("--tables-rows", type=float, default="1e6",
                        help="rows of the embedding-tables section's table (8.), 64 wide")
    parser.add_argument("--no-tables", action="store_true", help="skip the embedding-tables section (8.)")
    parser.add_argument("--dlrm-rows", type=float, default="1e6",
                        help="rows of the torch training-loop section's embedding table (9.)")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip the torch training-loop section (9., fastadapt.torch vs torch.optim)")
    args = parser.parse_args(argv)
    n, rounds = (10**6, 5) if args.quick else (int(args.size), args.rounds)
    cn = 10**6 if args.quick else int(args.compressed_size)
    tn = 10**5 if args.quick else int(args.tables_rows)
    sizes = B.log_uniform_sizes(200, 100, 200_000, seed=0)

    load_start = _load()
    t_start = time.perf_counter()
    dense = dense_table(n, rounds)
    many = many_table(sizes, rounds)
    overhead = overhead_per_parameter(max(rounds, 20))
    alloc = step_allocation(n)
    cold_inside, cold_wall = cold_start()
    small = small_steps.rows()
    same = threads_identical()
    comp, anchors, anchor_notes = None, [], []
    if not args.no_compressed:
        comp = compressed_state.dense_rows(cn, rounds)
        if not args.no_anchors:
            anchors, anchor_notes = compressed_state.anchor_rows(cn, args.anchor_rounds)
    tab = None
    if not args.no_tables:
        tab = tables.measure(tn, 64, (0.001, 0.01, 0.1), rounds)
    dlrm, dlrm_note = None, None
    if not args.no_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            dlrm_note = "torch is not installed"
        else:
            dlrm = (torch_dlrm.measure(rows=10_000, batch=64, bag_size=5, width=64, depth=2, rounds=2)
                    if args.quick else torch_dlrm.measure(rows=int(args.dlrm_rows), rounds=rounds))
    info = B.threads_info()
    elapsed = time.perf_counter() - t_start

    print("python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))))
    print(f"({compressed_state.cpu_model()}; {n:,} float32 elements; medians of {rounds} interleaved rounds; "
          f"{B.describe_threads(info)}; numpy {np.__version__}; {elapsed:.0f} s; "
          f"1-min load average {load_start} at the start, {_load()} at the end)\n")

    print(f"1. One parameter of {n:,} float32 elements: ms per step, and how many times fastadapt is faster")
    print(f"{'':<9}{'fastadapt':>10}{'GB/s':>7}{'ceiling':>9}{'of ceil.':>9}{'fused':>8}{'x':>6}"
          f"{'foreach':>9}{'x':>7}{'numpy':>9}{'x':>7}")
    for r in dense:
        print(f"{r['name']:<9}{r['fastadapt_ms']:>10.2f}{r['gbps']:>7.1f}{r['ceiling_gbps']:>9.1f}"
              f"{r['of_ceiling']:>9.2f}{fmt(r.get('torch_fused_ms')):>8}{fmt(r.get('x_torch_fused')):>6}"
              f"{fmt(r.get('torch_foreach_ms')):>9}{fmt(r.get('x_torch_foreach'), '.1f'):>7}"
              f"{r['numpy_ms']:>9.1f}{r['x_numpy']:>7.1f}")
    print("   ceiling: the streaming loop's GB/s in the same rounds; x: the other's time / fastadapt's;\n"
          "   'of ceil.' and x are medians of per-round ratios, times and GB/s medians of all calls\n")

    print(f"2. {len(sizes)} float32 tensors of log-uniform sizes 100..200k ({sum(sizes):,} elements): ms per step")
    print(f"{'':<9}{'fastadapt':>10}{'fused':>8}{'x':>6}{'foreach':>9}{'x':>6}{'numpy':>9}{'x':>7}")
    for r in many:
        print(f"{r['name']:<9}{r['fastadapt_ms']:>10.2f}{fmt(r.get('torch_fused_ms')):>8}"
              f"{fmt(r.get('x_torch_fused')):>6}{fmt(r.get('torch_foreach_ms')):>9}"
              f"{fmt(r.get('x_torch_foreach')):>6}{r['numpy_ms']:>9.1f}{r['x_numpy']:>7.1f}")
    print("   per-parameter cost of a step (Adam, 200 tensors of 100 elements): "
          + ", ".join(f"{k} {v:.2f} us" for k, v in overhead.items()) + "\n")

    print(f"3. Peak memory traced by tracemalloc during 5 steps of {n:,}-element float32 parameters: "
          + ", ".join(f"{k} {v:,} B" for k, v in alloc.items()))
    print(f"4. import fastadapt + first step (1M float32 Adam), fresh process, warm numba cache: "
          f"{cold_inside:.2f} s (whole process, interpreter start to exit: {cold_wall:.2f} s)")
    print(f"5. 1 and 2 numba threads bit-identical: {same}\n")

    print("6. Per-step fixed cost on small models (bench/small_steps.py), microseconds per call, median of 7 blocks")
    print(f"{'':<44}{'fastadapt':>10}{'floor':>9}{'torch':>9}{'fused':>9}")
    for r in small:
        print(f"{r['case']:<44}{r['fastadapt_us']:>10.1f}{fmt(r.get('floor_us'), '.1f'):>9}"
              f"{fmt(r.get('torch_us'), '.1f'):>9}{fmt(r.get('torch_fused_us'), '.1f'):>9}")
    print("   floor: a bare numba loop doing the same update on the same arrays, scalars computed in Python\n")

    if comp is not None:
        print(f"7. Compressed optimizer state, one float32 parameter of {cn:,} elements (bench/compressed_state.py)")
        compressed_state.print_dense(comp, anchors, anchor_notes, rounds, args.anchor_rounds)
        print()

    if tab is not None:
        print("8. Embedding tables against FBGEMM's CPU TBE (bench/tables.py; "
              f"{tables.fbgemm_version() or 'FBGEMM not installed'})")
        tables.print_report(tab)
        print()

    if dlrm is not None or dlrm_note:
        print("9. fastadapt.torch in a torch training loop (bench/torch_dlrm.py)")
        if dlrm is not None:
            torch_dlrm.print_report(dlrm)
        else:
            print(f"   skipped: {dlrm_note}")
        print()

    by = {r["name"]: r for r in dense}
    targets = []
    for name in ("adam", "adamw", "adagrad"):
        if by[name].get("x_torch_fused") is not None:
            targets.append((f"{name} >= 0.97x torch fused ({n:.0e})", by[name]["x_torch_fused"], 0.97))
        targets.append((f"{name} >= 0.90 of the streaming ceiling ({n:.0e})", by[name]["of_ceiling"], 0.90))
    if by["rmsprop"].get("x_torch_foreach") is not None:
        targets.append((f"rmsprop >= 4x torch foreach ({n:.0e})", by["rmsprop"]["x_torch_foreach"], 4.0))
    for r in dense:
        targets.append((f"{r['name']} >= 10x seed numpy ({n:.0e})", r["x_numpy"], 10.0))
    for r in many:
        if r.get("x_torch_fused") is not None:
            targets.append((f"{r['name']} many tensors >= 1.2x torch fused", r["x_torch_fused"], 1.2))
    targets.append((f"{n:.0e}-element step allocates < 1 MB (MB)", max(alloc.values()) / 1e6, -1.0))
    targets.append(("import + first step <= 1 s (warm cache) (s)", cold_inside, -1.0))
    if same is not None:
        targets.append(("1 and 2 threads bit-identical", 1.0 if same else 0.0, 1.0))
    sm = {r["case"]: r for r in small}
    one, fun, hundred, rowg = (sm[c] for c in sorted(sm, key=[r["case"] for r in small].index))
    targets.append(("small: Adam.step, 1 x 10 <= 3 us (us / 3)", one["fastadapt_us"] / 3.0, -1.0))
    targets.append(("small: functional.adam, 10 <= 2 us (us / 2)", fun["fastadapt_us"] / 2.0, -1.0))
    targets.append(("small: Adam.step, 100 x 100 <= 60 us (us / 60)", hundred["fastadapt_us"] / 60.0, -1.0))
    if "torch_fused_us" in hundred:
        targets.append(("small: 100 x 100 >= 8x torch fused", hundred["torch_fused_us"] / hundred["fastadapt_us"], 8.0))
    targets.append(("small: RowGrad 1000 x 64 >= 0.5 of the same-bytes loop",
                    rowg["floor_us"] / rowg["fastadapt_us"], 0.5))
    if comp is not None:
        for r in comp:
            nm = r["name"]
            for label, tag, bar in (("fa_bf16", "bf16", 1.3), ("fa_int8", "int8", 1.5)):
                if r.get(f"x_{label}_vs_torch_fused") is not None:
                    targets.append((f"{nm} {tag} state >= {bar}x torch fused ({cn:.0e})",
                                    r[f"x_{label}_vs_torch_fused"], bar))
            targets.append((f"{nm} bf16 state bytes/param <= 4.0 (B / 4)", r["fa_bf16_bytes_per_param"] / 4.0, -2.0))
            targets.append((f"{nm} int8 state bytes/param <= 2.05 (B / 2.05)", r["fa_int8_bytes_per_param"] / 2.05, -2.0))
        bars = {"torchao_AdamWFp8": 5.0, "bnb_Adam8bit": 20.0, "torchao_AdamW8bit": 20.0}
        for r in anchors:
            if r["anchor"] in bars:
                targets.append((f"{r['name']} int8 >= {bars[r['anchor']]:g}x {r['anchor']} ({cn:.0e})",
                                r["x_fa_int8_vs_anchor"], bars[r["anchor"]]))
        for missing in sorted(set(bars) - {r["anchor"] for r in anchors}):
            print(f"(target int8 >= {bars[missing]:g}x {missing}: not measured, the anchor is not available here)")
    if tab is not None:
        measured, not_measured = tables.targets(tab)
        targets += measured
        for label in not_measured:
            print(f"({label}: not measured, see the notes of 8.)")
    if dlrm is not None:
        targets += torch_dlrm.targets(dlrm)
    missed = 0
    width = max([50] + [len(label) + 2 for label, _, _ in targets])
    print(f"{'target':<{width}}{'measured':>10}  result")
    for label, value, threshold in targets:
        ok = (value < 1.0 if threshold == -1.0 else value <= 1.0 if threshold == -2.0
              else value >= threshold)
        missed += not ok
        print(f"{label:<{width}}{value:>10.2f}  {'MET' if ok else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(n=n, rounds=rounds, info=info, dense=dense, many=many, overhead_us=overhead,
                           alloc_peak_bytes=alloc, cold_start_s=cold_inside, cold_process_s=cold_wall,
                           threads_identical=same, small_steps=small, compressed_n=cn, compressed=comp,
                           compressed_anchors=anchors, compressed_anchor_notes=anchor_notes, tables=tab,
                           torch_loop=dlrm), f, indent=2)
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
