"""``python -m fastadapt recsys --compare``: the same data, factors and epochs in other systems.

Every system trains on the same training matrix and is scored by the same
:func:`~fastadapt.apps.recsys.recall_at_k` on the same held-out items:

* ``implicit`` BPR (``implicit.cpu.bpr.BayesianPersonalizedRanking``: Cython, hogwild SGD over
  single triples, its own negatives), epoch times from its per-epoch callback;
* torch: the bag model (``nn.Embedding(sparse=True)`` for the user and item tables,
  ``nn.EmbeddingBag(mode="mean", sparse=True)`` for the context table) on the same batches and
  negatives, with ``torch.optim.SparseAdam`` and with ``torch.optim.Adagrad``;
* fastadapt: BPR and the bag model (:func:`fastadapt.apps.recsys.train`).

``app`` is :mod:`fastadapt.apps.recsys`, which calls :func:`compare` with itself (its data,
training and recall functions): this module imports nothing of the application, so the two do
not import each other.  A package that is not installed is skipped with a message.  Times are seconds per epoch,
training only (evaluation excluded), the first epoch excluded where there are several (it
compiles).
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np


__all__ = ["compare", "implicit_bpr", "torch_bag"]


def _steady(seconds: List[float]) -> float:
    return float(np.mean(seconds[1:] if len(seconds) > 1 else seconds))


def implicit_bpr(app: Any, R_train: Any, test_users: Any, test_items: Any, *, dim: int, epochs: int, lr: float,
                 reg: float, k: int, seed: int, threads: int = 2) -> Dict[str, Any]:
    """Train ``implicit``'s CPU BPR; ``{"seconds": per epoch, "recall": final}``.

    ``implicit`` learns ``factors`` columns of which one is an item bias (the users' is 1), so
    it is given ``dim + 1`` to have ``dim`` latent factors as the others do.
    """
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    times: List[float] = []
    last = [0.0]

    def callback(epoch: int, elapsed: float, *_: Any) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    model = BayesianPersonalizedRanking(factors=dim + 1, learning_rate=lr, regularization=reg,
                                        iterations=epochs, num_threads=threads, random_state=seed)
    last[0] = time.perf_counter()
    model.fit(R_train.tocsr(), show_progress=False, callback=callback)
    recall = app.recall_at_k(np.asarray(model.user_factors), np.asarray(model.item_factors), R_train,
                                test_users, test_items, k)
    return {"seconds": times, "recall": recall}


def torch_bag(app: Any, R_train: Any, test_users: Any, test_items: Any, *, optimizer: str, dim: int, epochs: int,
              batch_size: int, lr: float, reg: float, history: int, k: int, seed: int) -> Dict[str, Any]:
    """The bag model in torch (sparse embeddings), on the batches and negatives of
    :func:`fastadapt.apps.recsys.train` (same seed), with its loss: the sum over the batch of
    ``softplus(-x)`` plus ``reg / 2`` times the squared norms of the user rows, bag means and item
    rows used.  ``optimizer``: ``"sparseadam"`` or ``"adagrad"``."""
    import warnings

    import torch
    from torch import nn

    warnings.filterwarnings("ignore", message="Sparse invariant checks")   # torch's Adagrad, sparse grads
    torch.manual_seed(seed)
    n_users, n_items = R_train.shape
    init = np.random.default_rng(seed)
    P0 = (init.standard_normal((n_users, dim)) * 0.1).astype(np.float32)
    Q0 = (init.standard_normal((n_items, dim)) * 0.1).astype(np.float32)
    C0 = (init.standard_normal((n_items, dim)) * 0.1).astype(np.float32)
    P = nn.Embedding(n_users, dim, sparse=True, _weight=torch.from_numpy(P0.copy()))
    Q = nn.Embedding(n_items, dim, sparse=True, _weight=torch.from_numpy(Q0.copy()))
    C = nn.EmbeddingBag(n_items, dim, mode="mean", sparse=True, _weight=torch.from_numpy(C0.copy()))
    params = list(P.parameters()) + list(C.parameters()) + list(Q.parameters())
    opt = (torch.optim.SparseAdam(params, lr=lr) if optimizer == "sparseadam"
           else torch.optim.Adagrad(params, lr=lr))
    hist_ptr, hist_idx = app.user_histories(R_train, history, seed)
    users_all = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(R_train.indptr))
    items_all = R_train.indices.astype(np.int64)
    n = users_all.size
    times: List[float] = []
    from . import recsys_kernels as K
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(n)
        negatives = rng.integers(0, n_items, n)
        users_ep, pos_ep, neg_ep = users_all[order], items_all[order], negatives[order]
        for b in range(0, n, batch_size):
            users = torch.from_numpy(users_ep[b:b + batch_size])
            pos = torch.from_numpy(pos_ep[b:b + batch_size])
            neg = torch.from_numpy(neg_ep[b:b + batch_size])
            urows, slot = torch.unique(users, return_inverse=True)
            indices, offsets = K.gather_bags(hist_ptr, hist_idx, urows.numpy())
            M = C(torch.from_numpy(indices), torch.from_numpy(offsets[:-1]))
            pu = P(urows)
            X = (pu + M)[slot]
            qp, qn = Q(pos), Q(neg)
            x = (X * (qp - qn)).sum(1)
            counts = torch.bincount(slot, minlength=urows.numel()).to(X.dtype)[:, None]
            l2 = (counts * (pu * pu + M * M)).sum() + (qp * qp).sum() + (qn * qn).sum()
            loss = nn.functional.softplus(-x).sum() + 0.5 * reg * l2
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - start)
    with torch.no_grad():
        Pw, Cw, Qw = P.weight.numpy(), C.weight.numpy(), Q.weight.numpy()
        X = Pw + recsys_mean_bags(Cw, hist_ptr, hist_idx)
    recall = app.recall_at_k(X, Qw, R_train, test_users, test_items, k)
    return {"seconds": times, "recall": recall}


def recsys_mean_bags(C: Any, ptr: Any, idx: Any) -> Any:
    """Mean of ``C``'s rows per bag, in numpy (the torch run's evaluation, independent of fastadapt)."""
    sizes = np.diff(ptr)
    out = np.zeros((sizes.size, C.shape[1]), C.dtype)
    np.add.at(out, np.repeat(np.arange(sizes.size), sizes), C[idx])
    return out / np.maximum(sizes, 1)[:, None]


def compare(app: Any, R_train: Any, test_users: Any, test_items: Any, *, dim: int, epochs: int, batch_size: int,
            optimizer: str, lr: Optional[float], reg: float, history: int, k: int, seed: int,
            progress: bool = False, log: Callable[[str], None] = print,
            implicit_lr: float = 0.01, torch_lr: Optional[Dict[str, float]] = None) -> List[Dict[str, Any]]:
    """Train every available system; log a table and return its rows
    ``{"system", "seconds", "recall"}`` (``seconds``: per epoch, steady)."""
    rows: List[Dict[str, Any]] = []
    torch_lr = dict({"sparseadam": 5e-3, "adagrad": 0.1}, **(torch_lr or {}))

    def add(system: str, result: Dict[str, Any]) -> None:
        row = {"system": system, "seconds": _steady(result["seconds"]), "recall": result["recall"]}
        rows.append(row)
        log(f"  {system:<40} {row['seconds']:8.3f} s/epoch   recall@{k} {row['recall']:.4f}")

    log(f"comparison: dim {dim}, {epochs} epochs, batch {batch_size} (implicit: single triples), "
        f"recall@{k} on {len(test_users):,} held-out items; seconds per epoch"
        + (" after the first" if epochs > 1 else ""))
    if importlib.util.find_spec("implicit") is None:
        log("  implicit: not installed, skipped (pip install implicit)")
    else:
        add(f"implicit BPR (CPU, 2 threads, lr {implicit_lr:g})",
            implicit_bpr(app, R_train, test_users, test_items, dim=dim, epochs=epochs, lr=implicit_lr, reg=reg, k=k,
                         seed=seed))
    if importlib.util.find_spec("torch") is None:
        log("  torch: not installed, skipped (pip install torch)")
    else:
        for name, label in (("sparseadam", "SparseAdam"), ("adagrad", "Adagrad")):
            add(f"torch bag model, {label} (lr {torch_lr[name]:g})",
                torch_bag(app, R_train, test_users, test_items, optimizer=name, dim=dim, epochs=epochs,
                          batch_size=batch_size, lr=torch_lr[name], reg=reg, history=history, k=k, seed=seed))
    for model in ("bpr", "bag"):
        res = app.train(R_train, test_users, test_items, model=model, dim=dim, epochs=epochs,
                           batch_size=batch_size, optimizer=optimizer, lr=lr, reg=reg, history=history, k=k,
                           seed=seed, log=None, progress=progress)
        add(f"fastadapt {'BPR' if model == 'bpr' else 'bag model'}, {app.OPTIMIZERS[optimizer][0].__name__}",
            {"seconds": [e["seconds"] for e in res["epochs"]], "recall": res["epochs"][-1]["recall"]})
    return rows
