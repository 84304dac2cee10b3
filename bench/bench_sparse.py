"""Sparse-gradient steps on an embedding table: fastadapt (CSR, RowGrad, lazy/exact, dense) vs torch.

Run ``python bench/bench_sparse.py`` (``--rows 1000000 --dim 64 --densities 0.001 0.01 0.1``
are the defaults; ``--quick`` for a 100k-row table).  Every figure is the best (minimum) wall time of
one ``step()`` -- validation and canonicalisation included -- on a table whose optimizer state
already exists, with ``--threads`` threads for numba and torch alike; all ratios come from the
same run.

What is compared, at each density (fraction of the table's rows touched):

* fastadapt ``SparseAdam`` and ``Adagrad`` with a scipy CSR gradient (canonical, int32 indices)
  and with a ``RowGrad`` (unique sorted rows: the zero-copy fast path);
* ``RMSprop`` lazy vs ``sparse_mode="exact"`` (closed-form decay catch-up) with a RowGrad, with
  the same rows at every step and cycling through 4 row sets (rows then have decay to catch up);
* torch ``SparseAdam`` / ``Adagrad`` with sparse COO gradients in the two forms torch knows:
  one (row, col) index per element -- what a CSR gradient is -- and hybrid COO (one row index
  per row of 64 values: ``nn.Embedding(sparse=True)``'s form, torch's fast path); both built
  coalesced so that torch does no sorting;
* fastadapt's dense ``Adam`` step on the whole table (what a dense gradient costs);
* the same gradient on a table 10x smaller: a RowGrad step costs the same, a CSR step differs
  by its O(rows) ``indptr`` scan.

:func:`make_case` builds the inputs and is meant to be imported by other benchmark suites.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastadapt as fa  # noqa: E402


class Case:
    """Inputs of one benchmark case (see :func:`make_case`).

    Attributes
    ----------
    nrows, ncols : int
        The table.
    dtype : numpy dtype
    rows : ndarray of int64, shape (k,)
        The touched rows, unique and sorted.
    values : ndarray, shape (k, ncols)
        Their gradient rows.
    csr : scipy.sparse.csr_matrix
        The same gradient as a canonical CSR of the table's shape (int32 indices).
    row_grad : fastadapt.RowGrad
        The same gradient as a RowGrad.
    """

    def __init__(self, nrows, ncols, dtype, rows, values):
        import scipy.sparse as sp

        self.nrows, self.ncols, self.dtype = nrows, ncols, np.dtype(dtype)
        self.rows, self.values = rows, values
        indptr = np.zeros(nrows + 1, np.int32)
        counts = np.zeros(nrows, np.int32)
        counts[rows] = ncols
        np.cumsum(counts, out=indptr[1:])
        cols = np.tile(np.arange(ncols, dtype=np.int32), rows.size)
        self.csr = sp.csr_matrix((values.reshape(-1), cols, indptr), shape=(nrows, ncols))
        self.row_grad = fa.RowGrad(rows, values)

    @property
    def nnz(self):
        return self.values.size

    def table(self, seed=1):
        """A fresh parameter table (small random values)."""
        rng = np.random.default_rng(seed)
        return (rng.standard_normal((self.nrows, self.ncols), dtype=np.float32) * 0.01).astype(self.dtype)

    def torch_grads(self):
        """(element COO, hybrid COO) torch gradients of the same values, both coalesced."""
        import torch

        v = torch.from_numpy(self.values)
        r = torch.from_numpy(self.rows)
        hybrid = torch.sparse_coo_tensor(r[None], v, (self.nrows, self.ncols), is_coalesced=True)
        idx = torch.stack([r.repeat_interleave(self.ncols), torch.arange(self.ncols).repeat(self.rows.size)])
        element = torch.sparse_coo_tensor(idx, v.reshape(-1), (self.nrows, self.ncols), is_coalesced=True)
        return element, hybrid


def make_case(density, nrows=1_000_000, ncols=64, dtype=np.float32, seed=0):
    """A gradient touching ``density * nrows`` distinct rows of an ``(nrows, ncols)`` table.

    Parameters
    ----------
    density : float
        Fraction of the rows touched (0.001 = 0.1 %).
    nrows, ncols : int
    dtype : numpy dtype
    seed : int

    Returns
    -------
    Case
    """
    rng = np.random.default_rng(seed)
    k = max(1, int(round(density * nrows)))
    rows = np.sort(rng.choice(nrows, size=k, replace=False)).astype(np.int64)
    values = rng.standard_normal((k, ncols), dtype=np.float32).astype(dtype)
    return Case(nrows, ncols, dtype, rows, values)


def timeit(fn, repeat, min_time=0.2):
    """Best (minimum) seconds of ``fn()`` over at least ``repeat`` calls (and ``min_time`` seconds):
    the least disturbed run, as the ``timeit`` module recommends."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return float(np.min(times))


