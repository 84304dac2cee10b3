#!/usr/bin/env python3
"""GPU check of fastadapt's CUDA path: correctness against the CPU path, then speed.

Run on a machine with one NVIDIA GPU (``pip install -e ".[cuda]"``; torch with CUDA and CuPy
are optional and add rows)::

    python bench/gpu_check.py                  # sized for < 3 minutes on one GPU (not yet timed on one)
    python bench/gpu_check.py --json out.json  # the same, figures also written as JSON
    NUMBA_ENABLE_CUDASIM=1 python bench/gpu_check.py --smoke   # dry run on numba's simulator, no GPU

1. Correctness, on 1M elements: every optimizer and option; dense gradients in float32 and
   float64, device CSR and device row gradients in float32 (float64: a subset covering every
   loop); against the CPU path of fastadapt (the kernels the unit tests check against torch),
   run with its serial loops only (same results as the parallel ones, half the cold compile
   time, and cached on disk by a unit-test run); also a CuPy array and torch CUDA tensors
   (optimizer, functional layer, exact-mode RowGrad) when those libraries are present.  The
   time of the CPU reference is reported.  Pass: for every element
   ``|gpu - cpu| <= rtol * (|cpu| + rms(cpu))`` with the spec's rtol (docs/spec.rst) (1e-5 float32, 1e-12
   float64) -- the ``rms`` term admits the rounding of FMA contraction near zero.
2. Dense speed, float32 on ``--dense-n`` (default 2**28 = 268M) elements: Adam, Adagrad and
   RMSprop steps against a device-to-device copy measured in the same run (bandwidth = bytes
   read + written per second) and against torch ``Adam(fused=True)`` (Adagrad and RMSprop:
   torch ``foreach=True``, torch has no fused CUDA kernel for them).  Targets: >= 85 % of the
   copy bandwidth, >= 1.0x torch fused Adam.
3. Sparse speed: a 10M x 64 float32 table, 1 % of the rows per step (unique, sorted), as a
   device RowGrad and as a device CSR, against torch ``SparseAdam`` with a CUDA sparse
   gradient.  fastadapt's time includes its index validation (one host synchronisation).

Prints one table; exits 1 when a correctness check fails (speed targets are reported, not
enforced, unless ``--strict``), 3 when no GPU is usable.
"""

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastadapt as fa  # noqa: E402

RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
ROWS = []          # (section, name, value, target, ok)
FAILED = []


def row(section, name, value, target="", ok=None):
    ROWS.append({"section": section, "name": name, "value": value, "target": target, "ok": ok})
    mark = "" if ok is None else ("PASS" if ok else ("FAIL" if section == "correctness" else "MISS"))
    print(f"  {section:<12} {name:<60} {value:>24} {target:>12} {mark}", flush=True)
    if ok is False and section == "correctness":
        FAILED.append(name)


def close(actual, expected):
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    rtol = RTOL[expected.dtype]
    scale = np.abs(expected.astype(np.float64))
    rms = float(np.sqrt(np.mean(scale ** 2))) if scale.size else 0.0
    err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = float(np.max(err / (rtol * (scale + rms)))) if err.size else 0.0
    same_nan = np.array_equal(np.isnan(actual), np.isnan(expected))
    return ratio <= 1.0 and same_nan, ratio


# =========================================================================== correctness

DENSE_CASES = [
    ("Adagrad", {}),
    ("Adagrad", dict(lr=0.05, lr_decay=0.1, weight_decay=0.01, initial_accumulator_value=0.3, maximize=True)),
    ("RMSprop", {}),
    ("RMSprop", dict(centered=True, momentum=0.5, weight_decay=0.02, alpha=0.9, maximize=True)),
    ("RMSprop", dict(momentum=0.9)),
    ("Adam", {}),
    ("Adam", dict(lr=0.01, betas=(0.3, 0.9), weight_decay=0.05, amsgrad=True, maximize=True)),
    ("AdamW", {}),
    ("AdamW", dict(weight_decay=0.3, amsgrad=True)),
]

