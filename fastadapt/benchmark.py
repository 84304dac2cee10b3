"""``python -m fastadapt bench``: dense-step speed per optimizer, in GB/s, against the
streaming ceiling measured in the same run, and against torch.optim when torch is importable.

The streaming ceiling is the loop ``a[i] = a[i] * s + b[i]`` (numba, ``prange``, 12 bytes per
float32 element): as fast as this machine moves memory with these threads.  An optimizer step
moves a fixed number of bytes per element (:data:`ARRAYS_TOUCHED`), so its GB/s divided by the
ceiling's says how close to the hardware it runs.  Candidates are timed in interleaved rounds
(:func:`interleaved`: each candidate settles with one untimed call, then three timed ones; the
order rotates), so a change of machine load hits every candidate alike, and every figure is a
median.

The helpers (:func:`dense_case`, :func:`many_case`, :func:`interleaved`, ...) are also what the
scripts and suites in the repository's ``bench/`` directory measure with.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from numba import njit, prange

from . import optim

__all__ = ["OPTIMIZERS", "ARRAYS_TOUCHED", "bytes_per_element", "stream", "stream_case", "dense_case",
           "torch_dense_case", "log_uniform_sizes", "many_case", "torch_many_case", "interleaved", "ratio",
           "measure_dense", "format_table", "passive_openmp", "add_arguments", "run"]

#: optimizer name -> fastadapt class (default hyper-parameters, torch's)
OPTIMIZERS = {"adagrad": optim.Adagrad, "rmsprop": optim.RMSprop, "adam": optim.Adam, "adamw": optim.AdamW}

#: arrays read or written per element by a step with default options: Adam reads g, reads and
#: writes p, exp_avg and exp_avg_sq (7 accesses: 28 bytes in float32); Adagrad and RMSprop read g,
#: read and write p and one state buffer (5: 20 bytes); the streaming loop reads b, reads and
#: writes a (3: 12 bytes)
ARRAYS_TOUCHED = {"adagrad": 5, "rmsprop": 5, "adam": 7, "adamw": 7, "stream": 3}

#: torch.optim implementations compared; RMSprop has no fused CPU kernel in torch 2.13
TORCH_MODES = ("fused", "foreach")


def bytes_per_element(name, dtype=np.float32):
    """Bytes a step of ``name`` (an optimizer or ``"stream"``) moves per element."""
    return ARRAYS_TOUCHED[name] * np.dtype(dtype).itemsize


@njit(parallel=True, cache=True, error_model="numpy", nogil=True)
def stream(a, b, s):
    """The streaming ceiling: ``a[i] = a[i] * s + b[i]`` over all elements, in parallel."""
    for i in prange(a.size):
        a[i] = a[i] * s + b[i]


def _arrays(n, dtype, seed):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n, dtype=np.float64 if np.dtype(dtype) == np.float64 else np.float32)
    g = rng.standard_normal(n, dtype=p.dtype) * p.dtype.type(0.01)
    return p.astype(dtype, copy=False), g.astype(dtype, copy=False)


def stream_case(n, dtype=np.float32):
    """A no-argument callable running :func:`stream` on two fresh arrays of ``n`` elements."""
    a, b = _arrays(n, dtype, 1)
    s = np.dtype(dtype).type(0.999)
    return lambda: stream(a, b, s)


def dense_case(name, n, dtype=np.float32, seed=0):
    """A callable doing one fastadapt step of ``name`` on one parameter of ``n`` elements."""
    p, g = _arrays(n, dtype, seed)
    opt = OPTIMIZERS[name]([p])
    grads = [g]
    return lambda: opt.step(grads)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _torch_class(torch, name):
    return {"adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop,
            "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]


def torch_dense_case(name, n, mode, dtype=np.float32, seed=0):
    """A callable doing one torch.optim step (``mode``: "fused" or "foreach"), or None when
    torch is not importable or has no such implementation."""
    return torch_many_case(name, [n], mode, dtype, seed)


def log_uniform_sizes(count=200, low=100, high=200_000, seed=0):
    """``count`` tensor sizes drawn log-uniformly from [low, high] (a model's layers)."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.exp(rng.uniform(np.log(low), np.log(high), count))]


def many_case(name, sizes, dtype=np.float32, seed=0):
    """A callable doing one fastadapt step of ``name`` over one parameter per size."""
    pairs = [_arrays(n, dtype, seed + j) for j, n in enumerate(sizes)]
    opt = OPTIMIZERS[name]([p for p, _ in pairs])
    grads = [g for _, g in pairs]
    return lambda: opt.step(grads)


def torch_many_case(name, sizes, mode, dtype=np.float32, seed=0):
    """The torch.optim counterpart of :func:`many_case` (``mode``: "fused" or "foreach"), or None."""
    torch = _torch()
    if torch is None or (mode == "fused" and name == "rmsprop"):
        return None
    params = []
    for j, n in enumerate(sizes):
        p, g = _arrays(n, dtype, seed + j)
        t = torch.from_numpy(p)
        t.grad = torch.from_numpy(g)
        params.append(t)
    try:
        opt = _torch_class(torch, name)(params, **{mode: True})
        opt.step()
    except (RuntimeError, TypeError, ValueError):          # no such implementation here
        return None
    return opt.step


def interleaved(cases, rounds, warmup=2, progress=None, block=3, settle=1):
    """Time ``cases`` (name -> callable) in ``rounds`` rounds, the cases interleaved.

    In each round every case runs ``settle`` untimed calls, then ``block`` timed ones; the order
    of the cases rotates by one per round.  A change of machine load during the run therefore
    affects every case alike, while each case is timed in its own steady state: the untimed call
    after a switch absorbs the previous case's thread pool still spinning (numba's and torch's
    OpenMP runtimes are separate pools, see :func:`passive_openmp`) and wakes its own.

    Returns
    -------
    dict
        name -> list of wall times in seconds, ``rounds * block`` per case.
    """
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    times = {name: [] for name in names}
    clock = time.perf_counter
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = cases[name]
            for _ in range(settle):
                fn()
            for _ in range(block):
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
        if progress is not None:
            progress()
    return times


def ratio(times, numerator, denominator, block=3):
    """Median over the rounds of ``numerator``'s time over ``denominator``'s, each the median of
    its calls in that round (times from :func:`interleaved` with this ``block``): paired within a
    round, a ratio is immune to the load drifting between rounds."""
    a, b = np.asarray(times[numerator]), np.asarray(times[denominator])
    rounds = min(a.size, b.size) // block
    per_round = [np.median(a[r * block:(r + 1) * block]) / np.median(b[r * block:(r + 1) * block])
                 for r in range(rounds)]
    return float(np.median(per_round))


def threads_info():
    """numba's thread count and threading layer, and torch's thread count (None without torch)."""
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:                                     # no parallel loop has run yet
        layer = None
    torch = _torch()
    return {"numba_threads": numba.get_num_threads(), "threading_layer": layer,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "torch_threads": torch.get_num_threads() if torch is not None else None,
            "torch_version": torch.__version__ if torch is not None else None}


def measure_dense(names=tuple(OPTIMIZERS), n=10_000_000, dtype=np.float32, rounds=10, use_torch=True,
                  progress=None):
    """Medians of interleaved rounds: the streaming ceiling, fastadapt and torch, per optimizer.

    The ceiling runs in every optimizer's rounds; each optimizer's fraction of the ceiling uses
    the ceiling timed in its own rounds.

    Returns
    -------
    dict
        ``{"n", "dtype", "rounds", ..., "ceiling": {...}, "optimizers": [{...}, ...]}`` with times
        in milliseconds and bandwidths in GB/s (1e9 bytes per second).
    """
    dtype = np.dtype(dtype)
    ceiling = stream_case(n, dtype)
    rows, ceiling_times = [], []
    for name in names:
        cases = {"stream": ceiling, "fastadapt": dense_case(name, n, dtype)}
        if use_torch:
            for mode in TORCH_MODES:
                case = torch_dense_case(name, n, mode, dtype)
                if case is not None:
                    cases[f"torch_{mode}"] = case
        times = interleaved(cases, rounds, progress=progress)
        med = {k: float(np.median(v)) for k, v in times.items()}
        ceiling_times += times["stream"]
        gbps = bytes_per_element(name, dtype) * n / med["fastadapt"] / 1e9
        ceiling_gbps = bytes_per_element("stream", dtype) * n / med["stream"] / 1e9
        fraction = (ratio(times, "stream", "fastadapt") * bytes_per_element(name, dtype)
                    / bytes_per_element("stream", dtype))
        row = {"optimizer": name, "bytes_per_element": bytes_per_element(name, dtype),
               "fastadapt_ms": med["fastadapt"] * 1e3, "gbps": gbps,
               "ceiling_gbps": ceiling_gbps, "fraction_of_ceiling": fraction}
        for mode in TORCH_MODES:
            t = med.get(f"torch_{mode}")
            row[f"torch_{mode}_ms"] = None if t is None else t * 1e3
            row[f"speedup_vs_torch_{mode}"] = (None if t is None
                                               else ratio(times, f"torch_{mode}", "fastadapt"))
        rows.append(row)
        del cases, times
    t = float(np.median(ceiling_times))
    return {"n": n, "dtype": dtype.name, "rounds": rounds, **threads_info(),
            "ceiling": {"ms": t * 1e3, "gbps": bytes_per_element("stream", dtype) * n / t / 1e9,
                        "bytes_per_element": bytes_per_element("stream", dtype)},
            "optimizers": rows}


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_table(result):
    """The human-readable table of :func:`measure_dense`'s result."""
    c = result["ceiling"]
    lines = [
        f"fastadapt bench: {result['n']:,} {result['dtype']} elements, medians of {result['rounds']} "
        f"interleaved rounds x 3 calls; numba {result['numba_threads']} threads ({result['threading_layer']}, "
        f"OMP_WAIT_POLICY={result['omp_wait_policy']})"
        + (f", torch {result['torch_version']} {result['torch_threads']} threads"
           if result["torch_version"] else ", torch not installed"),
        f"streaming ceiling a = a*s + b ({c['bytes_per_element']} B/element): "
        f"{c['ms']:.2f} ms = {c['gbps']:.1f} GB/s",
        "",
        f"{'optimizer':<10}{'B/elem':>7}{'ms':>9}{'GB/s':>8}{'of ceiling':>12}"
        f"{'torch fused ms':>16}{'x fused':>9}{'torch foreach ms':>18}{'x foreach':>11}",
    ]
    for r in result["optimizers"]:
        lines.append(
            f"{r['optimizer']:<10}{r['bytes_per_element']:>7}{r['fastadapt_ms']:>9.2f}{r['gbps']:>8.1f}"
            f"{r['fraction_of_ceiling']:>12.2f}{_fmt(r['torch_fused_ms'], '.2f'):>16}"
            f"{_fmt(r['speedup_vs_torch_fused'], '.2f'):>9}{_fmt(r['torch_foreach_ms'], '.2f'):>18}"
            f"{_fmt(r['speedup_vs_torch_foreach'], '.2f'):>11}")
    lines.append("")
    lines.append("'x fused' / 'x foreach': torch's time over fastadapt's (above 1: fastadapt is faster); "
                 "'of ceiling': fastadapt's GB/s over the streaming loop's.\nBoth are medians of "
                 "per-round ratios (each round's calls are close in time); ms and GB/s: medians of all calls.")
    return "\n".join(lines)


class _Progress:
    """A tqdm bar on stderr when tqdm is installed, else a plain counter line."""

    def __init__(self, total, enabled=True):
        self.total, self.done, self.bar = total, 0, None
        self.enabled = enabled and total > 0
        if self.enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc="fastadapt bench", unit="round", file=sys.stderr,
                                leave=False)
            except ImportError:
                pass

    def __call__(self):
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        else:
            print(f"\rfastadapt bench: {self.done}/{self.total} rounds", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def add_arguments(parser):
    """Options of ``python -m fastadapt bench``."""
    parser.add_argument("--size", type=float, default=1e7,
                        help="elements per parameter (default 1e7)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS),
                        metavar="NAME", help="any of " + ", ".join(OPTIMIZERS) + " (default: all)")
    parser.add_argument("--rounds", type=int, default=10,
                        help="interleaved rounds, 3 timed calls per optimizer and round (default 10)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for numba and torch (default: numba's default)")
    parser.add_argument("--no-torch", action="store_true", help="do not compare with torch.optim")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (for machines)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--passive-openmp", action="store_true",
                        help="set OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning)")


