"""Training quality with compressed optimizer state (issue #13): ``python bench/compressed_quality.py``.

Final loss (and accuracy / recall) with ``state_dtype`` None (float32), "bfloat16", "int8", and
"bfloat16" with ``state_rounding="nearest"``, and each one's relative difference from float32
state.  The issue's bar: within 1 % relative.

(a) The seed's linear regression (``fastadapt.apps.demo.make_data``: 1000 x 10, batches of 32,
    the seed's hyper-parameters), with the seed's three optimizers.  ``demo.train`` trains a
    float64 ``theta`` and state_dtype is for float32 parameters, so the same loop runs here in
    float32 (:func:`train_regression`).  The parameter has 10 elements, below
    ``fastadapt.config.STATE_COMPRESS_MIN`` (4096), whose state stays float32: the tasks set
    ``STATE_COMPRESS_MIN = 0`` (:func:`compress_everything`) so that compression applies.
(b) A 2-layer MLP (float32, numpy backprop, Adam, mini-batches) on a generated 10-class task
    (scikit-learn's digits when importable and ``--digits`` is given): held-out loss and accuracy.
    One Adam per parameter (``split=True``, the same arithmetic as one Adam over all four): when
    this was written, one optimizer over several parameters with compressed state failed in the
    many-tensor path (``optim/many.py``: ``CompressedBuffer`` has no ``reshape``), even with the
    default ``STATE_COMPRESS_MIN``; (b') tries one optimizer and reports what it raises.
(c) The recommender example (``fastadapt.apps.recsys.train``, BPR with Adam and RowGrad steps):
    recall@10.  Where RowGrad steps refuse compressed state, the error is reported.

Every task takes seconds; ``tests/test_compressed_quality.py`` runs reduced versions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastadapt as fa  # noqa: E402
from fastadapt import config  # noqa: E402

#: label -> (state_dtype, state_rounding)
VARIANTS = {
    "float32": (None, "stochastic"),
    "bfloat16": ("bfloat16", "stochastic"),
    "bfloat16 nearest": ("bfloat16", "nearest"),
    "int8": ("int8", "stochastic"),
}

#: errors a step raises where compressed state is not supported for a gradient format
REFUSALS = (NotImplementedError, ValueError, TypeError, AttributeError)


@contextlib.contextmanager
def compress_everything():
    """``config.STATE_COMPRESS_MIN = 0`` inside the block: every float32 parameter's state is
    compressed, however small."""
    old = config.STATE_COMPRESS_MIN
    config.STATE_COMPRESS_MIN = 0
    try:
        yield
    finally:
        config.STATE_COMPRESS_MIN = old


def rel(x, ref):
    """Relative difference ``(x - ref) / |ref|``."""
    return (x - ref) / abs(ref)


# =========================================================================== (a) regression

SEED_OPTIMIZERS = {
    "Adagrad": lambda params, **kw: fa.Adagrad(params, lr=0.1, eps=1e-8, **kw),
    "RMSprop": lambda params, **kw: fa.RMSprop(params, lr=0.01, alpha=0.9, eps=1e-8, **kw),
    "Adam": lambda params, **kw: fa.Adam(params, lr=0.01, betas=(0.9, 0.999), eps=1e-8, **kw),
}


def train_regression(optimizer="Adam", state_dtype=None, rounding="stochastic", epochs=50, batch_size=32,
                     seed=42):
    """``fastadapt.apps.demo.train``'s loop in float32 (theta, X, y): the last epoch's MSE."""
    from fastadapt.apps.demo import make_data

    X, y, _, rng = make_data(seed)
    X, y = X.astype(np.float32), y.astype(np.float32)
    n, d = X.shape
    theta = np.zeros(d, np.float32)
    opt = SEED_OPTIMIZERS[optimizer]([theta], state_dtype=state_dtype, state_rounding=rounding)
    loss = None
    for _ in range(epochs):
        order = rng.permutation(n)
        Xs, ys = X[order], y[order]
        sse = 0.0
        for lo in range(0, n, batch_size):
            Xb, yb = Xs[lo:lo + batch_size], ys[lo:lo + batch_size]
            r = Xb @ theta - yb
            sse += float(r @ r)
            opt.step([(2 * Xb.T @ r / np.float32(len(yb))).astype(np.float32)])
        loss = sse / n
    return {"loss": loss}


# =========================================================================== (b) MLP

def make_classification(n=3000, d=32, classes=10, hidden=16, noise=0.5, seed=0):
    """A 10-class task a linear model cannot solve: labels from a random 1-hidden-layer teacher
    (tanh), inputs Gaussian, plus Gaussian noise on the teacher's logits.  Returns train and test
    splits (4:1), float32."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    W1 = rng.standard_normal((d, hidden)) / np.sqrt(d)
    W2 = rng.standard_normal((hidden, classes)) * 2.0
    logits = np.tanh(X @ W1 * 2.0) @ W2 + noise * rng.standard_normal((n, classes))
    y = logits.argmax(1)
    cut = n * 4 // 5
    return X[:cut], y[:cut], X[cut:], y[cut:]


