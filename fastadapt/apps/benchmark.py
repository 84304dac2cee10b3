"""``python -m fastadapt bench``: dense-step speed per optimizer, in GB/s, against the
streaming ceiling measured in the same run, and against torch.optim when torch is importable.

The streaming ceiling is the loop ``a[i] = a[i] * s + b[i]`` (numba, ``prange``, 12 bytes per
float32 element): as fast as this machine moves memory with these threads.  An optimizer step
moves a fixed number of bytes per element (:func:`bytes_per_element`, counted from the state the
optimizer keeps), so its GB/s divided by the ceiling's says how close to the hardware it runs.
Candidates are timed in interleaved rounds (:func:`interleaved`: each candidate settles with one
untimed call, then three timed ones; the order rotates), so a change of machine load hits every
candidate alike, and every figure is a median.

The optimizers are named as in fastadapt and torch.optim (:data:`NAMES`); the command line and
the helpers take them in lower case too.  Everything per optimizer is derived from the name: the
class is ``getattr(fastadapt, name)``, the torch counterpart ``getattr(torch.optim, name, None)``,
the bytes per element the state buffers a step creates.  A new dense optimizer needs its name
added to :data:`NAMES`, nothing else.

The helpers (:func:`dense_case`, :func:`many_case`, :func:`interleaved`, ...) are also what the
scripts and suites in the repository's ``bench/`` directory measure with.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any
import json
import os
import time

import numpy as np
from numba import njit, prange

import fastadapt as fa

from .progress import Progress

__all__ = ["NAMES", "OPTIMIZERS", "TORCH_MODES", "canonical_name", "optimizer_class", "torch_class",
           "state_buffers", "arrays_touched", "bytes_per_element", "stream", "stream_case", "dense_case",
           "torch_dense_case", "log_uniform_sizes", "many_case", "torch_many_case", "interleaved", "ratio",
           "threads_info", "describe_threads", "measure_dense", "format_table", "passive_openmp",
           "add_arguments", "run"]

#: the dense optimizers benchmarked, by their class name in fastadapt (and torch.optim), in the
#: table's order; names fastadapt does not have (yet) are skipped
NAMES = ("Adagrad", "RMSprop", "Adam", "AdamW", "SGD", "Adadelta", "Adamax", "NAdam", "RAdam")

#: lower-case name -> fastadapt class, for the optimizers of :data:`NAMES` this fastadapt has
#: (default hyper-parameters: torch's)
OPTIMIZERS = {name.lower(): getattr(fa, name) for name in NAMES if isinstance(getattr(fa, name, None), type)}

#: torch.optim implementations compared (those torch lacks for an optimizer are skipped)
TORCH_MODES = ("fused", "foreach")


def canonical_name(name: str) -> str:
    """The class name (``"RMSprop"``) of an optimizer of :data:`NAMES` that fastadapt has, given
    in any case (``"rmsprop"``)."""
    for canonical in NAMES:
        if canonical.lower() == str(name).lower() and isinstance(getattr(fa, canonical, None), type):
            return canonical
    raise KeyError(f"no such dense optimizer in fastadapt: {name!r} (have: {', '.join(OPTIMIZERS)})")


def optimizer_class(name: str) -> Any:
    """fastadapt's class for ``name`` (any case): ``getattr(fastadapt, canonical_name(name))``."""
    return getattr(fa, canonical_name(name))


def torch_class(torch: Any, name: str) -> Any:
    """torch.optim's class of the same name, or None when torch has none."""
    return getattr(torch.optim, canonical_name(name), None)


def state_buffers(name: str) -> Any:
    """Names of the per-element state buffers a default ``name`` step keeps, found by stepping
    once on a tiny array (those of the parameter's shape; the step count is not one)."""
    return _state_buffers(canonical_name(name), optimizer_class(name))


@functools.lru_cache(maxsize=None)
def _state_buffers(name: str, cls: Any) -> Any:
    p = np.zeros(4, np.float32)
    opt = cls([p])
    opt.step([np.full(4, 0.01, np.float32)])
    return tuple(k for k, v in opt.state[0].items()
                 if isinstance(v, np.ndarray) and v.shape == p.shape)


def arrays_touched(name: str) -> Any:
    """Arrays read or written per element by a default step of ``name``: the parameter (read and
    written), the gradient (read) and each state buffer (read and written) -- 7 for Adam (two
    buffers), 5 for Adagrad and RMSprop (one), 3 for the streaming loop ``"stream"``."""
    if name == "stream":
        return 3                                       # reads b, reads and writes a
    return 3 + 2 * len(state_buffers(name))