def passive_openmp():
    """Make idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), unless
    the environment already says otherwise.

    numba's OpenMP pool and torch's (torch ships its own libgomp) each keep their threads
    spinning for a while after a parallel loop.  In one process on few cores, a loop of one
    library right after the other's waits for cores the idle threads are spinning on: on this
    project's 2-core machines, alternating single calls of 10M-element steps took 8-13 ms
    instead of 2.5-6.  Sleeping threads avoid that, but every parallel loop then pays a
    wake-up (tens of microseconds), which torch's fused kernels pay once per tensor: with 200
    tensors torch fused Adam went from ~3.3 ms to ~12 ms.  :func:`interleaved` therefore
    leaves the policy alone and times each case after an untimed settling call.  Both
    runtimes read the variable when they start: call this before importing torch and before
    the first parallel loop runs.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run(args):
    """Run the benchmark; print the table (or JSON).  Returns the exit status."""
    if args.passive_openmp:
        passive_openmp()
    n = int(args.size)
    if n < 1 or args.rounds < 1:
        print("fastadapt bench: --size and --rounds must be positive", file=sys.stderr)
        return 2
    if args.threads is not None:
        import numba

        if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
            print(f"fastadapt bench: --threads must be in 1..{numba.config.NUMBA_NUM_THREADS} "
                  "(NUMBA_NUM_THREADS)", file=sys.stderr)
            return 2
        numba.set_num_threads(args.threads)
        torch = _torch()
        if torch is not None:
            torch.set_num_threads(args.threads)
    progress = _Progress(len(args.optimizers) * args.rounds, enabled=not args.no_progress)
    try:
        result = measure_dense(args.optimizers, n, np.dtype(args.dtype), args.rounds,
                               use_torch=not args.no_torch, progress=progress)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0
