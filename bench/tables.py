"""Embedding tables against FBGEMM's CPU table-batched embeddings: ``python bench/tables.py``.

The anchor is FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen`` on the CPU (one table,
``EmbeddingLocation.HOST``, ``ComputeDevice.CPU``, pooling SUM): its backward pass applies the
optimizer to the touched rows (the "fused" update), which is what fastadapt's sparse steps do.
Every comparison is timed in interleaved rounds (each round: every candidate runs one untimed
settling call and three timed ones, the order rotating by one per round, as
:func:`fastadapt.apps.benchmark.interleaved`); ratios are medians of per-round ratios, times medians
of all timed calls.  Sections:

1. A ``--rows`` x ``--dim`` float32 table (default 1M x 64), ``--densities`` of its rows touched
   (default 0.1 / 1 / 10 %; distinct rows, drawn at random), one lookup per bag:

   * FBGEMM ``EXACT_ROWWISE_ADAGRAD`` and ``EXACT_ADAGRAD``: the time of ``out.backward(grad_out)``
     alone -- the forward pass (``out = tbe(indices, offsets)``) runs before each timed call,
     outside the timed region; the lookups are the rows in a shuffled (batch) order;
   * fastadapt ``RowwiseAdagrad`` with a ``RowGrad`` (the same rows, sorted, with their gradient
     rows: the reduction from lookups to rows already done) and with a ``BagGrad`` of the very
     lookups, offsets and ``grad_out`` FBGEMM receives (the reduction inside the step); one
     optimizer (one state) serves both;
   * fastadapt ``Adagrad`` (per-element accumulator) with the ``RowGrad``, against
     ``EXACT_ADAGRAD``.

   Targets: ``RowwiseAdagrad`` (RowGrad and BagGrad) >= 8x FBGEMM rowwise at every density;
   ``Adagrad`` >= 5x FBGEMM ``EXACT_ADAGRAD``.
2. ``--bags`` bags of ``--bag-size`` ids (default 4096 x 20) drawn from a Zipf law (exponent
   ``--zipf``) over the table's rows, the hot rows scattered by a random permutation:
   ``RowwiseAdagrad`` with ``BagGrad(indices, offsets, grad_out)`` against "build the RowGrad in
   numpy, then step" (``np.unique(..., return_inverse=True)`` + ``np.add.at`` of each lookup's
   ``grad_out`` row, then ``RowGrad`` and ``step``), both timed whole; FBGEMM rowwise's backward on
   the same batch for reference.  Target: >= 3x.
3. ``RowwiseAdagrad``'s RowGrad step at the highest density against a bare numba loop doing the
   same rowwise update with no checks, parallel over rows (it reads a row, its gradient row and
   the row's accumulator, and writes the row and the accumulator: the bytes any implementation
   must move).  The figure is the loop's time over the step's.  Target: >= 0.8.

``--quick`` is a smoke run (20k rows, 256 bags, 2 rounds); ``--json PATH`` writes every figure;
``--threads`` sets numba's and torch's thread count (default: numba's).  The thread count and the
CPU model are printed.  What is not importable is skipped with a message: fbgemm_gpu or torch
(sections 1-2's anchors), fastadapt's ``RowwiseAdagrad`` / ``BagGrad`` (their rows).  Exit
status 0 (a measurement, not a test).  :func:`measure` and :func:`targets` are what
``bench/targets.py`` measures its tables section with.

FBGEMM is not in any extra of pyproject.toml: its CPU wheel pins a torch version, and pip would
replace the CPU torch.  Install it by hand, without its dependencies::

    pip install torch --index-url https://download.pytorch.org/whl/cpu
    pip install --no-deps fbgemm-gpu-cpu==1.8.0

FBGEMM's semantics, as tests/test_fbgemm.py checks them (fbgemm-gpu-cpu 1.8.0, float32 table):
the gradient of a row is the sum of ``grad_out`` over all its lookups in the batch (duplicates
summed before the update, which runs once per distinct row); ``EXACT_ROWWISE_ADAGRAD`` then does
``acc[r] += sum_j(g_j**2) / D; m = lr / (sqrt(acc[r]) + eps); w_j -= m * g_j`` in float32 (the
accumulator starts at 0); ``EXACT_ADAGRAD``: ``acc_j += g_j**2; w_j -= lr * g_j / (sqrt(acc_j) +
eps)``.  Weight decay (L2 / DECOUPLE) is only applied on FBGEMM's generic CPU path (shared
tables, non-float32 weights); the float32 single-table fast path, which this benchmark measures
(weight decay 0), passes ``weight_decay=0`` to its kernel and ignores it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np
from numba import njit, prange

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import fastadapt as fa  # noqa: E402
from fastadapt.apps import benchmark as B  # noqa: E402
from compressed_state import cpu_model  # noqa: E402

#: hyper-parameters of every optimizer here (FBGEMM and fastadapt alike)
LR, EPS = 1e-2, 1e-8

#: the targets' bars: (key of :func:`targets`' rows) -> bar
BARS = {"rowwise_rowgrad": 8.0, "rowwise_baggrad": 8.0, "adagrad": 5.0, "bags": 3.0, "floor": 0.8}


# =========================================================================== what is importable

def fbgemm_api():
    """``(namespace, None)`` with FBGEMM's TBE classes and enums, or ``(None, reason)`` when torch
    or fbgemm_gpu cannot be imported."""
    try:
        import torch
    except ImportError as e:
        return None, f"torch not importable ({e})"
    try:
        import fbgemm_gpu  # noqa: F401  (registers the operators)
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, EmbeddingLocation, OptimType, PoolingMode, SplitTableBatchedEmbeddingBagsCodegen,
            WeightDecayMode)
    except Exception as e:                          # ImportError, or a wheel built for another torch
        return None, f"fbgemm_gpu not usable ({type(e).__name__}: {str(e)[:120]})"
    ns = argparse.Namespace(torch=torch, TBE=SplitTableBatchedEmbeddingBagsCodegen, ComputeDevice=ComputeDevice,
                            EmbeddingLocation=EmbeddingLocation, OptimType=OptimType, PoolingMode=PoolingMode,
                            WeightDecayMode=WeightDecayMode)
    return ns, None


def fbgemm_version():
    """The installed FBGEMM distribution and version (``"fbgemm-gpu-cpu 1.8.0"``), or None."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:                              # pragma: no cover
        return None
    for dist in ("fbgemm-gpu-cpu", "fbgemm-gpu", "fbgemm-gpu-nightly-cpu", "fbgemm-gpu-nightly"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return None


def fastadapt_missing():
    """Names of the fastadapt API this benchmark uses that this fastadapt lacks."""
    return [name for name in ("RowwiseAdagrad", "BagGrad") if not hasattr(fa, name)]


def tbe(api, table, optimizer, lr=LR, eps=EPS, weight_decay=0.0, weight_decay_mode=None, features=1,
        pooling="sum"):
    """An FBGEMM CPU TBE holding a copy of ``table`` (float32, ``(rows, dim)``), optimizer
    ``optimizer`` (``"rowwise"``, ``"adagrad"`` or an ``OptimType``).

    ``features > 1`` makes that many features share the one table (``feature_table_map = [0] *
    features``): FBGEMM then takes its generic CPU path, the one that applies weight decay.
    """
    nrows, dim = table.shape
    opt = {"rowwise": api.OptimType.EXACT_ROWWISE_ADAGRAD, "adagrad": api.OptimType.EXACT_ADAGRAD}.get(
        optimizer, optimizer)
    kw = {}
    if weight_decay or weight_decay_mode is not None:
        kw.update(weight_decay=weight_decay,
                  weight_decay_mode=api.WeightDecayMode.NONE if weight_decay_mode is None else weight_decay_mode)
    module = api.TBE([(nrows, dim, api.EmbeddingLocation.HOST, api.ComputeDevice.CPU)],
                     feature_table_map=[0] * features, optimizer=opt, learning_rate=lr, eps=eps,
                     pooling_mode=api.PoolingMode.SUM if pooling == "sum" else api.PoolingMode.MEAN,
                     device="cpu", **kw)
    with api.torch.no_grad():
        module.split_embedding_weights()[0].copy_(api.torch.from_numpy(table))
    return module


def tbe_weights(module):
    """FBGEMM's table as a numpy array (a view of its storage)."""
    return module.split_embedding_weights()[0].detach().numpy()


def tbe_momentum(module):
    """FBGEMM's accumulator (one value per row for rowwise, the table's shape for EXACT_ADAGRAD)."""
    return module.split_optimizer_states()[0][0].detach().numpy()


# =========================================================================== timing

def interleaved(cases, rounds, warmup=2, block=3, settle=1):
    """:func:`fastadapt.apps.benchmark.interleaved` for cases that need untimed work before each
    call: ``cases`` maps a name to ``(setup, run)`` (``setup`` may be None); ``setup()`` runs
    before every call of ``run()``, outside the timed region.  Returns name -> list of the
    ``rounds * block`` timed seconds of ``run``."""
    names = list(cases)
    for name in names:
        setup, run = cases[name]
        for _ in range(warmup):
            if setup is not None:
                setup()
            run()
    times = {name: [] for name in names}
    clock = time.perf_counter
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            setup, run = cases[name]
            for _ in range(settle):
                if setup is not None:
                    setup()
                run()
            for _ in range(block):
                if setup is not None:
                    setup()
                t0 = clock()
                run()
                times[name].append(clock() - t0)
    return times


def backward_case(api, module, indices, offsets, grad_out):
    """``(setup, run)``: ``setup`` runs FBGEMM's forward pass, ``run`` its backward (the fused
    optimizer update) with ``grad_out``."""
    torch = api.torch
    idx, off, g = torch.from_numpy(indices), torch.from_numpy(offsets), torch.from_numpy(grad_out)
    held = {}

    def setup():
        held["out"] = module(idx, off)

    def run():
        held.pop("out").backward(g)
    return setup, run


def step_case(opt, grad):
    """``(None, run)``: one fastadapt step with a prepared gradient."""
    grads = [grad]
    return None, (lambda: opt.step(grads))


# =========================================================================== 1. densities

def density_case(nrows, dim, density, seed=0):
    """The rows (sorted), their gradient rows, and the same as FBGEMM lookups: indices in a
    shuffled order, offsets of bags of one, ``grad_out`` rows in that order."""
    rng = np.random.default_rng(seed)
    k = max(1, int(round(density * nrows)))
    rows = np.sort(rng.choice(nrows, size=k, replace=False)).astype(np.int64)
    values = rng.standard_normal((k, dim), dtype=np.float32)
    order = rng.permutation(k)
    indices = rows[order]
    grad_out = np.ascontiguousarray(values[order])
    offsets = np.arange(k + 1, dtype=np.int64)
    return rows, values, indices, offsets, grad_out


def base_table(nrows, dim, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((nrows, dim), dtype=np.float32) * np.float32(0.01)


def density_rows(nrows, dim, densities, rounds, notes):
    """Section 1: per density, ms per step of every candidate and the speed-ups."""
    api, why = fbgemm_api()
    if api is None:
        notes.append(f"section 1: FBGEMM columns skipped: {why}")
    missing = fastadapt_missing()
    if missing:
        notes.append(f"section 1: fastadapt lacks {', '.join(missing)}: those rows are skipped")
    base = base_table(nrows, dim)
    out = []
    for density in densities:
        rows, values, indices, offsets, grad_out = density_case(nrows, dim, density)
        cases = {}
        if api is not None:
            cases["fbgemm_rowwise"] = backward_case(api, tbe(api, base, "rowwise"), indices, offsets, grad_out)
            cases["fbgemm_adagrad"] = backward_case(api, tbe(api, base, "adagrad"), indices, offsets, grad_out)
        if hasattr(fa, "RowwiseAdagrad"):
            rw = fa.RowwiseAdagrad([base.copy()], lr=LR, eps=EPS)
            cases["fa_rowwise_rowgrad"] = step_case(rw, fa.RowGrad(rows, values))
            if hasattr(fa, "BagGrad"):
                cases["fa_rowwise_baggrad"] = step_case(rw, fa.BagGrad(indices, offsets, grad_out))
        cases["fa_adagrad"] = step_case(fa.Adagrad([base.copy()], lr=LR, eps=EPS), fa.RowGrad(rows, values))
        times = interleaved(cases, rounds)
        row = {"density": density, "rows_touched": int(rows.size), "rounds": rounds}
        for name, t in times.items():
            row[f"{name}_ms"] = float(np.median(t)) * 1e3
        for num, den, key in (("fbgemm_rowwise", "fa_rowwise_rowgrad", "x_rowwise_rowgrad"),
                              ("fbgemm_rowwise", "fa_rowwise_baggrad", "x_rowwise_baggrad"),
                              ("fbgemm_adagrad", "fa_adagrad", "x_adagrad")):
            if num in times and den in times:
                row[key] = B.ratio(times, num, den)
        out.append(row)
        del cases, times
        gc.collect()
    return out


# =========================================================================== 2. bags

def zipf_bags(nrows, n_bags, bag_size, exponent, dim, seed=2):
    """``n_bags`` bags of ``bag_size`` ids from a Zipf law over ``nrows`` rows (rank k drawn with
    probability proportional to ``k ** -exponent``, ranks mapped to rows by a random permutation),
    CSR offsets and a float32 ``grad_out`` of ``(n_bags, dim)``."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(np.arange(1, nrows + 1, dtype=np.float64) ** -exponent)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n_bags * bag_size), side="right"), nrows - 1)
    indices = rng.permutation(nrows)[ranks].astype(np.int64)
    offsets = np.arange(0, n_bags * bag_size + 1, bag_size, dtype=np.int64)
    grad_out = rng.standard_normal((n_bags, dim), dtype=np.float32)
    return indices, offsets, grad_out


def numpy_rowgrad(indices, offsets, grad_out):
    """The RowGrad of an embedding bag (pooling sum) built with numpy: the distinct rows, and for
    each the sum of ``grad_out`` over its lookups."""
    rows, inverse = np.unique(indices, return_inverse=True)
    bag = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    values = np.zeros((rows.size, grad_out.shape[1]), grad_out.dtype)
    np.add.at(values, inverse, grad_out[bag])
    return fa.RowGrad(rows, values)


def bag_row(nrows, dim, n_bags, bag_size, exponent, rounds, notes):
    """Section 2: BagGrad step vs numpy-built RowGrad + step (and FBGEMM rowwise's backward)."""
    missing = fastadapt_missing()
    if missing:
        notes.append(f"section 2 skipped: fastadapt lacks {', '.join(missing)}")
        return None
    indices, offsets, grad_out = zipf_bags(nrows, n_bags, bag_size, exponent, dim)
    base = base_table(nrows, dim)
    opt_bag = fa.RowwiseAdagrad([base.copy()], lr=LR, eps=EPS)
    opt_np = fa.RowwiseAdagrad([base.copy()], lr=LR, eps=EPS)
    cases = {"fa_baggrad": (None, lambda: opt_bag.step([fa.BagGrad(indices, offsets, grad_out)])),
             "numpy_rowgrad": (None, lambda: opt_np.step([numpy_rowgrad(indices, offsets, grad_out)]))}
    api, why = fbgemm_api()
    if api is not None:
        cases["fbgemm_rowwise"] = backward_case(api, tbe(api, base, "rowwise"), indices, offsets, grad_out)
    else:
        notes.append(f"section 2: FBGEMM row skipped: {why}")
    times = interleaved(cases, rounds)
    row = {"bags": n_bags, "bag_size": bag_size, "zipf": exponent, "distinct_rows": int(np.unique(indices).size),
           "rounds": rounds, **{f"{k}_ms": float(np.median(v)) * 1e3 for k, v in times.items()},
           "x_baggrad_vs_numpy": B.ratio(times, "numpy_rowgrad", "fa_baggrad")}
    if "fbgemm_rowwise" in times:
        row["x_baggrad_vs_fbgemm"] = B.ratio(times, "fbgemm_rowwise", "fa_baggrad")
    return row


# =========================================================================== 3. floor

@njit(cache=True, error_model="numpy", parallel=True, fastmath=False)
def rowwise_floor(table, acc, rows, vals, lr, eps):
    """The rowwise Adagrad update with no checks, parallel over rows: reads ``table[r]``,
    ``vals[t]`` and ``acc[r]``, writes ``table[r]`` and ``acc[r]``."""
    dim = table.shape[1]
    for t in prange(rows.size):
        r = rows[t]
        s = np.float32(0.0)
        for j in range(dim):
            g = vals[t, j]
            s += g * g
        a = acc[r] + s / np.float32(dim)
        acc[r] = a
        m = lr / (np.sqrt(a) + eps)
        for j in range(dim):
            table[r, j] -= m * vals[t, j]


def floor_row(nrows, dim, density, rounds, notes):
    """Section 3: the floor loop's time over RowwiseAdagrad's RowGrad step (same rows, same table
    size), in interleaved rounds."""
    if not hasattr(fa, "RowwiseAdagrad"):
        notes.append("section 3 skipped: fastadapt lacks RowwiseAdagrad")
        return None
    rows, values, _, _, _ = density_case(nrows, dim, density)
    base = base_table(nrows, dim)
    opt = fa.RowwiseAdagrad([base.copy()], lr=LR, eps=EPS)
    table, acc = base.copy(), np.zeros(nrows, np.float32)
    lr, eps = np.float32(LR), np.float32(EPS)
    cases = {"fa_rowwise_rowgrad": step_case(opt, fa.RowGrad(rows, values)),
             "floor": (None, lambda: rowwise_floor(table, acc, rows, values, lr, eps))}
    times = interleaved(cases, rounds)
    moved = rows.size * (2 * dim * 4 + dim * 4 + 2 * 4 + 8)      # row r+w, grad row, acc r+w, row id
    floor_s = float(np.median(times["floor"]))
    return {"density": density, "rows_touched": int(rows.size), "rounds": rounds,
            "fa_rowwise_rowgrad_ms": float(np.median(times["fa_rowwise_rowgrad"])) * 1e3,
            "floor_ms": floor_s * 1e3, "floor_gbps": moved / floor_s / 1e9,
            "of_floor": B.ratio(times, "floor", "fa_rowwise_rowgrad")}


# =========================================================================== all of it

def measure(nrows=1_000_000, dim=64, densities=(0.001, 0.01, 0.1), rounds=10, n_bags=4096, bag_size=20,
            exponent=1.1):
    """Sections 1-3; returns a dict (``densities``, ``bags``, ``floor``, ``notes``, ...)."""
    notes = []
    dens = density_rows(nrows, dim, densities, rounds, notes)
    bags = bag_row(nrows, dim, n_bags, bag_size, exponent, rounds, notes)
    floor = floor_row(nrows, dim, max(densities), rounds, notes)
    return {"nrows": nrows, "dim": dim, "rounds": rounds, "densities": dens, "bags": bags, "floor": floor,
            "notes": notes}


def targets(result):
    """``(label, measured, bar)`` for every target this result measured, and a list of the
    targets it could not measure (with why: see ``result["notes"]``)."""
    out, missing = [], []
    rows = f"{result['nrows']:.0e} x {result['dim']}"
    for key, what in (("rowwise_rowgrad", "RowwiseAdagrad RowGrad"), ("rowwise_baggrad", "RowwiseAdagrad BagGrad"),
                      ("adagrad", "Adagrad RowGrad")):
        anchor = "FBGEMM EXACT_ADAGRAD" if key == "adagrad" else "FBGEMM rowwise"
        for r in result["densities"]:
            label = f"tables: {what} >= {BARS[key]:g}x {anchor} ({r['density'] * 100:g} %)"
            if r.get(f"x_{key}") is not None:
                out.append((label, r[f"x_{key}"], BARS[key]))
            else:
                missing.append(label)
    b = result["bags"]
    label = f"tables: BagGrad >= {BARS['bags']:g}x numpy RowGrad + step (Zipf bags)"
    if b:
        out.append((label, b["x_baggrad_vs_numpy"], BARS["bags"]))
    else:
        missing.append(label)
    f = result["floor"]
    label = f"tables: RowwiseAdagrad >= {BARS['floor']:g} of the same-bytes loop ({rows})"
    if f:
        out.append((label, f["of_floor"], BARS["floor"]))
    else:
        missing.append(label)
    return out, missing


def _f(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_report(result):
    """The three sections' tables (also printed by bench/targets.py)."""
    nrows, dim = result["nrows"], result["dim"]
    dens = result["densities"]
    print(f"   1. {nrows:,} x {dim} float32 table, bags of one lookup: ms per step (FBGEMM: backward with the "
          "fused update, forward untimed)")
    cols = [("fbgemm_rowwise", "FBGEMM rowwise"), ("fa_rowwise_rowgrad", "RowwiseAdagrad RowGrad"),
            ("fa_rowwise_baggrad", "RowwiseAdagrad BagGrad"), ("fbgemm_adagrad", "FBGEMM EXACT_ADAGRAD"),
            ("fa_adagrad", "Adagrad RowGrad")]
    heads = [f"{r['density'] * 100:g} % rows" for r in dens]
    print(f"   {'':<26}" + "".join(f"{h:>13}" for h in heads))
    for key, label in cols:
        print(f"   {label:<26}" + "".join(f"{_f(r.get(f'{key}_ms'), '.3f'):>13}" for r in dens))
    for key, label in (("x_rowwise_rowgrad", "x RowGrad vs rowwise"), ("x_rowwise_baggrad", "x BagGrad vs rowwise"),
                       ("x_adagrad", "x Adagrad vs EXACT_ADAGRAD")):
        print(f"   {label:<26}" + "".join(f"{_f(r.get(key), '.1f'):>13}" for r in dens))
    print("   x: FBGEMM's time / fastadapt's, median of per-round ratios")
    b = result["bags"]
    if b:
        print(f"\n   2. {b['bags']:,} bags of {b['bag_size']} Zipf({b['zipf']:g}) ids ({b['distinct_rows']:,} distinct "
              f"rows), RowwiseAdagrad: BagGrad step {b['fa_baggrad_ms']:.3f} ms, numpy RowGrad + step "
              f"{b['numpy_rowgrad_ms']:.3f} ms, x {b['x_baggrad_vs_numpy']:.1f}"
              + (f"; FBGEMM rowwise backward {b['fbgemm_rowwise_ms']:.3f} ms (x {b['x_baggrad_vs_fbgemm']:.1f})"
                 if "fbgemm_rowwise_ms" in b else ""))
    f = result["floor"]
    if f:
        print(f"\n   3. RowwiseAdagrad RowGrad step, {f['density'] * 100:g} % rows: "
              f"{f['fa_rowwise_rowgrad_ms']:.3f} ms; "
              f"same-bytes numba loop {f['floor_ms']:.3f} ms ({f['floor_gbps']:.1f} GB/s); "
              f"loop / step {f['of_floor']:.2f}")
    for note in result["notes"]:
        print(f"   note: {note}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the table")
    parser.add_argument("--dim", type=int, default=64, help="columns of the table")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.001, 0.01, 0.1],
                        help="fractions of the rows touched (section 1)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--bags", type=int, default=4096, help="bags of section 2")
    parser.add_argument("--bag-size", type=int, default=20, help="ids per bag in section 2")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of section 2's ids")
    parser.add_argument("--threads", type=int, default=None, help="numba and torch threads (default: numba's)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20k rows, 256 bags, 2 rounds")
    parser.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.bags, args.rounds = 20_000, 256, min(args.rounds, 2)

    import numba
    if args.threads:
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    api, why = fbgemm_api()
    if api is not None:
        api.torch.set_num_threads(numba.get_num_threads())
    t0 = time.perf_counter()
    result = measure(args.rows, args.dim, args.densities, args.rounds, args.bags, args.bag_size, args.zipf)
    info = B.threads_info()
    result.update(cpu=cpu_model(), info=info, fbgemm=fbgemm_version() if api is not None else None,
                  seconds=time.perf_counter() - t0)
    print("python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))))
    print(f"({result['cpu']}; {B.describe_threads(info)}; FBGEMM {result['fbgemm'] or 'not usable'}; "
          f"medians of {args.rounds} interleaved rounds; {result['seconds']:.0f} s)\n")
    if api is None:
        print(f"(FBGEMM anchors skipped: {why}; see this script's docstring for the install lines)\n")
    print_report(result)
    rows, missing = targets(result)
    print(f"\n{'target':<66}{'measured':>10}  result")
    for label, value, bar in rows:
        print(f"{label:<66}{value:>10.2f}  {'MET' if value >= bar else 'MISSED'}")
    for label in missing:
        print(f"{label:<66}{'-':>10}  not measured")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(result, argv=sys.argv if argv is None else list(argv),
                           targets=[dict(label=lbl, measured=v, bar=b, met=v >= b) for lbl, v, b in rows],
                           not_measured=missing), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