def load_digits():
    """scikit-learn's digits (8x8 images, 10 classes) as the same splits, or None."""
    try:
        from sklearn.datasets import load_digits as ld
    except ImportError:
        return None
    data = ld()
    X = (data.data / 16.0).astype(np.float32)
    y = data.target
    idx = np.random.default_rng(0).permutation(len(y))
    X, y = X[idx], y[idx]
    cut = len(y) * 4 // 5
    return X[:cut], y[:cut], X[cut:], y[cut:]


def _forward(params, X):
    W1, b1, W2, b2 = params
    h = np.maximum(X @ W1 + b1, 0)
    z = h @ W2 + b2
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    return h, p


def _loss_acc(params, X, y):
    _, p = _forward(params, X)
    loss = float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))
    return loss, float(np.mean(p.argmax(1) == y))


def train_mlp(state_dtype=None, rounding="stochastic", epochs=5, batch_size=64, hidden=512, lr=1e-3,
              data=None, seed=0, split=True):
    """A ReLU MLP (d -> hidden -> classes), softmax cross-entropy, Adam, float32: held-out and
    training loss and accuracy after ``epochs``."""
    Xtr, ytr, Xte, yte = make_classification() if data is None else data
    d, classes = Xtr.shape[1], int(max(ytr.max(), yte.max())) + 1
    rng = np.random.default_rng(seed)
    params = [(rng.standard_normal((d, hidden)) * np.sqrt(2 / d)).astype(np.float32),
              np.zeros(hidden, np.float32),
              (rng.standard_normal((hidden, classes)) * np.sqrt(1 / hidden)).astype(np.float32),
              np.zeros(classes, np.float32)]
    if split:
        opts = [fa.Adam([p], lr=lr, state_dtype=state_dtype, state_rounding=rounding) for p in params]

        def step(grads):
            for o, g in zip(opts, grads):
                o.step([g])
    else:
        step = fa.Adam(params, lr=lr, state_dtype=state_dtype, state_rounding=rounding).step
    n = len(ytr)
    for _ in range(epochs):
        order = rng.permutation(n)
        for lo in range(0, n, batch_size):
            idx = order[lo:lo + batch_size]
            Xb, yb = Xtr[idx], ytr[idx]
            h, p = _forward(params, Xb)
            dz = p
            dz[np.arange(len(yb)), yb] -= 1
            dz /= np.float32(len(yb))
            dh = (dz @ params[2].T) * (h > 0)
            step([Xb.T @ dh, dh.sum(0), h.T @ dz, dz.sum(0)])
    test_loss, test_acc = _loss_acc(params, Xte, yte)
    train_loss, train_acc = _loss_acc(params, Xtr, ytr)
    return {"loss": test_loss, "accuracy": test_acc, "train_loss": train_loss, "train_accuracy": train_acc}


# =========================================================================== (c) recsys