def bytes_per_element(name: str, dtype: Any = np.float32) -> Any:
    """Bytes a step of ``name`` (an optimizer or ``"stream"``) moves per element."""
    return arrays_touched(name) * np.dtype(dtype).itemsize


@njit(parallel=True, cache=True, error_model="numpy", nogil=True)
def stream(a, b, s):
    """The streaming ceiling: ``a[i] = a[i] * s + b[i]`` over all elements, in parallel."""
    for i in prange(a.size):
        a[i] = a[i] * s + b[i]


def _arrays(n: int, dtype: Any, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n, dtype=np.float64 if np.dtype(dtype) == np.float64 else np.float32)
    g = rng.standard_normal(n, dtype=p.dtype) * p.dtype.type(0.01)
    return p.astype(dtype, copy=False), g.astype(dtype, copy=False)


def stream_case(n: int, dtype: Any = np.float32) -> Any:
    """A no-argument callable running :func:`stream` on two fresh arrays of ``n`` elements."""
    a, b = _arrays(n, dtype, 1)
    s = np.dtype(dtype).type(0.999)
    return lambda: stream(a, b, s)


def dense_case(name: str, n: int, dtype: Any = np.float32, seed: int = 0) -> Any:
    """A callable doing one fastadapt step of ``name`` on one parameter of ``n`` elements."""
    p, g = _arrays(n, dtype, seed)
    opt = optimizer_class(name)([p])
    grads = [g]
    return lambda: opt.step(grads)


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_dense_case(name: str, n: int, mode: Any, dtype: Any = np.float32, seed: int = 0) -> Any:
    """A callable doing one torch.optim step (``mode``: "fused" or "foreach"), or None when
    torch is not importable or has no such implementation."""
    return torch_many_case(name, [n], mode, dtype, seed)


def log_uniform_sizes(count: int = 200, low: int = 100, high: int = 200_000, seed: int = 0) -> Any:
    """``count`` tensor sizes drawn log-uniformly from [low, high] (a model's layers)."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.exp(rng.uniform(np.log(low), np.log(high), count))]


def many_case(name: str, sizes: Any, dtype: Any = np.float32, seed: int = 0) -> Any:
    """A callable doing one fastadapt step of ``name`` over one parameter per size."""
    pairs = [_arrays(n, dtype, seed + j) for j, n in enumerate(sizes)]
    opt = optimizer_class(name)([p for p, _ in pairs])
    grads = [g for _, g in pairs]
    return lambda: opt.step(grads)


def torch_many_case(name: str, sizes: Any, mode: Any, dtype: Any = np.float32, seed: int = 0) -> Any:
    """The torch.optim counterpart of :func:`many_case` (``mode``: "fused" or "foreach"), or None."""
    torch = _torch()
    cls = None if torch is None else torch_class(torch, name)
    if cls is None:
        return None
    params = []
    for j, n in enumerate(sizes):
        p, g = _arrays(n, dtype, seed + j)
        t = torch.from_numpy(p)
        t.grad = torch.from_numpy(g)
        params.append(t)
    try:
        opt = cls(params, **{mode: True})
        opt.step()
    except (RuntimeError, TypeError, ValueError):          # no such implementation here
        return None
    return opt.step


def interleaved(
        cases: Any,
        rounds: Any,
        warmup: int = 2,
        progress: Any = None,
        block: int = 3,
        settle: int = 1,
) -> Any:
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
    times: dict[str, list[float]] = {name: [] for name in names}
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


def ratio(times: Any, numerator: Any, denominator: Any, block: int = 3) -> float:
    """Median over the rounds of ``numerator``'s time over ``denominator``'s, each the median of
    its calls in that round (times from :func:`interleaved` with this ``block``): paired within a
    round, a ratio is immune to the load drifting between rounds."""
    a, b = np.asarray(times[numerator]), np.asarray(times[denominator])
    rounds = min(a.size, b.size) // block
    per_round = [np.median(a[r * block:(r + 1) * block]) / np.median(b[r * block:(r + 1) * block])
                 for r in range(rounds)]
    return float(np.median(per_round))


def threads_info() -> Any:
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


def describe_threads(info: Any) -> Any:
    """:func:`threads_info`'s figures as text, e.g. ``numba 2 threads (omp layer),
    OMP_WAIT_POLICY unset, torch 2.13.0 with 2 threads`` (or ``torch not installed``)."""
    layer = info.get("threading_layer")
    policy = info.get("omp_wait_policy")
    text = (f"numba {info['numba_threads']} threads"
            + (f" ({layer} layer)" if layer else "")
            + (f", OMP_WAIT_POLICY={policy}" if policy else ", OMP_WAIT_POLICY unset"))
    if info.get("torch_version"):
        return text + f", torch {info['torch_version']} with {info['torch_threads']} threads"
    return text + ", torch not installed"


def measure_dense(
        names: Any = tuple(OPTIMIZERS),
        n: int = 10_000_000,
        dtype: Any = np.float32,
        rounds: int = 10,
        use_torch: bool = True,
        progress: Any = None,
) -> Any:
    """Medians of interleaved rounds: the streaming ceiling, fastadapt and torch, per optimizer.

    The ceiling runs in every optimizer's rounds; each optimizer's fraction of the ceiling uses
    the ceiling timed in its own rounds.  Every optimizer runs ``rounds`` rounds of its own;
    ``progress``, when given, is called as ``progress(name, done, rounds)`` after each.

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
        name = canonical_name(name).lower()
        cases = {"stream": ceiling, "fastadapt": dense_case(name, n, dtype)}
        if use_torch:
            for mode in TORCH_MODES:
                case = torch_dense_case(name, n, mode, dtype)
                if case is not None:
                    cases[f"torch_{mode}"] = case
        tick = None
        if progress is not None:
            done = iter(range(1, rounds + 1))
            tick = (lambda name=name, done=done: progress(name, next(done), rounds))
        times = interleaved(cases, rounds, progress=tick)
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


