"""Per-step fixed cost on small models: ``python bench/small_steps.py``.

What a step costs when the arrays are tiny, so that the time is Python-side checks, building the
per-step scalars and numba's dispatch, not memory traffic. Each row is the median of 7 blocks
(the first block of each case is discarded as a warm-up), microseconds per call, beside:

* the *floor*: a bare numba loop doing the same update on the same arrays, its scalars computed
  in Python (what a hand-written kernel with no checks at all costs per call);
* ``torch.optim`` (when torch is installed): ``Adam`` (default path) and ``fused=True``.

Rows (issue 12's targets in brackets):

1. ``Adam([w]).step([g])``, one 10-element float64 parameter [<= 3 us];
2. ``functional.adam(p, g, m, v, step=t)``, 10 elements [<= 2 us];
3. ``Adam`` over 100 parameters of 100 elements [<= 60 us, >= 8x torch fused];
4. ``SparseAdam`` with a ``RowGrad`` of 1,000 rows x 64 of a 1M-row float32 table [<= 25 us,
   >= 0.5 of a loop moving the same bytes].

``--json PATH`` writes the figures.  The script only uses the public API, so it also measures an
older checkout (``PYTHONPATH=/path/to/old python bench/small_steps.py``) for a before/after pair.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
from numba import njit, prange

import fastadapt as fa
from fastadapt import functional as F


@njit(cache=True, error_model="numpy")
def _adam_floor(p, g, m, v, b1, b2, neg_step, bc2_sqrt, eps):
    for i in range(p.size):
        mi = m[i] + (1 - b1) * (g[i] - m[i])
        vi = v[i] * b2 + (1 - b2) * g[i] * g[i]
        m[i] = mi
        v[i] = vi
        p[i] += neg_step * mi / (math.sqrt(vi) / bc2_sqrt + eps)


@njit(cache=True, error_model="numpy", parallel=True)
def _rows_floor(table, m, v, rows, vals, s):
    """Same bytes as a SparseAdam row step: read and write the rows of table, m, v; read vals."""
    ncols = table.shape[1]
    for t in prange(rows.size):
        r = rows[t]
        for c in range(ncols):
            g = vals[t, c]
            m[r, c] = m[r, c] * s + g
            v[r, c] = v[r, c] * s + g
            table[r, c] = table[r, c] * s + g


def timed(fn, calls):
    """Median microseconds per call over 7 blocks of ``calls`` calls (after one warm-up block)."""
    fn()
    blocks = []
    for _ in range(8):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        blocks.append((time.perf_counter() - t0) / calls * 1e6)
    return float(np.median(blocks[1:]))


def adam_scalars(t, lr=1e-3, b1=0.9, b2=0.999):
    return -lr / (1 - b1 ** t), (1 - b2 ** t) ** 0.5


def rows():
    out = []
    try:
        import torch
    except ImportError:                                   # pragma: no cover - torch is optional
        torch = None
    rng = np.random.default_rng(0)

    # 1. one 10-element parameter
    w, g = rng.standard_normal(10), rng.standard_normal(10)
    opt = fa.Adam([w])
    step = lambda: opt.step([g])                          # noqa: E731
    m, v, wf = np.zeros(10), np.zeros(10), w.copy()
    t = [0]

    def floor():
        t[0] += 1
        ns, bc = adam_scalars(t[0])
        _adam_floor(wf, g, m, v, 0.9, 0.999, ns, bc, 1e-8)
    row = {"case": "Adam.step, 1 x 10 float64", "fastadapt_us": timed(step, 2000), "floor_us": timed(floor, 2000)}
    if torch is not None:
        tw = torch.nn.Parameter(torch.from_numpy(w.copy()))
        tw.grad = torch.from_numpy(g.copy())
        topt = torch.optim.Adam([tw])
        row["torch_us"] = timed(topt.step, 500)
    out.append(row)

    # 2. the functional layer
    p, m2, v2 = w.copy(), np.zeros(10), np.zeros(10)
    k = [0]

    def functional():
        k[0] += 1
        F.adam(p, g, m2, v2, step=k[0])
    out.append({"case": "functional.adam, 10 float64", "fastadapt_us": timed(functional, 2000),
                "floor_us": row["floor_us"]})

    # 3. 100 parameters of 100 elements
    ps = [rng.standard_normal(100) for _ in range(100)]
    gs = [rng.standard_normal(100) for _ in range(100)]
    opt3 = fa.Adam(ps)
    row = {"case": "Adam.step, 100 x 100 float64", "fastadapt_us": timed(lambda: opt3.step(gs), 300)}
    ms, vs, pf = [np.zeros(100) for _ in ps], [np.zeros(100) for _ in ps], [q.copy() for q in ps]
    t3 = [0]

    def floor3():
        t3[0] += 1
        ns, bc = adam_scalars(t3[0])
        for a, b, c, d in zip(pf, gs, ms, vs):
            _adam_floor(a, b, c, d, 0.9, 0.999, ns, bc, 1e-8)
    row["floor_us"] = timed(floor3, 300)
    if torch is not None:
        tps = [torch.nn.Parameter(torch.from_numpy(q.copy())) for q in ps]
        for tp, gg in zip(tps, gs):
            tp.grad = torch.from_numpy(gg.copy())
        tf = torch.optim.Adam(tps, fused=True)
        row["torch_fused_us"] = timed(tf.step, 100)
    out.append(row)

    # 4. SparseAdam, 1,000 rows x 64 of a 1M-row float32 table
    table = np.zeros((1_000_000, 64), np.float32)
    ids = np.sort(rng.choice(1_000_000, 1000, replace=False)).astype(np.int64)
    vals = rng.standard_normal((1000, 64)).astype(np.float32)
    opt4 = fa.SparseAdam([table])
    grad = fa.RowGrad(ids, vals)
    mt, vt = np.zeros_like(table), np.zeros_like(table)
    out.append({"case": "SparseAdam RowGrad, 1000 x 64 of 1M rows", "fastadapt_us": timed(lambda: opt4.step([grad]), 300),
                "floor_us": timed(lambda: _rows_floor(table, mt, vt, ids, vals, np.float32(0.5)), 300)})
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Per-step fixed cost on small models (microseconds per call).")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    out = rows()
    print(f"{'microseconds per call (median of 7 blocks)':<44}{'fastadapt':>10}{'floor':>9}{'torch':>9}{'fused':>9}")
    for r in out:
        cell = lambda key: f"{r[key]:9.1f}" if key in r else f"{'-':>9}"  # noqa: E731
        print(f"{r['case']:<44}{r['fastadapt_us']:10.1f}{cell('floor_us')}{cell('torch_us')}{cell('torch_fused_us')}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