def fastadapt_timers(case, table, others=()):
    """name -> callable running one fastadapt step on ``table`` (state created by the warm-up).

    One optimizer per algorithm serves both gradient formats (the state is the same).
    ``others``: more cases of the same table; the "(k row sets)" RMSprop rows cycle
    through ``case`` and them, so that exact mode has untouched rows to catch up.
    """
    def stepper(opt, g):
        return lambda: opt.step([g])

    def cycler(opt, gs):
        state = [0]

        def run():
            opt.step([gs[state[0] % len(gs)]])
            state[0] += 1
        return run

    sparse_adam, adagrad = fa.SparseAdam([table]), fa.Adagrad([table])
    rms_lazy, rms_exact = fa.RMSprop([table]), fa.RMSprop([table], sparse_mode="exact")
    out = {
        "SparseAdam CSR": stepper(sparse_adam, case.csr),
        "SparseAdam RowGrad": stepper(sparse_adam, case.row_grad),
        "Adagrad CSR": stepper(adagrad, case.csr),
        "Adagrad RowGrad": stepper(adagrad, case.row_grad),
        "RMSprop RowGrad lazy": stepper(rms_lazy, case.row_grad),
        "RMSprop RowGrad exact": stepper(rms_exact, case.row_grad),
        "RMSprop CSR exact": stepper(rms_exact, case.csr),
    }
    if others:
        gs = [case.row_grad] + [c.row_grad for c in others]
        out[f"RMSprop RowGrad lazy ({len(gs)} row sets)"] = cycler(rms_lazy, gs)
        out[f"RMSprop RowGrad exact ({len(gs)} row sets)"] = cycler(rms_exact, gs)
    return out


def torch_timers(case):
    """name -> callable running one torch step (SparseAdam / Adagrad, element and hybrid COO)."""
    import torch

    element, hybrid = case.torch_grads()
    p = torch.nn.Parameter(torch.from_numpy(case.table(2)))
    out = {}
    for name, opt in (("SparseAdam", torch.optim.SparseAdam([p], lr=1e-3)),
                      ("Adagrad", torch.optim.Adagrad([p], lr=1e-2))):
        for form, g in (("element COO", element), ("hybrid COO", hybrid)):
            def run(opt=opt, g=g):
                p.grad = g
                opt.step()
            out[f"torch {name} {form}"] = run
    return out