def train_recsys(state_dtype=None, rounding="stochastic", users=3000, items=1000, interactions=60_000,
                 epochs=3, batch_size=1024, dim=32, seed=0):
    """``fastadapt.apps.recsys.train`` with Adam (``state_dtype`` passed through its optimizer
    table, restored afterwards), RowGrad gradients: the last epoch's loss and recall@10."""
    import functools

    from fastadapt.apps import recsys

    R = recsys.generate_interactions(users, items, interactions, topics=20, seed=seed)
    train, tu, ti = recsys.split_leave_one_out(R, seed)
    saved = recsys.OPTIMIZERS["adam"]
    recsys.OPTIMIZERS["adam"] = (functools.partial(fa.Adam, state_dtype=state_dtype, state_rounding=rounding),
                                 saved[1])
    try:
        out = recsys.train(train, tu, ti, dim=dim, epochs=epochs, batch_size=batch_size, optimizer="adam",
                           seed=seed, log=None, progress=False)
    finally:
        recsys.OPTIMIZERS["adam"] = saved
    last = out["epochs"][-1]
    return {"loss": last["loss"], "recall": last["recall"]}


# =========================================================================== driver

def compare(task, variants=VARIANTS, compress_all=True, **kw):
    """Run ``task`` (a function returning a dict with "loss") once per variant, with
    :func:`compress_everything` when ``compress_all``; return label -> result dict (with "rel_loss" vs float32, and
    "error" instead where the variant raised one of :data:`REFUSALS`)."""
    out = {}
    with (compress_everything() if compress_all else contextlib.nullcontext()):
        for label, (sd, rounding) in variants.items():
            t0 = time.perf_counter()
            try:
                r = task(state_dtype=sd, rounding=rounding, **kw)
            except REFUSALS as e:
                out[label] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
                continue
            r["seconds"] = time.perf_counter() - t0
            out[label] = r
    ref = out.get("float32", {})
    for r in out.values():
        if "error" in r or "error" in ref:
            continue
        for key in ("loss", "accuracy", "recall"):
            if key in r:
                r[f"rel_{key}"] = rel(r[key], ref[key])
    return out


def _print(title, results, keys):
    print(title)
    print(f"   {'state':<18}" + "".join(f"{k:>12}{'rel':>9}" for k in keys) + f"{'s':>7}")
    for label, r in results.items():
        if "error" in r:
            print(f"   {label:<18}skipped: {r['error']}")
            continue
        print(f"   {label:<18}" + "".join(f"{r[k]:>12.5f}{r.get('rel_' + k, 0.0) * 100:>8.2f}%" for k in keys)
              + f"{r['seconds']:>7.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", action="store_true", help="(b) on scikit-learn's digits, if importable")
    parser.add_argument("--no-recsys", action="store_true", help="skip (c)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    print("python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))))
    print(f"(config.STATE_COMPRESS_MIN set to 0 in (a), (b) and (c), so small parameters are compressed too; "
          f"'rel': relative difference from float32 state; the issue's bar is 1 %)\n")
    results = {}
    for name in SEED_OPTIMIZERS:
        results[f"regression {name}"] = compare(train_regression, optimizer=name)
        _print(f"(a) seed linear regression, {name}, 50 epochs, float32: final epoch MSE", results[f"regression {name}"],
               ["loss"])
    data = load_digits() if args.digits else None
    if args.digits and data is None:
        print("   (scikit-learn not importable: the generated task instead)")
    results["mlp"] = compare(train_mlp, data=data)
    results["mlp, one optimizer"] = compare(train_mlp, data=data, compress_all=False, split=False)
    _print(f"(b) MLP {'digits' if data is not None else 'generated 10-class task'}, Adam lr 1e-3, 5 epochs: "
           "held-out cross-entropy and accuracy\n    (one Adam per parameter, 32x512, 512, 512x10, 10; all compressed)",
           results["mlp"], ["loss", "accuracy"])
    _print("(b') the same with ONE Adam over the four parameters, default STATE_COMPRESS_MIN (the biases "
           "keep float32 state)", results["mlp, one optimizer"], ["loss", "accuracy"])
    if not args.no_recsys:
        results["recsys"] = compare(train_recsys)
        _print("(c) recsys BPR, Adam, RowGrad, 3000 users x 1000 items, 3 epochs: loss and recall@10",
               results["recsys"], ["loss", "recall"])
    worst = [(task, label, abs(r["rel_loss"])) for task, res in results.items() for label, r in res.items()
             if "rel_loss" in r]
    if worst:
        task, label, w = max(worst, key=lambda t: t[2])
        print(f"\nlargest |relative loss difference|: {w * 100:.3f} % ({task}, {label}): "
              f"{'within' if w <= 0.01 else 'OUTSIDE'} the 1 % bar")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
