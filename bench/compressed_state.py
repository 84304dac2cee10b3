"""Compressed optimizer state (issue #13): speed, bytes per parameter, step memory, sparse rows,
and the largest embedding table this machine can train: ``python bench/compressed_state.py``.

1. Adam and AdamW steps on one float32 parameter of ``--size`` elements (default 1e8):
   fastadapt with ``state_dtype`` None / "bfloat16" / "int8" against torch ``fused=True``
   (float32 state), in interleaved rounds (:func:`fastadapt.apps.benchmark.interleaved`: one
   untimed settling call and 3 timed ones per candidate and round, the order rotating).  Ratios
   are medians of per-round ratios.  The anchors -- bitsandbytes ``Adam8bit`` / ``AdamW8bit`` (on
   CPU) and torchao ``AdamW8bit`` / ``AdamWFp8`` / ``AdamW4bit`` when importable -- take seconds
   per step at 1e8, so they are timed in their own interleaved rounds (``--anchor-rounds``,
   default 2, one timed call per round, no settling call) together with fastadapt int8 and torch
   fused, which the ratios pair them with.  State bytes per parameter: the state buffers'
   ``nbytes`` summed, over the parameter's elements (torch and the anchors: their state tensors).
2. Step memory of each fastadapt variant: tracemalloc's peak and the resident-set growth (peak
   RSS, ``VmHWM`` reset through ``/proc/self/clear_refs`` where the kernel allows it, else
   ``ru_maxrss``, minus the RSS before) during the first step (which creates the state) and during
   a later step.  A later step should need O(block) memory, not O(N).
3. Sparse rows: ``RowGrad`` steps touching 1 % of the rows of a 1M x 64 float32 table, Adam and
   SparseAdam with float32 vs int8 state (skipped, with a note, where the optimizer refuses
   sparse gradients with compressed state).
4. The largest 64-wide table trainable with Adam in this machine's RAM, from the measured bytes
   per row (parameter + state buffers) with float32 and int8 state; ``--prove`` allocates a
   table of 1.5x the float32 limit's rows with int8 state and runs 3 RowGrad steps.

The functions (:func:`dense_rows`, :func:`anchor_rows`, :func:`step_memory`, :func:`sparse_row`,
:func:`largest_table`) are what ``bench/targets.py`` measures its compressed-state section with.
Exit status 0 (a measurement, not a test).  The anchors are optional and not in the ``bench``
extra (they pull a torch wheel); see the comment below it in pyproject.toml for their install lines.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
import tracemalloc

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import fastadapt as fa  # noqa: E402
from fastadapt.apps import benchmark as B  # noqa: E402

#: fastadapt's state_dtype variants, by label
VARIANTS = {"fa_f32": None, "fa_bf16": "bfloat16", "fa_int8": "int8"}

#: errors an optimizer raises for sparse gradients on compressed state it does not support (the
#: branch this was written on raised AttributeError from inside the sparse path)
SPARSE_REFUSALS = (NotImplementedError, ValueError, TypeError, AttributeError)

#: fraction of MemTotal :func:`largest_table` counts as usable for the table and its state (the
#: rest: the OS, the interpreter, the gradients)
MEMORY_MARGIN = 0.75


# =========================================================================== helpers

def cpu_model():
    """The CPU's model name (from /proc/cpuinfo), or platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def mem_total():
    """MemTotal and MemAvailable from /proc/meminfo, in bytes (None where unreadable)."""
    out = {"MemTotal": None, "MemAvailable": None}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                if key in out:
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out["MemTotal"], out["MemAvailable"]


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def state_nbytes(state):
    """Bytes held by one parameter's state: arrays, compressed buffers, tensors (``nbytes``)."""
    total = 0
    for v in state.values():
        if isinstance(v, (int, float)):
            continue
        n = getattr(v, "nbytes", None)
        if isinstance(n, (int, np.integer)):
            total += int(n)
        elif hasattr(v, "__dict__") or hasattr(v, "__slots__"):     # a torchao subclass tensor
            total += _tensor_subclass_nbytes(v)
    return total