def table_scaling(nrows_list, k, ncols, dtype, repeat):
    """The same k-row gradient (ids below min(nrows_list)) on tables of several sizes."""
    out = {}
    small = min(nrows_list)
    rng = np.random.default_rng(5)
    rows = np.sort(rng.choice(small, size=k, replace=False)).astype(np.int64)
    values = rng.standard_normal((k, ncols), dtype=np.float32).astype(dtype)
    for nrows in nrows_list:
        case = Case(nrows, ncols, dtype, rows, values)
        table = np.zeros((nrows, ncols), dtype)
        opt = fa.SparseAdam([table])
        out[nrows] = (timeit(lambda: opt.step([case.row_grad]), repeat),
                      timeit(lambda: opt.step([case.csr]), repeat))
        del opt, table
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    parser.add_argument("--threads", type=int, default=None, help="default: numba's thread count")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="100k-row table, densities 0.1 %% and 1 %%")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-scaling", action="store_true", help="skip the table-size comparison")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.densities, args.repeat = 100_000, [0.001, 0.01], 10

    import numba
    if args.threads:
        numba.set_num_threads(args.threads)
    threads = numba.get_num_threads()
    torch = None
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(threads)
        except ImportError:
            print("(torch not installed: its columns are skipped)")

    dtype = np.float32
    print(f"table {args.rows:,} x {args.dim} float32 ({args.rows * args.dim * 4 / 2**20:.0f} MiB), "
          f"{threads} threads, numba {numba.__version__}"
          + (f", torch {torch.__version__}" if torch else ""))
    table = make_case(args.densities[0], args.rows, args.dim, dtype).table()
    results = {}
    for density in args.densities:
        case = make_case(density, args.rows, args.dim, dtype)
        others = [make_case(density, args.rows, args.dim, dtype, seed=s) for s in (1, 2, 3)]
        col = {}
        for name, fn in fastadapt_timers(case, table, others).items():
            col[name] = timeit(fn, args.repeat)
        if torch is not None:
            for name, fn in torch_timers(case).items():
                col[name] = timeit(fn, max(3, args.repeat // 4))
        results[density] = col
        del case, others
    dense_grad = np.zeros_like(table)
    dense_opt = fa.Adam([table])
    dense = timeit(lambda: dense_opt.step([dense_grad]), max(3, args.repeat // 4))
    del dense_opt, dense_grad

    dens = list(results)
    names = list(results[dens[0]])
    width = max(len(n) for n in names) + 2
    print()
    print(f"{'ms per step':<{width}}" + "".join(f"{f'{d * 100:g} % rows':>14}" for d in dens))
    for n in names:
        print(f"{n:<{width}}" + "".join(f"{results[d][n] * 1e3:14.3f}" for d in dens))
    print(f"{'fastadapt Adam, dense step':<{width}}" + f"{dense * 1e3:14.3f}" * len(dens))
    print(f"{'(nnz)':<{width}}" + "".join(f"{int(round(d * args.rows)) * args.dim:14,d}" for d in dens))
    wide = width + 14
    if torch is not None:
        print()
        print("speed-up = torch time / fastadapt time")
        ratios = [
            ("SparseAdam CSR vs torch element COO", "torch SparseAdam element COO", "SparseAdam CSR"),
            ("SparseAdam CSR vs torch hybrid COO", "torch SparseAdam hybrid COO", "SparseAdam CSR"),
            ("SparseAdam RowGrad vs torch element COO", "torch SparseAdam element COO", "SparseAdam RowGrad"),
            ("SparseAdam RowGrad vs torch hybrid COO", "torch SparseAdam hybrid COO", "SparseAdam RowGrad"),
            ("Adagrad CSR vs torch element COO", "torch Adagrad element COO", "Adagrad CSR"),
            ("Adagrad RowGrad vs torch hybrid COO", "torch Adagrad hybrid COO", "Adagrad RowGrad"),
        ]
        for label, num, den in ratios:
            print(f"{label:<{wide}}" + "".join(f"{results[d][num] / results[d][den]:13.1f}x" for d in dens))
    print()
    print(f"{'RMSprop exact / lazy (same rows each step)':<{wide}}"
          + "".join(f"{results[d]['RMSprop RowGrad exact'] / results[d]['RMSprop RowGrad lazy']:13.2f}x"
                    for d in dens))
    lazy_c = [n for n in names if n.startswith("RMSprop RowGrad lazy (")]
    exact_c = [n for n in names if n.startswith("RMSprop RowGrad exact (")]
    if lazy_c and exact_c:
        print(f"{'RMSprop exact / lazy (rows change each step)':<{wide}}"
              + "".join(f"{results[d][exact_c[0]] / results[d][lazy_c[0]]:13.2f}x" for d in dens))
    print(f"{'dense Adam step / SparseAdam RowGrad step':<{wide}}"
          + "".join(f"{dense / results[d]['SparseAdam RowGrad']:13.1f}x" for d in dens))

    if not args.no_scaling:
        sizes = sorted({max(1, args.rows // 10), args.rows})
        k = max(1, int(round(min(args.densities) * args.rows)))
        scaling = table_scaling(sizes, k, args.dim, dtype, args.repeat)
        print()
        print(f"the same {k:,}-row gradient on tables of different sizes (SparseAdam, ms per step):")
        print(f"{'table rows':>12}{'RowGrad':>12}{'CSR':>12}")
        for nrows, (t_rows, t_csr) in scaling.items():
            print(f"{nrows:>12,}{t_rows * 1e3:12.3f}{t_csr * 1e3:12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