def _fmt(x: Any, spec: Any) -> Any:
    return "-" if x is None else format(x, spec)


def format_table(result: Any) -> str:
    """The human-readable table of :func:`measure_dense`'s result."""
    c = result["ceiling"]
    lines = [
        f"fastadapt bench: {result['n']:,} {result['dtype']} elements, medians of {result['rounds']} "
        f"interleaved rounds x 3 calls per optimizer; {describe_threads(result)}",
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastadapt bench`` (defaults are shown by the CLI's help formatter)."""
    parser.add_argument("--size", type=float, default="1e7", metavar="N",
                        help="elements of the parameter each step updates")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="element type of the parameter, gradient and state")
    parser.add_argument("--optimizers", nargs="+", type=str.lower, choices=list(OPTIMIZERS),
                        default=list(OPTIMIZERS), metavar="NAME",
                        help="optimizers to measure, any of: " + ", ".join(OPTIMIZERS))
    parser.add_argument("--rounds", metavar="N", type=int, default=10,
                        help="interleaved rounds per optimizer, 3 timed calls of each candidate per round")
    parser.add_argument("--threads", metavar="N", type=int, default=None,
                        help="threads for numba and torch (default: numba's default, NUMBA_NUM_THREADS)")
    parser.add_argument("--no-torch", action="store_true", help="do not compare with torch.optim")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (for machines)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress line on stderr (shown live on a terminal, "
                             "as one final line otherwise)")
    parser.add_argument("--passive-openmp", action="store_true",
                        help="set OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning)")


def passive_openmp() -> None:
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


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print the table (or JSON).  Returns the exit status; raises
    :class:`fastadapt.apps.cli.UsageError` on bad options."""
    from .cli import UsageError

    if args.passive_openmp:
        passive_openmp()
    n = int(args.size) if np.isfinite(args.size) else 0
    if n < 1:
        raise UsageError(f"--size must be a positive number of elements, got {args.size:g}")
    if args.rounds < 1:
        raise UsageError(f"--rounds must be positive, got {args.rounds}")
    if args.threads is not None:
        import numba

        max_threads: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
        if not 1 <= args.threads <= max_threads:
            raise UsageError(f"--threads must be in 1..{max_threads} (NUMBA_NUM_THREADS), "
                             f"got {args.threads}")
        numba.set_num_threads(args.threads)
        torch = _torch()
        if torch is not None:
            torch.set_num_threads(args.threads)
    names = list(dict.fromkeys(args.optimizers))             # in the order given, once each
    progress = Progress(len(names) * args.rounds, "fastadapt bench", "rounds", enabled=not args.no_progress)
    position = {name: j for j, name in enumerate(names, 1)}

    def on_round(name: str, done: Any, rounds: Any) -> None:
        progress.update(status=f"{name} round {done}/{rounds} (optimizer {position[name]}/{len(names)})")

    try:
        result = measure_dense(names, n, np.dtype(args.dtype), args.rounds,
                               use_torch=not args.no_torch, progress=on_round)
    finally:
        progress.close(f"fastadapt bench: {progress.done // args.rounds}/{len(names)} optimizers x "
                       f"{args.rounds} interleaved rounds, {time.perf_counter() - progress.start:.1f} s")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0