def _tensor_subclass_nbytes(t):
    """torchao keeps its quantized state as tensor subclasses whose ``nbytes`` is the logical
    float size; count the plain tensors they hold (``__tensor_flatten__``) instead."""
    try:
        names, _ = t.__tensor_flatten__()
    except (AttributeError, TypeError, RuntimeError):
        return int(getattr(t, "nbytes", 0) or 0)
    return sum(_tensor_subclass_nbytes(getattr(t, name)) for name in names)


def _arrays(n, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n, dtype=np.float32)
    g = rng.standard_normal(n, dtype=np.float32) * np.float32(0.01)
    return p, g


# =========================================================================== cases

def fa_case(name, p, g, state_dtype, rounding="stochastic"):
    """(step callable, optimizer): fastadapt ``name`` ("adam"/"adamw") on parameter ``p`` with
    gradient ``g`` (not copied: ``g`` may be shared by several cases)."""
    opt = B.optimizer_class(name)([p], state_dtype=state_dtype, state_rounding=rounding)
    grads = [g]
    return (lambda: opt.step(grads)), opt


def torch_fused_case(name, p, g):
    """(step, optimizer) of torch.optim ``name`` with ``fused=True`` (float32 state), or None."""
    torch = _torch()
    if torch is None:
        return None
    t = torch.from_numpy(p)
    t.grad = torch.from_numpy(g)
    opt = B.torch_class(torch, name)([t], fused=True)
    opt.step()
    return opt.step, opt


def anchor_factories(name):
    """label -> class of the 8-bit/fp8/4-bit anchors importable here for ``name``: bitsandbytes
    Adam8bit (adam) / AdamW8bit (adamw), torchao AdamW8bit, AdamWFp8, AdamW4bit (adamw).  Also
    returns the notes on what could not be imported."""
    out, notes = {}, []
    try:
        import bitsandbytes as bnb
        out["bnb_" + ("Adam8bit" if name == "adam" else "AdamW8bit")] = (
            bnb.optim.Adam8bit if name == "adam" else bnb.optim.AdamW8bit)
    except Exception as e:                      # ImportError, or a broken install
        notes.append(f"bitsandbytes not usable ({type(e).__name__}: {str(e)[:80]})")
    if name == "adamw":
        try:
            import torchao.optim as tao
            for cls_name in ("AdamW8bit", "AdamWFp8", "AdamW4bit"):
                cls = getattr(tao, cls_name, None)
                if cls is not None:
                    out["torchao_" + cls_name] = cls
        except Exception as e:
            notes.append(f"torchao not usable ({type(e).__name__}: {str(e)[:80]})")
    return out, notes


def anchor_case(cls, p, g):
    """(step, optimizer) of a torch-API anchor on ``p``, or raises what its first step raises."""
    torch = _torch()
    t = torch.from_numpy(p)
    t.grad = torch.from_numpy(g)
    opt = cls([t])
    opt.step()
    return opt.step, opt


def _torch_state_bytes(opt):
    return sum(state_nbytes(s) for s in opt.state.values())


# =========================================================================== 1. dense steps

def dense_rows(n, rounds, names=("adam", "adamw")):
    """Per optimizer: ms per step (median of all timed calls) of fastadapt's three variants and
    torch fused, each variant's speed-up over torch fused (median of per-round ratios) and bytes
    of state per parameter."""
    rows = []
    for name in names:
        base_p, g = _arrays(n)
        cases, opts = {}, {}
        for label, sd in VARIANTS.items():
            cases[label], opts[label] = fa_case(name, base_p.copy(), g, sd)
        tc = torch_fused_case(name, base_p.copy(), g)
        if tc is not None:
            cases["torch_fused"], opts["torch_fused"] = tc
        del base_p
        times = B.interleaved(cases, rounds)
        row = {"name": name, "n": n, "rounds": rounds}
        for label in cases:
            row[f"{label}_ms"] = float(np.median(times[label])) * 1e3
            if label == "torch_fused":
                row["torch_fused_bytes_per_param"] = _torch_state_bytes(opts[label]) / n
            else:
                row[f"{label}_bytes_per_param"] = state_nbytes(opts[label].state[0]) / n
                if "torch_fused" in cases:
                    row[f"x_{label}_vs_torch_fused"] = B.ratio(times, "torch_fused", label)
        rows.append(row)
        del cases, opts, times, g
        gc.collect()
    return rows


