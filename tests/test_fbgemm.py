"""FBGEMM's CPU table-batched embeddings (the anchor of bench/tables.py) against numpy references
of the formulas, and fastadapt against FBGEMM step for step.

Skipped without fbgemm_gpu (``pip install --no-deps fbgemm-gpu-cpu==1.8.0`` next to a CPU torch;
see bench/tables.py).  What the tests pin down about FBGEMM (read from its CPU kernels:
``fbgemm_gpu/codegen/genscript/optimizers.py``, ``rowwise_adagrad()`` / ``adagrad()``'s
``split_weight_update_cpu``, ``embedding_backward_split_cpu_template.cpp``, and fbgemm's
``rowwise_sparse_adagrad_ref``), for a float32 table:

* a row's gradient is the sum over all its lookups in the batch of the bag's ``grad_out`` (times
  the per-sample weight, times 1/L under MEAN pooling): duplicates -- within a bag, across bags,
  across features sharing the table -- are summed *before* the update, which runs once per
  distinct row;
* EXACT_ROWWISE_ADAGRAD: ``g' = g + wd * w`` (L2) else ``g``; ``acc[r] += sum_j(g'_j**2) / D``;
  ``m = lr / (sqrt(acc[r]) + eps)`` (eps outside the root); ``c = 1 - m * wd`` (L2),
  ``1 - lr * wd`` (DECOUPLE), ``1`` (NONE); ``w_j = c * w_j - m * g_j``; all in float32
  (``at::acc_type<float, true>`` is float); the accumulator (one float per row) starts at 0;
* EXACT_ADAGRAD: ``acc_j += g_j**2; w_j -= lr * g_j / (sqrt(acc_j) + eps)``, float32, from 0;
* the weight decay of EXACT_ROWWISE_ADAGRAD is applied by the generic CPU kernel only (shared
  tables, non-float32 weights); the float32 single-table fast path (fbgemm's JIT
  ``SparseAdaGrad`` kernel) is called with ``weight_decay=0`` and ignores it
  (:func:`test_fbgemm_fast_path_ignores_weight_decay`, pinned to 1.8.0).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("fbgemm_gpu")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

import fastadapt as fa  # noqa: E402
import tables as T  # noqa: E402
from conftest import assert_close  # noqa: E402

API, WHY = T.fbgemm_api()
if API is None:                                 # importable, but not usable (e.g. built for another torch)
    pytest.skip(WHY, allow_module_level=True)

NROWS, STEPS, RTOL = 40, 5, 1e-5
MODES = {"none": API.WeightDecayMode.NONE, "l2": API.WeightDecayMode.L2, "decoupled": API.WeightDecayMode.DECOUPLE}


def needs(*names):
    missing = [n for n in names if not hasattr(fa, n)]
    return pytest.mark.skipif(bool(missing), reason=f"fastadapt has no {', '.join(missing)} on this branch yet "
                                                    "(added in parallel; this test runs once it exists)")


# =========================================================================== batches and references

def batch(rng, dim, features=1, bags=6, hot=10, weighted=False):
    """One batch of lookups for ``features`` features sharing one table: ``features * bags`` bags
    of 0..4 ids drawn from ``hot`` rows (so ids repeat within and across bags), CSR offsets,
    ``grad_out`` of shape ``(bags, features * dim)``, optional per-sample weights."""
    pool = rng.choice(NROWS, size=hot, replace=False)
    lengths = rng.integers(0, 5, size=features * bags)
    lengths[0] = max(lengths[0], 2)
    indices = rng.choice(pool, size=int(lengths.sum())).astype(np.int64)
    indices[1] = indices[0]                                   # a duplicate within a bag, always
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    grad_out = rng.standard_normal((bags, features * dim), dtype=np.float32)
    weights = rng.uniform(0.5, 2.0, size=indices.size).astype(np.float32) if weighted else None
    return indices, offsets, grad_out, weights


def lookups(indices, offsets, grad_out, dim, weights=None, mean=False):
    """Per lookup: its row and its gradient (the bag's ``grad_out`` slice for its feature, times
    its weight, over the bag's length under MEAN pooling): a RowGrad with duplicates."""
    bags = grad_out.shape[0]
    vals = np.empty((indices.size, dim), np.float32)
    for q in range(offsets.size - 1):
        f, b = divmod(q, bags)
        lo, hi = offsets[q], offsets[q + 1]
        for i in range(lo, hi):
            v = grad_out[b, f * dim:(f + 1) * dim]
            if weights is not None:
                v = v * weights[i]
            if mean:
                v = v / np.float32(hi - lo)
            vals[i] = v
    return indices.copy(), vals


def summed(rows, vals):
    """Distinct rows (sorted) and their summed gradients, float32 sums in lookup order."""
    out = {}
    for r, v in zip(rows.tolist(), vals):
        out[r] = out[r] + v if r in out else v.copy()
    keys = sorted(out)
    return np.array(keys, np.int64), np.array([out[k] for k in keys], np.float32).reshape(len(keys), -1)


def rowwise_ref(w, acc, rows, g, lr, eps, wd, mode):
    """One EXACT_ROWWISE_ADAGRAD step on the distinct ``rows`` (float32, in place)."""
    f = np.float32
    lr, eps, wd = f(lr), f(eps), f(wd)
    dim = w.shape[1]
    for r, gr in zip(rows, g):
        gp = gr + wd * w[r] if mode == "l2" else gr
        acc[r] = acc[r] + np.sum(gp * gp, dtype=np.float32) / f(dim)
        m = lr / (np.sqrt(acc[r]) + eps)
        c = f(1) - m * wd if mode == "l2" else f(1) - lr * wd if mode == "decoupled" else f(1)
        w[r] = c * w[r] - m * gr


def adagrad_ref(w, acc, rows, g, lr, eps):
    """One EXACT_ADAGRAD step (per element; float32, in place)."""
    f = np.float32
    for r, gr in zip(rows, g):
        acc[r] = acc[r] + gr * gr
        w[r] = w[r] - f(lr) * gr / (np.sqrt(acc[r]) + f(eps))


def fbgemm_step(module, indices, offsets, grad_out, weights=None):
    torch = API.torch
    out = module(torch.from_numpy(indices), torch.from_numpy(offsets),
                 per_sample_weights=None if weights is None else torch.from_numpy(weights))
    out.backward(torch.from_numpy(grad_out))
    return out.detach().numpy()


def table(dim, seed=0):
    return np.random.default_rng(seed).standard_normal((NROWS, dim), dtype=np.float32)


# =========================================================================== (a) FBGEMM vs the formulas

@pytest.mark.parametrize("eps", [1e-8, 0.5], ids=["eps1e-8", "eps0.5"])
@pytest.mark.parametrize("dim", [8, 20])
@pytest.mark.parametrize("path,mode", [("fast", "none"), ("generic", "none"), ("generic", "l2"),
                                       ("generic", "decoupled")])
def test_fbgemm_rowwise_adagrad_matches_the_formula(path, mode, dim, eps):
    """EXACT_ROWWISE_ADAGRAD over several steps with repeated and duplicate ids.  "fast": one
    feature (fbgemm's JIT kernel); "generic": two features sharing the table (the codegen'd
    ``split_weight_update_cpu``, the one that applies weight decay)."""
    features = 1 if path == "fast" else 2
    lr, wd = 0.05, (0.0 if mode == "none" else 0.3)
    w0 = table(dim)
    module = T.tbe(API, w0, "rowwise", lr=lr, eps=eps, weight_decay=wd, weight_decay_mode=MODES[mode],
                   features=features)
    assert T.tbe_momentum(module).shape == (NROWS,)
    assert not T.tbe_momentum(module).any()                   # the accumulator starts at 0
    w, acc = w0.copy(), np.zeros(NROWS, np.float32)
    rng = np.random.default_rng(1)
    for step in range(STEPS):
        indices, offsets, grad_out, _ = batch(rng, dim, features)
        fbgemm_step(module, indices, offsets, grad_out)
        rows, g = summed(*lookups(indices, offsets, grad_out, dim))
        rowwise_ref(w, acc, rows, g, lr, eps, wd, mode)
        assert_close(T.tbe_weights(module), w, RTOL, f"weights, step {step}")
        assert_close(T.tbe_momentum(module), acc, RTOL, f"accumulator, step {step}")
    assert not np.array_equal(w, w0)


def test_fbgemm_rowwise_adagrad_sums_duplicates_first():
    """A row looked up twice in one batch gets ONE update with the summed gradient (not two
    updates): the accumulator grows by mean((g1 + g2)**2), not mean(g1**2) + mean(g2**2)."""
    dim, lr, eps = 8, 0.1, 1e-8
    module = T.tbe(API, np.zeros((NROWS, dim), np.float32), "rowwise", lr=lr, eps=eps)
    indices, offsets = np.array([3, 3, 5], np.int64), np.array([0, 1, 3], np.int64)    # bags [3], [3, 5]
    grad_out = np.random.default_rng(0).standard_normal((2, dim), dtype=np.float32)
    fbgemm_step(module, indices, offsets, grad_out)
    g3 = grad_out[0] + grad_out[1]
    np.testing.assert_allclose(T.tbe_momentum(module)[3], np.mean(g3 * g3), rtol=1e-6)
    np.testing.assert_allclose(T.tbe_weights(module)[3], -lr / (np.sqrt(np.mean(g3 * g3)) + eps) * g3, rtol=1e-5)


@pytest.mark.parametrize("mode", ["l2", "decoupled"])
def test_fbgemm_fast_path_ignores_weight_decay(mode):
    """fbgemm-gpu-cpu 1.8.0: a float32 table not shared by several features takes fbgemm's JIT
    rowwise kernel, called with ``weight_decay=0``: L2 and DECOUPLE weight decay have no effect
    there (the update is the NONE one).  Pinned to 1.8.0, where it was read and observed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("fbgemm-gpu-cpu")
    except PackageNotFoundError:
        pytest.skip("not the fbgemm-gpu-cpu wheel")
    if installed != "1.8.0":
        pytest.skip(f"observed on fbgemm-gpu-cpu 1.8.0; this is {installed}")
    dim, lr, eps = 16, 0.05, 1e-8
    w0 = table(dim)
    module = T.tbe(API, w0, "rowwise", lr=lr, eps=eps, weight_decay=0.3, weight_decay_mode=MODES[mode])
    w, acc = w0.copy(), np.zeros(NROWS, np.float32)
    rng = np.random.default_rng(2)
    for _ in range(3):
        indices, offsets, grad_out, _ = batch(rng, dim)
        fbgemm_step(module, indices, offsets, grad_out)
        rowwise_ref(w, acc, *summed(*lookups(indices, offsets, grad_out, dim)), lr, eps, 0.0, "none")
    assert_close(T.tbe_weights(module), w, RTOL, "fast path = no weight decay")


@pytest.mark.parametrize("features", [1, 2])
def test_fbgemm_exact_adagrad_matches_the_formula(features):
    dim, lr, eps = 12, 0.05, 1e-8
    w0 = table(dim)
    module = T.tbe(API, w0, "adagrad", lr=lr, eps=eps, features=features)
    assert T.tbe_momentum(module).size == NROWS * dim and not T.tbe_momentum(module).any()
    w, acc = w0.copy(), np.zeros((NROWS, dim), np.float32)
    rng = np.random.default_rng(3)
    for step in range(STEPS):
        indices, offsets, grad_out, _ = batch(rng, dim, features)
        fbgemm_step(module, indices, offsets, grad_out)
        adagrad_ref(w, acc, *summed(*lookups(indices, offsets, grad_out, dim)), lr, eps)
        assert_close(T.tbe_weights(module), w, RTOL, f"weights, step {step}")
        assert_close(T.tbe_momentum(module).reshape(NROWS, dim), acc, RTOL, f"accumulator, step {step}")


# =========================================================================== (b) fastadapt RowwiseAdagrad vs FBGEMM

def _state_sum(opt):
    return np.asarray(opt.state[0]["sum"]).reshape(-1)


@needs("RowwiseAdagrad")
@pytest.mark.parametrize("eps", [1e-8, 0.5], ids=["eps1e-8", "eps0.5"])
@pytest.mark.parametrize("mode", ["none", "l2", "decoupled"])
def test_rowwise_adagrad_rowgrad_matches_fbgemm(mode, eps):
    """fa.RowwiseAdagrad with a RowGrad of the lookups (duplicates left to fastadapt to sum) =
    FBGEMM after every step (weight decay: on FBGEMM's generic path, which applies it)."""
    dim, lr, wd = 20, 0.05, (0.0 if mode == "none" else 0.3)
    features = 1 if mode == "none" else 2
    w0 = table(dim)
    module = T.tbe(API, w0, "rowwise", lr=lr, eps=eps, weight_decay=wd, weight_decay_mode=MODES[mode],
                   features=features)
    w = w0.copy()
    kw = {} if mode == "none" else {"weight_decay": wd, "weight_decay_mode": mode}
    opt = fa.RowwiseAdagrad([w], lr=lr, eps=eps, **kw)
    rng = np.random.default_rng(4)
    for step in range(STEPS):
        indices, offsets, grad_out, _ = batch(rng, dim, features)
        fbgemm_step(module, indices, offsets, grad_out)
        opt.step([fa.RowGrad(*lookups(indices, offsets, grad_out, dim))])
        assert_close(w, T.tbe_weights(module), RTOL, f"weights, step {step}")
        assert_close(_state_sum(opt), T.tbe_momentum(module), RTOL, f"sum, step {step}")


@needs("RowwiseAdagrad", "BagGrad")
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_rowwise_adagrad_baggrad_matches_fbgemm(pooling, weighted):
    """fa.BagGrad(indices, offsets, grad_out, per_sample_weights, mode) = the table gradient
    FBGEMM's backward computes (empty bags, duplicates, weights, MEAN's 1/L)."""
    dim, lr, eps = 16, 0.05, 1e-8
    w0 = table(dim)
    module = T.tbe(API, w0, "rowwise", lr=lr, eps=eps, pooling=pooling)
    w = w0.copy()
    opt = fa.RowwiseAdagrad([w], lr=lr, eps=eps)
    rng = np.random.default_rng(5)
    for step in range(STEPS):
        indices, offsets, grad_out, weights = batch(rng, dim, weighted=weighted)
        fbgemm_step(module, indices, offsets, grad_out, weights)
        opt.step([fa.BagGrad(indices, offsets, grad_out, per_sample_weights=weights, mode=pooling)])
        assert_close(w, T.tbe_weights(module), RTOL, f"weights, step {step}")
        assert_close(_state_sum(opt), T.tbe_momentum(module), RTOL, f"sum, step {step}")


@needs("embedding_bag")
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_embedding_bag_matches_fbgemm_forward(pooling, weighted):
    dim = 16
    w0 = table(dim)
    module = T.tbe(API, w0, "rowwise", pooling=pooling)
    indices, offsets, _, weights = batch(np.random.default_rng(6), dim, weighted=weighted)
    torch = API.torch
    want = module(torch.from_numpy(indices), torch.from_numpy(offsets),
                  per_sample_weights=None if weights is None else torch.from_numpy(weights)).detach().numpy()
    got = fa.embedding_bag(w0, indices, offsets, mode=pooling, per_sample_weights=weights)
    assert_close(np.asarray(got), want, RTOL, "pooled rows")


# =========================================================================== (c) fastadapt Adagrad vs EXACT_ADAGRAD

def test_adagrad_rowgrad_matches_fbgemm_exact_adagrad():
    """fa.Adagrad (torch's Adagrad, lr_decay 0) with a RowGrad of the lookups = FBGEMM
    EXACT_ADAGRAD, weights and accumulator, after every step."""
    dim, lr, eps = 20, 0.05, 1e-8
    w0 = table(dim)
    module = T.tbe(API, w0, "adagrad", lr=lr, eps=eps)
    w = w0.copy()
    opt = fa.Adagrad([w], lr=lr, eps=eps)
    rng = np.random.default_rng(7)
    for step in range(STEPS):
        indices, offsets, grad_out, _ = batch(rng, dim)
        fbgemm_step(module, indices, offsets, grad_out)
        opt.step([fa.RowGrad(*lookups(indices, offsets, grad_out, dim))])
        assert_close(w, T.tbe_weights(module), RTOL, f"weights, step {step}")
        assert_close(np.asarray(opt.state[0]["sum"]).reshape(-1), T.tbe_momentum(module).reshape(-1), RTOL,
                     f"sum, step {step}")


# =========================================================================== the benchmark

def test_tables_bench_quick(tmp_path, capsys):
    """bench/tables.py --quick runs, prints its sections and targets, and writes every figure."""
    import json

    path = tmp_path / "tables.json"
    assert T.main(["--quick", "--rounds", "1", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    out = json.loads(path.read_text())
    assert out["nrows"] == 20_000 and out["dim"] == 64 and out["rounds"] == 1
    assert out["cpu"] in text and "threads" in text and out["info"]["numba_threads"] >= 1
    assert [r["density"] for r in out["densities"]] == [0.001, 0.01, 0.1]
    for r in out["densities"]:
        assert r["fbgemm_rowwise_ms"] > 0 and r["fbgemm_adagrad_ms"] > 0 and r["fa_adagrad_ms"] > 0
        assert r["x_adagrad"] > 0
    labels = [t["label"] for t in out["targets"]] + out["not_measured"]
    assert len(labels) == 11 and "target" in text
    if hasattr(fa, "RowwiseAdagrad") and hasattr(fa, "BagGrad"):
        assert not out["not_measured"] and not out["notes"]
        assert all(r["x_rowwise_rowgrad"] > 0 and r["x_rowwise_baggrad"] > 0 for r in out["densities"])
        assert out["bags"]["x_baggrad_vs_numpy"] > 0 and out["floor"]["of_floor"] > 0
    else:
        assert any("lacks" in n for n in out["notes"]) and "not measured" in text