SPARSE_CASES = [
    ("SparseAdam", {}),
    ("Adagrad", {}),
    ("Adagrad", dict(sparse_mode="exact", weight_decay=0.1)),
    ("Adam", {}),
    ("Adam", dict(sparse_mode="exact", amsgrad=True)),
    ("AdamW", dict(sparse_mode="exact")),
    ("RMSprop", dict(centered=True, momentum=0.5)),
    ("RMSprop", dict(sparse_mode="exact")),
    ("RMSprop", dict(sparse_mode="exact", centered=True)),
]


SPARSE_F64 = [("SparseAdam", {}), ("Adam", dict(sparse_mode="exact", amsgrad=True)),
              ("RMSprop", dict(sparse_mode="exact", centered=True))]


def _label(name, kw, dtype=None, form=None):
    opts = ",".join(f"{k}={v}" for k, v in kw.items())
    s = name + (f"({opts})" if opts else "")
    if form:
        s += f" {form}"
    if dtype is not None:
        s += f" {np.dtype(dtype).name}"
    return s[:60]


REF_SECONDS = [0.0]      # time spent in the CPU reference (numba compile included)


def cpu_reference(cls, kw, p0, grads):
    """The CPU path's parameter and state after stepping ``grads`` from ``p0``.

    Runs the serial CPU loops only (``PARALLEL_THRESHOLD`` raised for the call): they give
    the same results as the parallel ones (every rule is per element), they are the
    specialisations the unit tests compile (cached on disk after a test run), and a cold
    compile of them takes about half as long as of the parallel loops.
    """
    from fastadapt import config
    t = time.perf_counter()
    saved = config.PARALLEL_THRESHOLD
    config.PARALLEL_THRESHOLD = 1 << 62
    try:
        ph = p0.copy()
        opt = cls([ph], **kw)
        for g in grads:
            opt.step([g])
        return ph, opt.state_dict()["state"][0]
    finally:
        config.PARALLEL_THRESHOLD = saved
        REF_SECONDS[0] += time.perf_counter() - t


def compare(label, pd, od, ph, sh, steps, ok=True):
    """One correctness row: device parameter ``pd`` and optimizer ``od`` against the CPU's."""
    ok_p, ratio = close(pd.copy_to_host(), ph)
    sd = od.state_dict()["state"][0]
    ok = ok and ok_p and sd["step"] == sh["step"] == steps
    for key in sh:
        if key != "step":
            ok_s, r_s = close(sd[key], sh[key])
            ok, ratio = ok and ok_s, max(ratio, r_s)
    row("correctness", label, f"err/tol {ratio:.3g}", "<= 1", ok)


def check_dense(cuda, n, steps):
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        p0 = rng.standard_normal(n).astype(dtype)
        grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-2, 1)).astype(dtype) for _ in range(steps)]
        gd = [cuda.to_device(g) for g in grads]
        for name, kw in DENSE_CASES:
            cls = getattr(fa, name)
            ph, sh = cpu_reference(cls, kw, p0, grads)
            pd = cuda.to_device(p0)
            od = cls([pd], **kw)
            for g_dev in gd:
                od.step([g_dev])
            compare(_label(name, kw, dtype, "dense"), pd, od, ph, sh, steps)


def _sparse_problem(rng, shape, steps, frac, dtype):
    import scipy.sparse as sp
    out = []
    for t in range(steps):
        k = max(1, int(shape[0] * frac))
        rows = np.sort(rng.choice(shape[0] - 1, size=k, replace=False))        # last row never touched
        vals = rng.standard_normal((k, shape[1])).astype(dtype)
        vals[:, ::7] = 0.0                                                     # explicit zeros kept
        mask = rng.random((k, shape[1])) < 0.5
        mask[:, 0] = True
        r, c = np.nonzero(mask)
        csr = sp.csr_matrix((vals[r, c], (rows[r], c)), shape=shape)
        out.append((rows, vals, csr))
    return out