def anchor_rows(n, rounds, names=("adam", "adamw")):
    """The slow anchors, in their own interleaved rounds (``rounds`` rounds of one timed call,
    one warm-up call, no settling call) with fastadapt int8 and torch fused: ms per step, bytes
    per parameter, torch fused's time over the anchor's, and the anchor's time over fastadapt
    int8's.  Anchors whose construction or first step raises are reported with the error."""
    rows, notes = [], []
    for name in names:
        factories, why = anchor_factories(name)
        notes += [f"{name}: {w}" for w in why]
        if not factories:
            continue
        base_p, g = _arrays(n)
        cases, opts = {}, {}
        cases["fa_int8"], opts["fa_int8"] = fa_case(name, base_p.copy(), g, "int8")
        tc = torch_fused_case(name, base_p.copy(), g)
        if tc is not None:
            cases["torch_fused"], opts["torch_fused"] = tc
        for label, cls in factories.items():
            try:
                cases[label], opts[label] = anchor_case(cls, base_p.copy(), g)
            except Exception as e:
                notes.append(f"{name}: {label} failed on CPU ({type(e).__name__}: {str(e)[:120]})")
        del base_p
        anchors = [k for k in cases if k not in ("fa_int8", "torch_fused")]
        if not anchors:
            continue
        times = B.interleaved(cases, rounds, warmup=1, block=1, settle=0)
        for label in anchors:
            row = {"name": name, "anchor": label, "n": n, "rounds": rounds,
                   "anchor_ms": float(np.median(times[label])) * 1e3,
                   "fa_int8_ms": float(np.median(times["fa_int8"])) * 1e3,
                   "anchor_bytes_per_param": _torch_state_bytes(opts[label]) / n,
                   "x_fa_int8_vs_anchor": B.ratio(times, label, "fa_int8", block=1)}
            if "torch_fused" in cases:
                row["x_anchor_vs_torch_fused"] = B.ratio(times, "torch_fused", label, block=1)
            rows.append(row)
        del cases, opts, times, g
        gc.collect()
    return rows, notes


# =========================================================================== 2. step memory

def _rss():
    """Resident set size in bytes (/proc/self/statm; ru_maxrss where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak():
    """Reset the kernel's peak-RSS mark (VmHWM); True if it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure(fn):
    gc.collect()
    exact = _reset_peak()
    before = _rss()
    before_peak = _peak_rss()
    tracemalloc.start()
    fn()
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = _peak_rss()
    # without a reset, the high-water mark only moves if the step set a new one
    growth = max(0, peak - before) if exact else max(0, peak - max(before, before_peak))
    return traced, growth, exact


def step_memory(n, name="adam"):
    """Per fastadapt variant: tracemalloc peak and RSS growth (bytes) during the first step
    (state creation) and during the third (steady) step of ``name`` on ``n`` float32 elements.
    ``exact_rss``: the peak RSS was reset before each step (else only a new process-wide peak
    shows as growth)."""
    out = {}
    for label, sd in VARIANTS.items():
        p, g = _arrays(n)
        step, opt = fa_case(name, p, g, sd)
        first = _measure(step)
        step()
        later = _measure(step)
        out[label] = {"first_traced": first[0], "first_rss": first[1],
                      "step_traced": later[0], "step_rss": later[1], "exact_rss": later[2],
                      "state_bytes": state_nbytes(opt.state[0])}
        del step, opt, p, g
        gc.collect()
    return out


# =========================================================================== 3. sparse rows

