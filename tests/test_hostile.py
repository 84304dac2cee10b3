"""Hostile inputs (issue #10): every row of the issue's table, each case run in a child process.

A case either completes, or raises a clear exception naming the offending argument and then
nothing has changed: every parameter, every state buffer (raw ``opt.state``, pending exact-mode
decay included) and every hyper-parameter is compared bit for bit with a snapshot taken just
before the call.  No input may crash the process.

``FASTADAPT_HOSTILE=long`` runs the thread cases for more rounds.

The cases run in child processes (``subprocess.run([sys.executable, "-c", ...])``), so that a
segfault is a failed test here rather than a dead pytest.  To save process starts (~0.5-1 s each
with numba's cache) the cases run as one batch; when a child dies, the case it was running is
recorded as crashed (signal, exit code) and the cases after it run again in a new child.  The
cases known to write out of bounds today (:data:`ISOLATED`) get a child each.

Each case records what happened before issue 10 was fixed (the crash, the silent wrong result or
the half-applied step the case guards against).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: a child process that has not finished after this many seconds is killed (a cold numba cache
#: compiles every kernel once: allow for that)
BATCH_TIMEOUT = 600

# ==================================================================================================
# child side: the cases
# ==================================================================================================

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def _snap(x):
    """A comparable, deep copy of ``x``: arrays as (dtype, shape, bytes), containers recursively."""
    import numpy as np

    if isinstance(x, np.ndarray):
        return ("ndarray", x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, dict):
        return {"dict": {repr(k): _snap(v) for k, v in x.items()}}
    if isinstance(x, (list, tuple)):
        return {type(x).__name__: [_snap(v) for v in x]}
    if isinstance(x, np.generic):
        return ("np", x.dtype.str, x.tobytes())
    return ("py", type(x).__name__, repr(x))


def _diff(a, b, path="", out=None):
    """Paths at which two snapshots differ (for the failure message)."""
    out = [] if out is None else out
    if type(a) is not type(b):
        out.append(path or "<root>")
    elif isinstance(a, dict):
        (ka, va), = a.items()
        (kb, vb), = b.items()
        if ka != kb:
            out.append(path or "<root>")
        elif ka == "dict":
            if va.keys() != vb.keys():
                out.append(f"{path} keys {sorted(va)} -> {sorted(vb)}")
            for k in va.keys() & vb.keys():
                _diff(va[k], vb[k], f"{path}[{k}]", out)
        else:
            if len(va) != len(vb):
                out.append(f"{path} length {len(va)} -> {len(vb)}")
            for i, (x, y) in enumerate(zip(va, vb)):
                _diff(x, y, f"{path}[{i}]", out)
    elif a != b:
        out.append(path or "<root>")
    return out


def _watch(opt=None, *arrays):
    """What a refused call must leave untouched: the optimizer's param groups (parameters and
    hyper-parameters), its raw state, ``skipped_steps``, and any other arrays given."""
    parts = list(arrays)
    if opt is not None:
        parts += [opt.param_groups, opt.state, getattr(opt, "skipped_steps", None)]
    return parts


def _attempt(action, *watched):
    """Run ``action``; report what it raised and whether ``watched`` is bit-identical afterwards."""
    before = _snap(list(watched))
    try:
        action()
    except BaseException as e:          # noqa: BLE001 -- the point is to see everything
        exc = e
    else:
        exc = None
    after = _snap(list(watched))
    changed = _diff(before, after)
    return {
        "raised": None if exc is None else type(exc).__name__,
        "mro": [] if exc is None else [c.__name__ for c in type(exc).__mro__],
        "message": "" if exc is None else str(exc)[:2000],
        "unchanged": not changed,
        "changed": changed[:20],
    }


def _np():
    import numpy as np
    return np


# --------------------------------------------------------------------------------------------------
# row 1: an array inside param_groups[i]["params"] replaced after construction
# --------------------------------------------------------------------------------------------------

@case
def swap_larger_table_exact_rmsprop_rowgrad():
    """Exact-mode RMSprop keeps per-row stamps sized for the original table (8 rows)."""
    np = _np()
    import fastadapt as fa
    p = np.zeros((8, 4))
    opt = fa.RMSprop([p], sparse_mode="exact")
    opt.step([fa.RowGrad([1, 2], np.ones((2, 4)))])
    n = 1_000_000
    big = np.zeros((n, 4))
    opt.param_groups[0]["params"][0] = big
    return _attempt(lambda: opt.step([fa.RowGrad([n - 1, n // 2], np.ones((2, 4)))]), *_watch(opt, p))


@case
def swap_larger_table_adam_dense():
    np = _np()
    import fastadapt as fa
    p = np.zeros((8, 4))
    opt = fa.Adam([p], lr=0.1)
    opt.step([np.ones_like(p)])
    big = np.zeros((100_000, 4))
    opt.param_groups[0]["params"][0] = big
    return _attempt(lambda: opt.step([np.ones_like(big)]), *_watch(opt, p))


@case
def swap_other_dtype():
    np = _np()
    import fastadapt as fa
    p = np.zeros((8, 4), np.float64)
    opt = fa.Adam([p], lr=0.1)
    opt.step([np.ones_like(p)])
    q = np.zeros((8, 4), np.float32)
    opt.param_groups[0]["params"][0] = q
    return _attempt(lambda: opt.step([np.ones_like(q)]), *_watch(opt, p))


@case
def swap_int_array():
    np = _np()
    import fastadapt as fa
    p = np.zeros((8, 4), np.float64)
    opt = fa.Adam([p], lr=0.1)
    opt.step([np.ones_like(p)])
    q = np.zeros((8, 4), np.int32)
    opt.param_groups[0]["params"][0] = q
    return _attempt(lambda: opt.step([np.ones((8, 4), np.int32)]), *_watch(opt, p))


# --------------------------------------------------------------------------------------------------
# row 2: p.flags.writeable = False after construction
# --------------------------------------------------------------------------------------------------

@case
def readonly_after_construction_dense():
    np = _np()
    import fastadapt as fa
    p = np.zeros(10)
    opt = fa.Adam([p], lr=0.1)
    opt.step([np.ones(10)])
    p.flags.writeable = False
    return _attempt(lambda: opt.step([np.ones(10)]), *_watch(opt))


@case
def readonly_after_construction_rowgrad():
    np = _np()
    import fastadapt as fa
    p = np.zeros((5, 3))
    opt = fa.Adam([p], lr=0.1)
    opt.step([fa.RowGrad([0], np.ones((1, 3)))])
    p.flags.writeable = False
    return _attempt(lambda: opt.step([fa.RowGrad([1], np.ones((1, 3)))]), *_watch(opt))


# --------------------------------------------------------------------------------------------------
# row 3: load_state_dict with a step count that later overflows
# --------------------------------------------------------------------------------------------------

@case
def load_step_10_pow_400():
    np = _np()
    import fastadapt as fa
    ps = [np.zeros(4), np.zeros(4)]
    opt = fa.Adam(ps, lr=0.1)
    opt.step([np.ones(4), np.ones(4)])
    sd = opt.state_dict()
    sd["state"][1]["step"] = 10 ** 400
    return _attempt(lambda: opt.load_state_dict(sd), *_watch(opt))


@case
def load_step_2_pow_63_minus_1_exact_rmsprop():
    np = _np()
    import fastadapt as fa
    ps = [np.zeros((6, 4)), np.zeros((6, 4))]
    opt = fa.RMSprop(ps, sparse_mode="exact")
    opt.step([fa.RowGrad([1], np.ones((1, 4))), fa.RowGrad([1], np.ones((1, 4)))])
    sd = opt.state_dict()
    sd["state"][1]["step"] = 2 ** 63 - 1
    return _attempt(lambda: opt.load_state_dict(sd), *_watch(opt))


# --------------------------------------------------------------------------------------------------
# row 4: boolean options given as arrays
# --------------------------------------------------------------------------------------------------

_FLAG_CLASS = {"maximize": "Adam", "amsgrad": "Adam", "centered": "RMSprop"}


def _flag_ctor(flag):
    np = _np()
    import fastadapt as fa
    cls = getattr(fa, _FLAG_CLASS[flag])
    p = np.zeros(4)
    return _attempt(lambda: cls([p], **{flag: np.array([True, False])}), p)


def _flag_group(flag):
    np = _np()
    import fastadapt as fa
    cls = getattr(fa, _FLAG_CLASS[flag])
    ps = [np.zeros(4), np.zeros(3)]
    opt = cls(ps, lr=0.1)
    opt.step([np.ones(4), np.ones(3)])
    opt.param_groups[0][flag] = np.array([True, False])
    return _attempt(lambda: opt.step([np.ones(4), np.ones(3)]), *_watch(opt))


@case
def flag_array_maximize_ctor():
    return _flag_ctor("maximize")


@case
def flag_array_amsgrad_ctor():
    return _flag_ctor("amsgrad")


@case
def flag_array_centered_ctor():
    return _flag_ctor("centered")


@case
def flag_array_maximize_group():
    return _flag_group("maximize")


@case
def flag_array_amsgrad_group():
    return _flag_group("amsgrad")


@case
def flag_array_centered_group():
    return _flag_group("centered")


@case
def flag_numpy_bool_accepted():
    """numpy bools are real booleans: accepted, with the result of the Python bool."""
    np = _np()
    import fastadapt as fa
    out = {}
    for flag in ("maximize", "amsgrad", "centered"):
        cls = getattr(fa, _FLAG_CLASS[flag])
        p, q = np.linspace(-1, 1, 6), np.linspace(-1, 1, 6)
        g = np.linspace(2, -3, 6)
        a = cls([p], lr=0.1, **{flag: np.bool_(True)})
        b = cls([q], lr=0.1, **{flag: True})
        for _ in range(3):
            a.step([g])
            b.step([g])
        out[flag] = bool(np.array_equal(p, q))
    return {"raised": None, "mro": [], "message": "", "unchanged": True, "changed": [], "equal": out}


# --------------------------------------------------------------------------------------------------
# row 5: sparse gradient values that are another parameter of the same step
# --------------------------------------------------------------------------------------------------

@case
def rowgrad_values_are_another_parameter():
    np = _np()
    import fastadapt as fa
    a = np.linspace(-1, 1, 12).reshape(4, 3)
    b = np.linspace(2, 3, 12).reshape(4, 3)
    opt = fa.Adam([a, b], lr=0.1)
    rows = np.arange(4)
    return _attempt(lambda: opt.step([fa.RowGrad(rows, b), fa.RowGrad(rows, a)]), *_watch(opt))


@case
def csr_values_are_another_parameter():
    np = _np()
    import scipy.sparse as sp
    import fastadapt as fa
    a = np.linspace(-1, 1, 12)                  # parameter 0, 12 elements
    b = np.linspace(2, 3, 12).reshape(3, 4)     # parameter 1; its CSR gradient stores a's memory
    opt = fa.Adam([a, b], lr=0.1)
    g_b = sp.csr_matrix((a, np.tile(np.arange(4), 3), np.array([0, 4, 8, 12])), shape=(3, 4))
    assert np.shares_memory(g_b.data, a)
    g_a = sp.csr_matrix((b.reshape(-1), np.arange(12), np.array([0, 12])), shape=(1, 12))
    assert np.shares_memory(g_a.data, b)
    return _attempt(lambda: opt.step([g_a, g_b]), *_watch(opt))


@case
def dense_gradient_is_another_parameter():
    """Already refused today (the rule the sparse cases above must follow)."""
    np = _np()
    import fastadapt as fa
    a, b = np.linspace(-1, 1, 12), np.linspace(2, 3, 12)
    opt = fa.Adam([a, b], lr=0.1)
    return _attempt(lambda: opt.step([b, np.ones(12)]), *_watch(opt))


# --------------------------------------------------------------------------------------------------
# row 6: functional layer, gradient overlapping a state buffer
# --------------------------------------------------------------------------------------------------

@case
def functional_adam_grad_is_exp_avg():
    np = _np()
    import fastadapt as fa
    p, m, v = np.ones(8), np.full(8, 0.5), np.full(8, 0.25)
    return _attempt(lambda: fa.functional.adam(p, m, m, v, step=1, lr=0.1), p, m, v)


@case
def functional_adam_grad_overlaps_exp_avg_sq():
    np = _np()
    import fastadapt as fa
    buf = np.linspace(0.5, 1.5, 16)
    p, m = np.ones(8), np.zeros(8)
    return _attempt(lambda: fa.functional.adam(p, buf[4:12], m, buf[:8], step=1, lr=0.1), p, m, buf)


@case
def functional_grad_is_param():
    """Already refused today."""
    np = _np()
    import fastadapt as fa
    p, m, v = np.ones(8), np.zeros(8), np.zeros(8)
    return _attempt(lambda: fa.functional.adam(p, p, m, v, step=1, lr=0.1), p, m, v)


# --------------------------------------------------------------------------------------------------
# row 8: numbers too large for a float
# --------------------------------------------------------------------------------------------------

@case
def lr_10_pow_400_ctor():
    np = _np()
    import fastadapt as fa
    p = np.zeros(4)
    return _attempt(lambda: fa.Adam([p], lr=10 ** 400), p)


@case
def lr_10_pow_400_group():
    np = _np()
    import fastadapt as fa
    ps = [np.zeros(4), np.zeros(3)]
    opt = fa.Adam(ps)
    opt.step([np.ones(4), np.ones(3)])
    opt.param_groups[0]["lr"] = 10 ** 400
    return _attempt(lambda: opt.step([np.ones(4), np.ones(3)]), *_watch(opt))


@case
def functional_step_10_pow_400():
    np = _np()
    import fastadapt as fa
    p, m, v = np.zeros(4), np.zeros(4), np.zeros(4)
    return _attempt(lambda: fa.functional.adam(p, np.ones(4), m, v, step=10 ** 400), p, m, v)


@case
def functional_lr_10_pow_400():
    np = _np()
    import fastadapt as fa
    p, m, v = np.zeros(4), np.zeros(4), np.zeros(4)
    return _attempt(lambda: fa.functional.adam(p, np.ones(4), m, v, step=1, lr=10 ** 400), p, m, v)


# --------------------------------------------------------------------------------------------------
# row 9: a state_dict of another optimizer
# --------------------------------------------------------------------------------------------------

def _adam_state_dict():
    np = _np()
    import fastadapt as fa
    p = np.zeros(4)
    a = fa.Adam([p], lr=0.1)
    a.step([np.ones(4)])
    return a.state_dict()


@case
def adam_state_dict_into_adamw():
    np = _np()
    import fastadapt as fa
    sd = _adam_state_dict()
    q = np.zeros(4)
    opt = fa.AdamW([q])
    opt.step([np.ones(4)])
    return _attempt(lambda: opt.load_state_dict(sd), *_watch(opt))


@case
def adam_state_dict_into_rmsprop():
    np = _np()
    import fastadapt as fa
    sd = _adam_state_dict()
    q = np.zeros(4)
    opt = fa.RMSprop([q])
    opt.step([np.ones(4)])
    return _attempt(lambda: opt.load_state_dict(sd), *_watch(opt))


def _torch_adam_state_dict():
    import torch
    t = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    topt = torch.optim.Adam([t], lr=0.1)
    t.grad = torch.ones(4, dtype=torch.float64)
    topt.step()
    return topt.state_dict()


def _torch_case(convert):
    np = _np()
    try:
        import torch  # noqa: F401
    except ImportError:
        return {"skip": "torch is not installed"}
    import fastadapt as fa
    sd = _torch_adam_state_dict()
    if convert:      # what a user would try first: tensors to numpy, step to int
        sd = {"state": {k: {n: (int(v.item()) if n == "step" else v.detach().numpy().copy())
                            for n, v in s.items()} for k, s in sd["state"].items()},
              "param_groups": sd["param_groups"]}
    q = np.zeros(4)
    opt = fa.Adam([q])
    opt.step([np.ones(4)])
    return _attempt(lambda: opt.load_state_dict(sd), *_watch(opt))


@case
def torch_adam_state_dict_raw_into_adam():
    return _torch_case(convert=False)


@case
def torch_adam_state_dict_numpy_into_adam():
    return _torch_case(convert=True)


# --------------------------------------------------------------------------------------------------
# row 7: threads
# --------------------------------------------------------------------------------------------------

_BIG = 2_000_000     # elements: a step takes about a millisecond, so two steps started together overlap
_ROUNDS = 30 if os.environ.get("FASTADAPT_HOSTILE", "").lower() == "long" else 6


def _digest(opt, params):
    import hashlib
    h = hashlib.sha1()
    for p in params:
        h.update(p.tobytes())
    for st in opt.state:
        for k in sorted(st):
            v = st[k]
            h.update(k.encode())
            h.update(v.tobytes() if hasattr(v, "tobytes") else repr(v).encode())
    return h.hexdigest()


def _thread_problem():
    np = _np()
    import fastadapt as fa
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(_BIG).astype(np.float32), rng.standard_normal(300).astype(np.float32),
              rng.standard_normal(70).astype(np.float32)]     # two small ones: the many-tensor path too
    grads = [rng.standard_normal(p.size).astype(np.float32) for p in params]
    return fa.Adam(params, lr=0.01, amsgrad=True), params, grads


def _sequential_digests(n):
    """Digests of the state after 0..n sequential steps (the only consistent states)."""
    opt, params, grads = _thread_problem()
    out = [_digest(opt, params)]
    for _ in range(n):
        opt.step(grads)
        out.append(_digest(opt, params))
    return out


@case
def threads_two_steps_on_one_optimizer():
    import threading
    opt, params, grads = _thread_problem()
    errors, done = [], []
    for _ in range(_ROUNDS):
        barrier = threading.Barrier(2)

        def work():
            barrier.wait()
            try:
                opt.step(grads)
                done.append(1)
            except BaseException as e:      # noqa: BLE001
                errors.append([type(e).__name__, str(e)[:500]])

        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    steps = [st.get("step") for st in opt.state]
    digests = _sequential_digests(len(done))
    return {"errors": errors, "successes": len(done), "steps": steps,
            "consistent": _digest(opt, params) == digests[-1]}


@case
def threads_state_dict_during_step():
    import threading
    import time
    opt, params, grads = _thread_problem()
    errors, done, snapshots = [], [], []
    for _ in range(_ROUNDS):
        barrier = threading.Barrier(2)

        def stepper():
            barrier.wait()
            try:
                opt.step(grads)
                done.append(1)
            except BaseException as e:      # noqa: BLE001
                errors.append(["step", type(e).__name__, str(e)[:500]])

        def reader():
            barrier.wait()
            time.sleep(0.0003)              # let the step reach its kernel (which releases the GIL)
            try:
                sd = opt.state_dict()
                snapshots.append(sd)
            except BaseException as e:      # noqa: BLE001
                errors.append(["state_dict", type(e).__name__, str(e)[:500]])

        threads = [threading.Thread(target=stepper), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # every state_dict() that returned must hold a consistent state (after some whole number of
    # steps), never half a step
    seq = _sequential_states(len(done))
    torn = sum(1 for sd in snapshots if sd["state"] and _sd_digest(sd) not in seq)
    return {"errors": errors, "successes": len(done), "steps": [st.get("step") for st in opt.state],
            "consistent": _digest(opt, params) == _sequential_digests(len(done))[-1], "torn": torn,
            "reads": len(snapshots)}


def _sd_digest(sd):
    import hashlib
    h = hashlib.sha1()
    for j in sorted(sd["state"]):
        for k in sorted(sd["state"][j]):
            v = sd["state"][j][k]
            h.update(k.encode())
            h.update(v.tobytes() if hasattr(v, "tobytes") else repr(v).encode())
    return h.hexdigest()


def _sequential_states(n):
    opt, params, grads = _thread_problem()
    out = set()
    for _ in range(n):
        opt.step(grads)
        out.add(_sd_digest(opt.state_dict()))
    return out


@case
def threads_separate_optimizers():
    """Two optimizers, one thread each, stepping at the same time: both as if run alone."""
    import threading
    runs = [_thread_problem(), _thread_problem()]
    errors = []
    barrier = threading.Barrier(2)

    def work(opt, grads):
        barrier.wait()
        try:
            for _ in range(_ROUNDS):
                opt.step(grads)
        except BaseException as e:          # noqa: BLE001
            errors.append([type(e).__name__, str(e)[:500]])

    threads = [threading.Thread(target=work, args=(opt, grads)) for opt, _, grads in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = _sequential_digests(_ROUNDS)[-1]
    return {"errors": errors, "consistent": [_digest(opt, params) == expected for opt, params, _ in runs]}


# --------------------------------------------------------------------------------------------------
# child entry point
# --------------------------------------------------------------------------------------------------

def _child(names):
    """Run the named cases in order, one JSON line per case (a start marker first, flushed, so that
    the parent knows which case a crash interrupted)."""
    for name in names:
        print("@@start " + name, flush=True)
        try:
            result = CASES[name]()
        except BaseException as e:          # noqa: BLE001 -- a broken case, reported as such
            result = {"harness_error": f"{type(e).__name__}: {e}"[:2000]}
        print("@@result " + json.dumps({"name": name, "result": result}), flush=True)


# ==================================================================================================
# parent side
# ==================================================================================================

_CHILD = ("import sys; sys.path.insert(0, {here!r}); import test_hostile; "
          "test_hostile._child(sys.argv[1:])")


def _run_cases(names):
    """{name: result} for every case; a case whose process died gets {"crashed": description}."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONFAULTHANDLER", "1")
    results = {}
    pending = list(names)
    while pending:
        cmd = [sys.executable, "-c", _CHILD.format(here=HERE), *pending]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BATCH_TIMEOUT, env=env,
                                  cwd=ROOT)
            out, err, rc, why = proc.stdout, proc.stderr, proc.returncode, None
        except subprocess.TimeoutExpired as e:
            decode = lambda s: s.decode(errors="replace") if isinstance(s, bytes) else (s or "")  # noqa: E731
            out, err, rc, why = decode(e.stdout), decode(e.stderr), None, f"timed out after {BATCH_TIMEOUT} s"
        started = None
        for line in out.splitlines():
            if line.startswith("@@start "):
                started = line[len("@@start "):]
            elif line.startswith("@@result "):
                rec = json.loads(line[len("@@result "):])
                results[rec["name"]] = rec["result"]
                started = None
        if started is not None:                         # the process died (or hung) in this case
            if why is None:
                why = (f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit code {rc}")
            results[started] = {"crashed": why, "stderr": err[-3000:]}
        elif rc not in (0, None) and not all(n in results for n in pending):
            for n in pending:
                results.setdefault(n, {"crashed": f"child failed before its first case, exit code {rc}",
                                       "stderr": err[-3000:]})
        pending = [n for n in pending if n not in results]
    return results


#: cases that write out of bounds with today's code: each in its own child, so that the memory it
#: corrupts cannot make a later case of the batch crash or misbehave
ISOLATED = ("swap_larger_table_exact_rmsprop_rowgrad", "swap_larger_table_adam_dense")


@pytest.fixture(scope="module")
def results():
    out = _run_cases([n for n in CASES if n not in ISOLATED])
    for name in ISOLATED:
        out.update(_run_cases([name]))
    return out


def _get(results, name):
    res = results[name]
    assert "crashed" not in res, f"{name}: the process crashed ({res['crashed']}):\n{res.get('stderr', '')}"
    assert "harness_error" not in res, f"{name}: the case itself failed: {res['harness_error']}"
    if "skip" in res:
        pytest.skip(res["skip"])
    return res


# (case, accepted exception types, regex the message must match, what happened before the fix or None)
CLEAR = ("ValueError", "TypeError", "RuntimeError", "OverflowError", "IndexError")
SWAPPED = r"(?i)add_param_group|new optimizer|replac|swap"
REFUSALS = [
    ("swap_larger_table_exact_rmsprop_rowgrad", CLEAR, SWAPPED,
     "swapped larger table, exact-mode RMSprop + RowGrad: accepted; row stamps indexed past their end "
     "(a segfault when the memory there is unmapped, silent corruption otherwise)"),
    ("swap_larger_table_adam_dense", CLEAR, SWAPPED,
     "swapped larger table, Adam dense step: accepted, state buffers of the old size indexed past their end"),
    ("swap_other_dtype", CLEAR, SWAPPED,
     "swapped float32 array into a float64 optimizer: accepted, stepped with the old state"),
    ("swap_int_array", CLEAR, SWAPPED,
     "swapped int32 array: accepted, stepped to -2147483648"),
    ("readonly_after_construction_dense", CLEAR, r"(?i)read-only|writeable",
     "p.flags.writeable = False after construction: the dense step writes into it anyway"),
    ("readonly_after_construction_rowgrad", CLEAR, r"(?i)read-only|writeable",
     "read-only after construction + RowGrad: numba TypingError after the step counter advanced"),
    ("load_step_10_pow_400", CLEAR, r"step",
     "load_state_dict(step=10**400) accepted; the next step() raises OverflowError half-way"),
    ("load_step_2_pow_63_minus_1_exact_rmsprop", CLEAR, r"step",
     "load_state_dict(step=2**63-1), exact RMSprop: accepted; the next step() raises OverflowError half-way"),
    ("flag_array_maximize_ctor", ("TypeError", "ValueError"), r"maximize",
     "maximize=np.array([True, False]) accepted by the constructor"),
    ("flag_array_amsgrad_ctor", ("TypeError", "ValueError"), r"amsgrad",
     "amsgrad=np.array([True, False]) accepted by the constructor"),
    ("flag_array_centered_ctor", ("TypeError", "ValueError"), r"centered",
     "centered=np.array([True, False]) accepted by the constructor"),
    ("flag_array_maximize_group", ("TypeError", "ValueError"), r"maximize",
     "maximize array in a param group: numpy's 'truth value ... ambiguous' after step counters advanced"),
    ("flag_array_amsgrad_group", ("TypeError", "ValueError"), r"amsgrad",
     "amsgrad array in a param group: numpy's 'truth value ... ambiguous' after step counters advanced"),
    ("flag_array_centered_group", ("TypeError", "ValueError"), r"centered",
     "centered array in a param group: numpy's 'truth value ... ambiguous' after step counters advanced"),
    ("rowgrad_values_are_another_parameter", ("ValueError",), r"(?i)share|overlap|alias",
     "RowGrad values that are another parameter of the step: accepted"),
    ("csr_values_are_another_parameter", ("ValueError",), r"(?i)share|overlap|alias",
     "CSR data that is another parameter of the step: accepted"),
    ("dense_gradient_is_another_parameter", ("ValueError",), r"(?i)share|overlap|alias", None),
    ("functional_adam_grad_is_exp_avg", ("ValueError",), r"grad(?!_avg).*exp_avg|exp_avg.*\bgrad\b",
     "functional.adam with grad = exp_avg: accepted, wrong result"),
    ("functional_adam_grad_overlaps_exp_avg_sq", ("ValueError",), r"grad(?!_avg).*exp_avg_sq|exp_avg_sq.*\bgrad\b",
     "functional.adam with grad overlapping exp_avg_sq: accepted, wrong result"),
    ("functional_grad_is_param", ("ValueError",), r"(?i)share|overlap", None),
    ("lr_10_pow_400_ctor", CLEAR, r"\blr\b",
     "Adam(lr=10**400): bare OverflowError 'int too large to convert to float'"),
    ("lr_10_pow_400_group", CLEAR, r"\blr\b",
     "param_groups[0]['lr'] = 10**400: bare OverflowError 'int too large to convert to float'"),
    ("functional_step_10_pow_400", CLEAR, r"\bstep\b",
     "functional.adam(step=10**400): bare OverflowError 'int too large to convert to float'"),
    ("functional_lr_10_pow_400", CLEAR, r"\blr\b",
     "functional.adam(lr=10**400): bare OverflowError 'int too large to convert to float'"),
    ("adam_state_dict_into_adamw", ("ValueError", "TypeError"), r"looks like an Adam",
     "Adam state_dict into AdamW: 'AdamW always decouples weight decay; use Adam for the L2 form'"),
    ("adam_state_dict_into_rmsprop", ("ValueError", "TypeError"), r"looks like an Adam",
     "Adam state_dict into RMSprop: 'param group 0 of the state_dict has unknown keys [...]'"),
    ("torch_adam_state_dict_raw_into_adam", ("ValueError", "TypeError"), r"looks like",
     "torch.optim.Adam state_dict into fa.Adam: 'unknown keys ['capturable', 'differentiable', ...]'"),
    ("torch_adam_state_dict_numpy_into_adam", ("ValueError", "TypeError"), r"looks like",
     "torch.optim.Adam state_dict (tensors as numpy) into fa.Adam: 'unknown keys ['capturable', ...]'"),
]


def _param(name, kinds, pattern, before):
    return pytest.param(name, kinds, pattern, id=name)


@pytest.mark.parametrize("name,kinds,pattern", [_param(*r) for r in REFUSALS])
def test_refused_cleanly(results, name, kinds, pattern):
    """The call raises a clear exception naming the argument, and nothing has changed."""
    if name.startswith("torch_"):
        pytest.importorskip("torch")
    res = _get(results, name)
    assert res["raised"] is not None, f"{name}: accepted (no exception)"
    assert "NumbaError" not in res["mro"], f"{name}: numba's internal error leaked: {res['message'][:300]}"
    assert any(k in res["mro"] for k in kinds), \
        f"{name}: raised {res['raised']} ({res['message'][:300]}), expected one of {kinds}"
    assert re.search(pattern, res["message"]), \
        f"{name}: the message does not match {pattern!r}: {res['raised']}: {res['message'][:500]}"
    assert res["unchanged"], f"{name}: refused, but these changed: {res['changed']}"


def test_numpy_bools_are_booleans(results):
    res = _get(results, "flag_numpy_bool_accepted")
    assert res["equal"] == {"maximize": True, "amsgrad": True, "centered": True}


def test_two_threads_one_optimizer(results):
    """Before the fix: torn values, lost step counts, an intermittent TypeError in many.py."""
    res = _get(results, "threads_two_steps_on_one_optimizer")
    kinds = {e[0] for e in res["errors"]}
    assert kinds <= {"RuntimeError"}, f"unexpected errors: {res['errors']}"
    assert res["errors"], "no concurrent step() was refused (expected a RuntimeError)"
    assert res["successes"] + len(res["errors"]) == 2 * _ROUNDS
    assert res["steps"] == [res["successes"]] * 3, res["steps"]
    assert res["consistent"], "parameters/state differ from the same number of sequential steps"


def test_state_dict_during_step(results):
    """Before the fix: no RuntimeError, copies of half-applied steps."""
    res = _get(results, "threads_state_dict_during_step")
    kinds = {e[1] for e in res["errors"]}
    assert kinds <= {"RuntimeError"}, f"unexpected errors: {res['errors']}"
    assert res["errors"], "state_dict() during a step was never refused (expected a RuntimeError)"
    assert res["torn"] == 0, f"{res['torn']} state_dict() copies hold half a step"
    assert res["consistent"]


def test_separate_optimizers_in_separate_threads(results):
    res = _get(results, "threads_separate_optimizers")
    assert res["errors"] == []
    assert res["consistent"] == [True, True], "concurrent runs differ from a sequential run"