def check_sparse(cuda, n, steps):
    rng = np.random.default_rng(1)
    shape = (n // 64, 64)
    for dtype in (np.float32, np.float64):
        p0 = rng.standard_normal(shape).astype(dtype)
        problem = _sparse_problem(rng, shape, steps, 0.05, dtype)
        dev = [(cuda.to_device(rows.astype(np.int64)), cuda.to_device(vals),
                fa.DeviceCSR((cuda.to_device(csr.data), cuda.to_device(csr.indices), cuda.to_device(csr.indptr)),
                          shape)) for rows, vals, csr in problem]
        for name, kw in SPARSE_CASES:
            if dtype == np.float64 and (name, kw) not in SPARSE_F64:
                continue                      # float64: a subset that covers every loop, to stay < 3 min
            cls = getattr(fa, name)
            for form in ("rows", "csr"):
                host_grads = [fa.RowGrad(rows, vals) if form == "rows" else csr for rows, vals, csr in problem]
                ph, sh = cpu_reference(cls, kw, p0, host_grads)
                pd = cuda.to_device(p0)
                od = cls([pd], **kw)
                for rows_d, vals_d, csr_d in dev:
                    od.step([fa.RowGrad(rows_d, vals_d) if form == "rows" else csr_d])
                untouched = (kw.get("sparse_mode", "lazy") != "lazy"
                             or np.array_equal(pd.copy_to_host()[-1], p0[-1]))     # lazy: last row as it was
                compare(_label(name, kw, dtype, form), pd, od, ph, sh, steps, untouched)


def _guarded(label, fn):
    """One correctness row from ``fn() -> (ok, ratio)``; an exception is a failure, printed whole."""
    try:
        ok, ratio = fn()
        row("correctness", label, f"err/tol {ratio:.3g}", "<= 1", ok)
    except Exception as exc:
        print(f"  {label}: {type(exc).__name__}: {exc}", flush=True)
        row("correctness", label, f"{type(exc).__name__}"[:24], "", False)


def check_foreign(n):
    """CuPy arrays and torch CUDA tensors as parameters (zero-copy, in place), the functional
    layer and a row gradient on torch tensors."""
    from fastadapt import functional as F
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    kw = dict(amsgrad=True, weight_decay=0.1)
    ph, _ = cpu_reference(fa.Adam, kw, p0, grads)
    try:
        import cupy
    except Exception:
        cupy = None
    if cupy is not None:
        def run_cupy():
            pc = cupy.asarray(p0)
            oc = fa.Adam([pc], **kw)
            for g in grads:
                oc.step([cupy.asarray(g)])
            return close(cupy.asnumpy(pc), ph)
        _guarded("Adam on a CuPy array float32", run_cupy)
    torch = _torch()
    if torch is None:
        return

    def run_torch():
        pt = torch.tensor(p0, device="cuda")
        ot = fa.Adam([pt], **kw)
        for g in grads:
            ot.step([torch.tensor(g, device="cuda")])
        return close(pt.cpu().numpy(), ph)

    def run_functional():                     # the functional layer reads dtypes through the backend
        pt = torch.tensor(p0, device="cuda")
        m, v, vmax = (torch.zeros_like(pt) for _ in range(3))
        for t, g in enumerate(grads, 1):
            F.adam(pt, torch.tensor(g, device="cuda"), m, v, vmax, step=t, **kw)
        return close(pt.cpu().numpy(), ph)

    def run_rows():                           # RowGrad of torch tensors, exact decay (stamps on the device)
        shape = (n // 64, 64)
        rk = dict(sparse_mode="exact", centered=True)
        problem = _sparse_problem(np.random.default_rng(5), shape, 3, 0.05, np.float32)
        e0 = rng.standard_normal(shape).astype(np.float32)
        eh, _ = cpu_reference(fa.RMSprop, rk, e0, [fa.RowGrad(r, v) for r, v, _ in problem])
        et = torch.tensor(e0, device="cuda")
        opt = fa.RMSprop([et], **rk)
        for r, v, _ in problem:
            opt.step([fa.RowGrad(torch.tensor(r, device="cuda"), torch.tensor(v, device="cuda"))])
        opt.state_dict()                      # settles the pending decay
        return close(et.cpu().numpy(), eh)

    _guarded("Adam on a torch CUDA tensor float32", run_torch)
    _guarded("functional.adam on torch CUDA tensors float32", run_functional)
    _guarded("RMSprop(exact) RowGrad of torch CUDA tensors f32", run_rows)


def _torch():
    try:
        import torch
        return torch if torch.cuda.is_available() else None
    except Exception:
        return None


# =========================================================================== timing

def time_gpu(cuda, fn, reps, warmup=3, repeats=3):
    """Seconds per call of ``fn`` (queued back to back, timed with CUDA events; best of ``repeats``)."""
    for _ in range(warmup):
        fn()
    cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        start, end = cuda.event(), cuda.event()
        wall = time.perf_counter()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        wall = time.perf_counter() - wall
        ms = start.elapsed_time(end)
        best = min(best, (ms / 1e3 if ms > 0 else wall) / reps)   # the simulator's events read 0
    return best


def time_torch(torch, fn, reps, warmup=3, repeats=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / reps)
    return best


def bench_dense(cuda, n, reps):
    gb = 1e9
    src = cuda.device_array(n, np.float32)
    dst = cuda.device_array(n, np.float32)
    t_copy = time_gpu(cuda, lambda: dst.copy_to_device(src), reps)
    bw_copy = 2 * 4 * n / t_copy
    row("dense", f"device-to-device copy, {n / 1e6:.0f}M float32", f"{bw_copy / gb:.0f} GB/s", "ceiling")
    del src, dst
    rng = np.random.default_rng(3)
    host = rng.standard_normal(1 << 20).astype(np.float32)
    p = cuda.device_array(n, np.float32)
    g = cuda.device_array(n, np.float32)
    for a in (p, g):                                    # fill with data (not zeros) in 1M chunks
        for off in range(0, n, host.size):
            a[off:off + min(host.size, n - off)].copy_to_device(host[:min(host.size, n - off)])
    torch = _torch()
    traffic = {"Adam": 7, "Adagrad": 5, "RMSprop": 5}      # arrays read + written per element
    for name, kw, torch_kw in (("Adam", dict(lr=1e-3), dict(fused=True)),
                               ("Adagrad", dict(lr=1e-2), dict(foreach=True)),
                               ("RMSprop", dict(lr=1e-2), dict(foreach=True))):
        opt = getattr(fa, name)([p], **kw)
        t = time_gpu(cuda, lambda: opt.step([g]), reps)
        bw = traffic[name] * 4 * n / t
        frac = bw / bw_copy
        row("dense", f"fastadapt {name} step, {t * 1e3:.3f} ms", f"{bw / gb:.0f} GB/s = {frac:.0%} copy",
            ">= 85%", frac >= 0.85)
        del opt
        if torch is not None:
            tp = torch.randn(n, device="cuda")
            tp.grad = torch.randn(n, device="cuda")
            topt = getattr(torch.optim, name)([tp], **kw, **torch_kw)
            tt = time_torch(torch, topt.step, reps)
            which = "fused" if "fused" in torch_kw else "foreach"
            ratio = tt / t
            row("dense", f"torch {name}({which}=True) step, {tt * 1e3:.3f} ms", f"fastadapt {ratio:.2f}x",
                ">= 1.0x" if which == "fused" else "", ratio >= 1.0 if which == "fused" else None)
            del topt, tp
            torch.cuda.empty_cache()
    del p, g


def bench_sparse(cuda, nrows, dim, frac, reps):
    rng = np.random.default_rng(4)
    k = int(nrows * frac)
    rows = np.sort(rng.choice(nrows, size=k, replace=False)).astype(np.int64)
    vals = rng.standard_normal((k, dim)).astype(np.float32)
    rows_d, vals_d = cuda.to_device(rows), cuda.to_device(vals)
    indptr = np.zeros(nrows + 1, np.int32)       # int32 indices, as scipy and CuPy make them (and as the
    indptr[rows + 1] = dim                        # correctness check compiled the kernels for)
    np.cumsum(indptr, out=indptr)
    csr = fa.DeviceCSR((vals_d.reshape(k * dim), cuda.to_device(np.tile(np.arange(dim, dtype=np.int32), k)),
                        cuda.to_device(indptr)), (nrows, dim))
    E = cuda.device_array((nrows, dim), np.float32)
    chunk = rng.standard_normal(((1 << 20) // dim, dim)).astype(np.float32)
    for off in range(0, nrows, chunk.shape[0]):
        m = min(chunk.shape[0], nrows - off)
        E[off:off + m].copy_to_device(chunk[:m])
    label = f"{nrows / 1e6:.0f}M x {dim}, {frac:.0%} rows"
    times = {}
    for form, grad in (("RowGrad", fa.RowGrad(rows_d, vals_d)), ("device CSR", csr)):
        opt = fa.SparseAdam([E])
        t = time_gpu(cuda, lambda: opt.step([grad]), reps)
        times[form] = t
        row("sparse", f"fastadapt SparseAdam {form}, {label}", f"{t * 1e3:.3f} ms/step")
        del opt
    torch = _torch()
    if torch is not None:
        W = torch.randn(nrows, dim, device="cuda")
        idx = torch.tensor(rows, device="cuda").unsqueeze(0)
        W.grad = torch.sparse_coo_tensor(idx, torch.tensor(vals, device="cuda"), (nrows, dim))
        topt = torch.optim.SparseAdam([W])
        tt = time_torch(torch, topt.step, reps)
        for form, t in times.items():
            row("sparse", f"torch SparseAdam vs fastadapt {form}", f"{tt * 1e3:.3f} ms; {tt / t:.2f}x",
                ">= 1.0x", tt / t >= 1.0)
        del topt, W
        torch.cuda.empty_cache()
    del E


# =========================================================================== main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check-n", type=int, default=1 << 20, help="elements of the correctness checks")
    ap.add_argument("--check-steps", type=int, default=5)
    ap.add_argument("--dense-n", type=int, default=1 << 28, help="float32 elements of the dense timing")
    ap.add_argument("--sparse-rows", type=int, default=10_000_000)
    ap.add_argument("--sparse-dim", type=int, default=64)
    ap.add_argument("--sparse-frac", type=float, default=0.01)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--skip-speed", action="store_true", help="correctness only")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes everywhere: a dry run of every section (e.g. under NUMBA_ENABLE_CUDASIM=1, "
                         "where numba's CUDA simulator also gets a small launch grid); its figures mean nothing")
    ap.add_argument("--strict", action="store_true", help="exit 2 when a speed target is missed")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.check_n, args.check_steps, args.dense_n = 4096, 2, 4096
        args.sparse_rows, args.sparse_dim, args.reps = 512, 16, 1
    t0 = time.perf_counter()
    try:
        from numba import cuda
        if not cuda.is_available():
            print("no usable CUDA GPU (numba.cuda.is_available() is False): " + _hint())
            return 3
        name = getattr(cuda.current_context().device, "name", "numba CUDA simulator")
        gpu = name.decode() if isinstance(name, bytes) else str(name)
    except Exception as exc:
        print(f"numba.cuda is not usable ({exc}): " + _hint())
        return 3
    import numba
    from fastadapt import config
    from fastadapt.backends.cuda_arrays import SIMULATOR
    if SIMULATOR:                        # one Python thread per simulated thread: keep the grid small
        config.CUDA_THREADS_PER_BLOCK, config.CUDA_MAX_BLOCKS = 32, 4
    torch = _torch()
    print(f"fastadapt {fa.__version__} | numba {numba.__version__} | GPU {gpu} | python "
          f"{platform.python_version()} | torch {torch.__version__ if torch else 'absent'}")
    print(f"  {'section':<12} {'check':<60} {'value':>24} {'target':>12}")
    check_dense(cuda, args.check_n, args.check_steps)
    check_sparse(cuda, args.check_n, args.check_steps)
    check_foreign(args.check_n)
    row("time", "CPU reference (serial loops; numba compile included)", f"{REF_SECONDS[0]:.1f} s")
    row("time", "correctness, all of it", f"{time.perf_counter() - t0:.1f} s")
    if not args.skip_speed:
        bench_dense(cuda, args.dense_n, args.reps)
        bench_sparse(cuda, args.sparse_rows, args.sparse_dim, args.sparse_frac, args.reps)
    print(f"total {time.perf_counter() - t0:.1f} s; correctness failures: {len(FAILED)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": gpu, "rows": ROWS, "failed": FAILED}, f, indent=1)
    if FAILED:
        return 1
    if args.strict and any(r["ok"] is False for r in ROWS):
        return 2
    return 0


def _hint():
    from fastadapt.backends.cuda_arrays import INSTALL_HINT
    return INSTALL_HINT


if __name__ == "__main__":
    sys.exit(main())