def sparse_row(nrows=1_000_000, dim=64, density=0.01, rounds=5):
    """RowGrad steps touching ``density`` of the rows of an ``(nrows, dim)`` float32 table, float32
    vs int8 state, for Adam and SparseAdam: ms per step and int8's speed relative to float32
    (float32 time / int8 time, median of per-round ratios).  A variant that refuses (see
    :data:`SPARSE_REFUSALS`) is reported as skipped with the error."""
    from bench_sparse import make_case

    case = make_case(density, nrows, dim)
    grads = [case.row_grad]
    rows, notes = [], []
    for cls in (fa.Adam, fa.SparseAdam):
        cases = {}
        for label, sd in (("f32", None), ("int8", "int8")):
            table = case.table()
            try:
                opt = cls([table], state_dtype=sd)
                opt.step(grads)
            except SPARSE_REFUSALS as e:
                notes.append(f"{cls.__name__} RowGrad with state_dtype={sd!r} skipped: "
                             f"{type(e).__name__}: {str(e)[:160]}")
                continue
            cases[label] = (lambda opt=opt: opt.step(grads))
        if len(cases) < 2:
            continue
        times = B.interleaved(cases, rounds)
        rows.append({"name": cls.__name__, "nrows": nrows, "dim": dim, "density": density,
                     "f32_ms": float(np.median(times["f32"])) * 1e3,
                     "int8_ms": float(np.median(times["int8"])) * 1e3,
                     "x_int8_vs_f32": B.ratio(times, "f32", "int8")})
        del cases, times
        gc.collect()
    return rows, notes


# =========================================================================== 4. largest table

def bytes_per_row(dim=64, state_dtype=None, rows=4096):
    """Measured bytes per row of a ``(rows, dim)`` float32 table trained with Adam: the parameter's
    ``nbytes`` plus its state buffers' after one (dense, zero-gradient) step, over ``rows``."""
    table = np.zeros((rows, dim), np.float32)
    opt = fa.Adam([table], state_dtype=state_dtype)
    opt.step([np.zeros_like(table)])
    return (table.nbytes + state_nbytes(opt.state[0])) / rows


def largest_table(dim=64, margin=MEMORY_MARGIN):
    """Largest ``dim``-wide table trainable with Adam in ``margin`` * MemTotal, float32 vs int8
    state, from :func:`bytes_per_row`."""
    total, available = mem_total()
    out = {"dim": dim, "mem_total": total, "mem_available": available, "margin": margin}
    for label, sd in (("f32", None), ("int8", "int8")):
        b = bytes_per_row(dim, sd)
        out[f"{label}_bytes_per_row"] = b
        out[f"{label}_rows"] = int(margin * total // b) if total else None
    if total:
        out["x_rows_int8_vs_f32"] = out["int8_rows"] / out["f32_rows"]
    return out


def prove(info, steps=3, density=0.01, seed=0):
    """Allocate a table of 1.5x the float32 limit's rows (touching every page), give it Adam with
    int8 state and run ``steps`` RowGrad steps; return a dict of what happened.  Refuses (returns
    a reason) when MemAvailable cannot hold the table and its int8 state with a 10 % margin."""
    dim = info["dim"]
    nrows = int(1.5 * info["f32_rows"])
    need = nrows * info["int8_bytes_per_row"] * 1.10      # table + int8 state (built without a float32 temporary)
    if info["mem_available"] is None or need > info["mem_available"]:
        return {"ran": False, "rows": nrows, "reason": f"needs ~{need / 2**30:.1f} GiB, MemAvailable is "
                f"{(info['mem_available'] or 0) / 2**30:.1f} GiB"}
    t0 = time.perf_counter()
    table = np.empty((nrows, dim), np.float32)
    chunk = 1 << 20
    for lo in range(0, nrows, chunk):                    # touch every page (np.zeros would not)
        table[lo:lo + chunk] = 0.01
    opt = fa.Adam([table], state_dtype="int8")
    rng = np.random.default_rng(seed)
    k = max(1, int(density * nrows))
    done = 0
    try:
        for _ in range(steps):
            rows = np.sort(rng.choice(nrows, size=k, replace=False)).astype(np.int64)
            values = rng.standard_normal((k, dim), dtype=np.float32)
            opt.step([fa.RowGrad(rows, values)])
            done += 1
    except SPARSE_REFUSALS as e:
        return {"ran": False, "rows": nrows, "steps": done,
                "reason": f"RowGrad with int8 state refused: {type(e).__name__}: {str(e)[:160]}"}
    return {"ran": True, "rows": nrows, "steps": done, "seconds": time.perf_counter() - t0,
            "table_bytes": table.nbytes, "state_bytes": state_nbytes(opt.state[0]),
            "peak_rss": _peak_rss(), "finite": bool(np.isfinite(table[rows]).all())}


# =========================================================================== report

def _f(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_dense(dense, anchors, anchor_notes, rounds, anchor_rounds):
    """Section 1's tables (also printed by bench/targets.py)."""
    print(f"   ms per step; x = torch fused's time / this one's (median of per-round ratios, {rounds} "
          "interleaved rounds x 3 calls); B/param = state bytes per parameter")
    print(f"{'':<7}{'variant':<14}{'ms':>10}{'x fused':>9}{'B/param':>9}")
    for r in dense:
        for label in list(VARIANTS) + ["torch_fused"]:
            if f"{label}_ms" not in r:
                continue
            print(f"{r['name']:<7}{label:<14}{r[f'{label}_ms']:>10.2f}"
                  f"{_f(r.get(f'x_{label}_vs_torch_fused')):>9}{r[f'{label}_bytes_per_param']:>9.3f}")
    print()
    print(f"   anchors: {anchor_rounds} interleaved rounds of ONE timed call each (slow: seconds per step at "
          "1e8), with fastadapt int8 and torch fused in the same rounds")
    if anchors:
        print(f"{'':<7}{'anchor':<22}{'ms':>11}{'x fused':>9}{'int8 x':>9}{'B/param':>9}")
        for r in anchors:
            print(f"{r['name']:<7}{r['anchor']:<22}{r['anchor_ms']:>11.1f}{_f(r.get('x_anchor_vs_torch_fused')):>9}"
                  f"{r['x_fa_int8_vs_anchor']:>9.1f}{r['anchor_bytes_per_param']:>9.3f}")
        print("   'int8 x': the anchor's time / fastadapt int8's (how many times fastadapt int8 is faster)")
    for note in anchor_notes:
        print(f"   note: {note}")


def print_report(dense, anchors, anchor_notes, memory, sparse, sparse_notes, table, n, rounds,
                 anchor_rounds, mem_n):
    print(f"1. One float32 parameter of {n:,} elements")
    print_dense(dense, anchors, anchor_notes, rounds, anchor_rounds)
    print()
    print(f"2. Memory of one Adam step on {mem_n:,} float32 elements (tracemalloc peak; RSS growth = peak RSS "
          "during the step - RSS before)")
    print(f"{'':<10}{'first step: traced':>20}{'RSS':>14}{'later step: traced':>21}{'RSS':>14}{'state B':>14}")
    for label, m in memory.items():
        print(f"{label:<10}{m['first_traced']:>20,}{m['first_rss']:>14,}{m['step_traced']:>21,}"
              f"{m['step_rss']:>14,}{m['state_bytes']:>14,}")
    exact = all(m["exact_rss"] for m in memory.values())
    print("   " + ("peak RSS reset before each step (/proc/self/clear_refs)" if exact else
                   "peak RSS could not be reset: RSS growth shows only a new process-wide peak (a lower bound)"))
    print("   RSS growth is a lower bound: it reads 0 when the allocator reuses pages already resident (glibc keeps\n"
          "   freed blocks below its mmap threshold, up to 32 MiB); tracemalloc counts every numpy allocation.\n"
          "   The first step creates the state (its traced bytes are the state itself: codes and scales are\n"
          "   built directly, no float32 temporary); later steps allocate O(block) scratch.")
    print()
    print("3. RowGrad steps on a table, float32 vs int8 state (x = float32 time / int8 time)")
    for r in sparse:
        print(f"   {r['name']:<11}{r['nrows']:,} x {r['dim']}, {r['density'] * 100:g} % rows: float32 "
              f"{r['f32_ms']:.3f} ms, int8 {r['int8_ms']:.3f} ms, x {r['x_int8_vs_f32']:.2f}")
    for note in sparse_notes:
        print(f"   note: {note}")
    print()
    print(f"4. Largest {table['dim']}-wide table trainable with Adam (parameter + state, measured nbytes per "
          f"row), in {table['margin']:.0%} of MemTotal")
    if table["mem_total"]:
        print(f"   MemTotal {table['mem_total'] / 2**30:.1f} GiB (margin: {1 - table['margin']:.0%} left for "
              "the OS, Python and the gradients)")
        for label in ("f32", "int8"):
            print(f"   {label:<5} state: {table[f'{label}_bytes_per_row']:.1f} B/row -> {table[f'{label}_rows']:,} rows "
                  f"({table[f'{label}_rows'] * table['dim'] / 1e9:.2f} G parameters)")
        print(f"   int8 state trains {table['x_rows_int8_vs_f32']:.2f}x the rows "
              "(--prove allocates 1.5x the float32 limit with int8 state and runs 3 RowGrad steps)")
    else:
        print("   /proc/meminfo not readable: skipped")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", type=float, default=1e8, help="elements of the dense parameter")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of the fast candidates")
    parser.add_argument("--anchor-rounds", type=int, default=2,
                        help="interleaved rounds of the slow anchors (bitsandbytes, torchao), 1 timed call each")
    parser.add_argument("--mem-size", type=float, default=None,
                        help="elements of the step-memory measurement (default: --size)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the sparse table (64 wide)")
    parser.add_argument("--threads", type=int, default=2, help="numba and torch threads")
    parser.add_argument("--no-anchors", action="store_true", help="skip bitsandbytes and torchao")
    parser.add_argument("--prove", action="store_true",
                        help="allocate 1.5x the float32 limit's rows with int8 state and run 3 RowGrad "
                             "steps (uses most of the machine's RAM)")
    parser.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    args = parser.parse_args(argv)
    n = int(args.size)
    mem_n = int(args.mem_size) if args.mem_size else n

    import numba
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    dense = dense_rows(n, args.rounds)
    anchors, anchor_notes = ([], ["skipped (--no-anchors)"]) if args.no_anchors else anchor_rows(n, args.anchor_rounds)
    memory = step_memory(mem_n)
    sparse, sparse_notes = sparse_row(args.rows, rounds=args.rounds)
    table = largest_table()
    info = B.threads_info()
    print("python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:] if argv is None else
                               [os.path.relpath(__file__)] + list(argv)))
    print(f"({cpu_model()}; {B.describe_threads(info)}; numpy {np.__version__}; "
          f"{time.perf_counter() - t0:.0f} s)\n")
    print_report(dense, anchors, anchor_notes, memory, sparse, sparse_notes, table, n, args.rounds,
                 args.anchor_rounds, mem_n)
    proof = None
    if args.prove:
        if not table["mem_total"]:
            proof = {"ran": False, "reason": "no /proc/meminfo"}
        else:
            print(f"\n--prove: {int(1.5 * table['f32_rows']):,} x {table['dim']} float32 table, int8 state, 3 RowGrad steps")
            proof = prove(table)
        print(f"   {proof}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(argv=sys.argv if argv is None else list(argv), cpu=cpu_model(), info=info, n=n,
                           rounds=args.rounds, anchor_rounds=args.anchor_rounds, dense=dense, anchors=anchors,
                           anchor_notes=anchor_notes, memory=memory, sparse=sparse, sparse_notes=sparse_notes,
                           largest_table=table, prove=proof), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
