"""``python -m fastadapt recsys``: matrix factorisation (BPR) on implicit feedback, with sparse steps.

The interactions are a scipy CSR matrix (users x items, 1 = interacted).  By default it is
generated (seeded): items have Zipf-like popularity, users have log-normal activity, and every
user has a taste -- one of ``--topics`` item groups -- from which most of their items come, so
that there is structure to learn.  ``--data PATH`` reads a MovieLens-style file instead: one
``user item rating [timestamp]`` per line, separated by whitespace, tabs, commas or ``::``
(ratings >= ``--min-rating`` count as interactions).

One interaction per user (with at least two) is held out.  The model is BPR (Rendle et al.
2009): user and item embeddings, score ``u . v``, loss ``-log sigmoid(u . v_pos - u . v_neg)``
with one uniformly drawn negative item per training interaction, plus L2 on the rows used.
Each mini-batch touches a few thousand rows of the two tables, so its gradients are sparse:
they are given to the optimizer as :class:`fastadapt.RowGrad` (or, with ``--grad-format csr``,
as scipy CSR matrices), and only those rows are updated (``--mode lazy``) or the result is the
dense step's (``--mode exact``).

``--model bag`` adds a context table ``C``: the user vector is ``P[u] + mean(C[bag(u)])`` over
``--history`` of the user's training items (:func:`fastadapt.embedding_bag` forward; the gradient of
``C`` is a :class:`fastadapt.BagGrad`).  Both models' gradients are numba kernels
(:mod:`fastadapt.apps.recsys_kernels`) that give the optimizer unique ascending rows;
:func:`bpr_gradients` is the numpy reference.  ``--compare`` trains implicit's BPR, the bag model in
torch and fastadapt's two models on the same data (:mod:`fastadapt.apps.recsys_compare`).

Per epoch it reports the held-out recall@k (the held-out item among the top k unseen items, on
``--eval-users`` sampled users) and the training time; then it trains again from the same start
with the same batches and negatives, but with dense gradients (the tables' shape, zero outside
the batch's rows) and dense steps, and reports that time and metric too.  ``--quick`` is a small
problem for a smoke test.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

import fastadapt as fa

from .progress import Progress

__all__ = ["DEFAULT_LR", "OPTIMIZERS", "generate_interactions", "load_interactions", "split_leave_one_out",
           "bpr_gradients", "bpr_sparse_gradients",
           "user_histories", "bag_gradients", "bag_rows", "all_user_vectors", "recall_at_k", "train", "add_arguments", "run"]

#: the optimizers offered, by their fastadapt class name, with the learning rate used when
#: ``--lr`` is not given (tuned on the generated data)
DEFAULT_LR = {"Adagrad": 0.1, "RMSprop": 3e-3, "Adam": 5e-3}

#: lower-case name -> (fastadapt class, default learning rate), derived from :data:`DEFAULT_LR`
OPTIMIZERS = {name.lower(): (getattr(fa, name), lr) for name, lr in DEFAULT_LR.items()}


# =========================================================================== data

def generate_interactions(
        n_users: int = 50_000,
        n_items: int = 20_000,
        n_interactions: int = 2_000_000,
        topics: int = 50,
        zipf: float = 1.0,
        taste: float = 0.8,
        seed: int = 0,
) -> Any:
    """A seeded implicit-feedback matrix with Zipf-like item popularity.

    Parameters
    ----------
    n_users, n_items : int
    n_interactions : int
        Distinct (user, item) pairs wanted (pairs are drawn until there are that many).
    topics : int
        Item groups; each user draws a fraction ``taste`` of their items from one group.
    zipf : float
        Popularity exponent: the item of popularity rank ``r`` (within its group, and
        overall) is drawn with probability proportional to ``1 / (r + 1) ** zipf``.
    taste : float
        Fraction of a user's interactions drawn from their group.
    seed : int

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n_users, n_items)`` float32, canonical (sorted, no duplicates), all ones, holding
        ``n_interactions`` entries (to within 0.1 %).
    """
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0.0, 1.0, n_users)
    activity /= activity.sum()
    user_topic = rng.integers(0, topics, n_users)
    # items of a topic are a contiguous block, popularity-ranked within it; overall ranks are
    # interleaved so that every topic has popular items
    per_topic = max(1, n_items // topics)
    n_target = min(int(n_interactions), n_users * n_items)

    def zipf_ranks(n: int, size: int) -> Any:
        w = 1.0 / np.arange(1, n + 1) ** zipf
        cdf = np.cumsum(w)
        return np.minimum(np.searchsorted(cdf, rng.random(size) * cdf[-1]), n - 1)

    def draw(size: int) -> Any:
        users = rng.choice(n_users, size=size, p=activity)
        in_topic = rng.random(size) < taste
        items = np.empty(size, np.int64)
        m = int(in_topic.sum())
        items[in_topic] = np.minimum(user_topic[users[in_topic]] * per_topic + zipf_ranks(per_topic, m),
                                     n_items - 1)
        overall = zipf_ranks(n_items, size - m)
        items[~in_topic] = ((overall % topics) * per_topic + overall // topics) % n_items
        return users * n_items + items

    # repeated pairs merge: draw more until the matrix holds the requested count (a few rounds)
    keys = np.unique(draw(n_target))
    for _ in range(8):
        missing = n_target - keys.size
        if missing <= n_target // 1000:
            break
        keys = np.unique(np.concatenate([keys, draw(2 * missing)]))
    keys = keys[np.sort(rng.permutation(keys.size)[:n_target])] if keys.size > n_target else keys
    return sp.csr_matrix((np.ones(keys.size, np.float32), (keys // n_items, keys % n_items)),
                         shape=(n_users, n_items))


def load_interactions(path: str, min_rating: float = 0.0) -> Any:
    """Read a MovieLens-style ``user item rating [timestamp]`` file into a CSR matrix.

    Separators may be whitespace, tabs, commas or ``::``; a non-numeric first line (a
    header) is skipped.  User and item ids are mapped to ``0 .. n - 1`` in sorted order;
    ratings ``>= min_rating`` become interactions.

    Returns
    -------
    scipy.sparse.csr_matrix
        users x items, float32 ones.
    """
    import scipy.sparse as sp

    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().replace("::", " ").replace(",", " ").replace("\t", " ").splitlines()
    lines = [ln for ln in lines if ln.strip()]
    if lines and not _numeric(lines[0].split()[0]):
        lines = lines[1:]
    if not lines:
        raise ValueError(f"{path}: no interactions found (expected lines 'user item rating')")
    width = len(lines[0].split())
    if width < 2:
        raise ValueError(f"{path}: each line needs at least 'user item', got {lines[0]!r}")
    try:
        table = np.array([ln.split()[:3] for ln in lines], dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"{path}: could not read 'user item rating' numbers ({e})") from None
    if table.shape[1] >= 3:
        table = table[table[:, 2] >= min_rating]
        if not table.shape[0]:
            raise ValueError(f"{path}: no rating is >= {min_rating:g} (--min-rating)")
    _, users = np.unique(table[:, 0], return_inverse=True)
    _, items = np.unique(table[:, 1], return_inverse=True)
    R = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)),
                      shape=(int(users.max()) + 1, int(items.max()) + 1))
    R.sum_duplicates()
    R.data[:] = 1.0
    return R


def _numeric(token: Any) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def split_leave_one_out(R: Any, seed: int = 0) -> Tuple[Any, np.ndarray, np.ndarray]:
    """Hold out one random interaction of every user who has at least two.

    Returns
    -------
    train : csr_matrix
        ``R`` without the held-out entries.
    test_users, test_items : ndarray of int64
        The held-out (user, item) pairs.
    """
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    counts = np.diff(R.indptr)
    test_users = np.flatnonzero(counts >= 2)
    pos = R.indptr[test_users] + (rng.random(test_users.size) * counts[test_users]).astype(np.int64)
    test_items = R.indices[pos].astype(np.int64)
    keep = np.ones(R.nnz, bool)
    keep[pos] = False
    rows = np.repeat(np.arange(R.shape[0]), counts)[keep]
    train = sp.csr_matrix((R.data[keep], (rows, R.indices[keep])), shape=R.shape)
    return train, test_users, test_items


# =========================================================================== model

def bpr_gradients(U: Any, V: Any, users: Any, pos: Any, neg: Any, reg: Any) -> Any:
    """BPR loss and its gradients for one mini-batch.

    Parameters
    ----------
    U, V : ndarray (n_users, dim), (n_items, dim)
    users, pos, neg : ndarray of int64, shape (b,)
        Each triple says: ``users[t]`` prefers ``pos[t]`` to ``neg[t]``.
    reg : float
        L2 weight on the rows used.

    Returns
    -------
    loss : float
        Mean of ``-log sigmoid(x)``.
    gU : ndarray (b, dim)
        Gradient rows of ``U`` at ``users`` (a user may repeat: the rows are summed by the
        optimizer).
    item_rows : ndarray (2b,)
        ``concatenate([pos, neg])``.
    gV : ndarray (2b, dim)
        Gradient rows of ``V`` at ``item_rows``.
    """
    u, vp, vn = U[users], V[pos], V[neg]
    diff = vp - vn
    x = np.einsum("ij,ij->i", u, diff)
    s = (1.0 / (1.0 + np.exp(x))).astype(U.dtype)[:, None]      # sigmoid(-x) = -d/dx log sigmoid(x)
    dt = U.dtype.type
    gU = -s * diff + dt(reg) * u
    gV = np.concatenate([-s * u + dt(reg) * vp, s * u + dt(reg) * vn])
    loss = float(np.mean(np.logaddexp(0.0, -x)))
    return loss, gU, np.concatenate([pos, neg]), gV


def recall_at_k(U: Any, V: Any, train: Any, users: Any, items: Any, k: int = 10, block: int = 512) -> float:
    """Fraction of held-out items ranked in the top ``k`` of the items the user has not seen.

    Parameters
    ----------
    U, V : ndarray
    train : csr_matrix
        Training interactions (excluded from the ranking).
    users, items : ndarray
        Held-out pairs to evaluate.
    """
    hits = 0
    for a in range(0, users.size, block):
        bu, bi = users[a:a + block], items[a:a + block]
        scores = U[bu] @ V.T
        sub = train[bu]
        scores[np.repeat(np.arange(bu.size), np.diff(sub.indptr)), sub.indices] = -np.inf
        target = scores[np.arange(bu.size), bi]
        # rank = number of items scoring strictly higher than the held-out one
        hits += int(np.count_nonzero((scores > target[:, None]).sum(axis=1) < k))
    return hits / max(1, users.size)


def bpr_sparse_gradients(U: Any, V: Any, users: Any, pos: Any, neg: Any, reg: Any,
                         groupers: Optional[Tuple[Any, Any]] = None) -> Any:
    """:func:`bpr_gradients` in numba, summed per row (:mod:`fastadapt.apps.recsys_kernels`).

    Parameters
    ----------
    U, V, users, pos, neg, reg
        As :func:`bpr_gradients` (``users``, ``pos``, ``neg`` int64).
    groupers : (Grouper, Grouper), optional
        Of ``U``'s and ``V``'s rows; kept between batches (each holds a counter per row).

    Returns
    -------
    loss : float
    urows, gU : ndarray
        Unique ascending user rows and their summed gradients (C-contiguous, ``U``'s dtype).
    irows, gV : ndarray
        The same for the items.
    """
    from . import recsys_kernels as K

    gu, gi = groupers if groupers is not None else (K.Grouper(U.shape[0]), K.Grouper(V.shape[0]))
    s = np.empty(users.size, np.float64)
    losses = np.empty(users.size, np.float64)
    K.pair_scores(U, users, V, pos, neg, s, losses)
    urows, starts, order, _ = gu(users)
    gU = np.empty((urows.size, U.shape[1]), U.dtype)
    K.user_grads(V, pos, neg, s, order, starts, U, urows, reg, gU)
    irows, starts, order, _ = gi(np.concatenate([pos, neg]))
    gV = np.empty((irows.size, V.shape[1]), V.dtype)
    K.item_grads(U, users, s, order, starts, V, irows, reg, gV)
    return float(losses.mean()) if losses.size else 0.0, urows, gU, irows, gV


def user_histories(R_train: Any, history: int = 20, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Every user's bag for the bag model: ``history`` of their training items.

    The generated matrix and the files read carry no time order, so a seeded sample of the
    user's training items stands in for the most recent ones (all of them for a user with at
    most ``history``).

    Returns
    -------
    ptr, idx : ndarray of int64
        CSR-style: user ``u``'s bag is ``idx[ptr[u]:ptr[u+1]]`` (ascending item ids).
    """
    counts = np.diff(R_train.indptr)
    rows = np.repeat(np.arange(R_train.shape[0], dtype=np.int64), counts)
    shuffle = np.lexsort((np.random.default_rng([seed, 7]).random(rows.size), rows))
    rank = np.arange(rows.size) - R_train.indptr[rows]         # position in the user's shuffled list
    keep = np.zeros(rows.size, bool)
    keep[shuffle[rank < history]] = True
    ptr = np.zeros(R_train.shape[0] + 1, np.int64)
    np.cumsum(np.minimum(counts, history), out=ptr[1:])
    return ptr, R_train.indices[keep].astype(np.int64)


def bag_gradients(P: Any, C: Any, Q: Any, hist_ptr: Any, hist_idx: Any, users: Any, pos: Any, neg: Any,
                  reg: Any, groupers: Optional[Tuple[Any, Any]] = None) -> Any:
    """The bag model's loss and gradients for one mini-batch (numba, :mod:`~fastadapt.apps.recsys_kernels`).

    The user vector is ``P[u] + mean(C[bag(u)])`` (the bag: :func:`user_histories`, its mean
    by :func:`fastadapt.embedding_bag`), the score ``user vector . Q[i]``, the loss
    ``-log sigmoid(score(pos) - score(neg))`` plus ``reg / 2`` times the squared norms of
    ``P[u]``, the bag's mean, ``Q[pos]`` and ``Q[neg]`` (once per use).

    Returns
    -------
    loss : float
        Mean of ``-log sigmoid(x)``.
    grads : list
        ``[RowGrad for P, BagGrad for C, RowGrad for Q]``; the row gradients have unique
        ascending rows, the bags are those of the batch's unique users.
    """
    from . import recsys_kernels as K

    gu, gi = groupers if groupers is not None else (K.Grouper(P.shape[0]), K.Grouper(Q.shape[0]))
    dim = P.shape[1]
    urows, starts, order, slot = gu(users)
    indices, offsets = K.gather_bags(hist_ptr, hist_idx, urows)
    M = np.ascontiguousarray(fa.embedding_bag(C, indices, offsets, mode="mean"), dtype=P.dtype)
    X = np.empty((urows.size, dim), P.dtype)
    K.user_vectors(P, urows, M, X)
    s = np.empty(users.size, np.float64)
    losses = np.empty(users.size, np.float64)
    K.pair_scores(X, slot, Q, pos, neg, s, losses)
    gP = np.empty_like(X)
    gM = np.empty_like(X)
    K.bag_user_grads(Q, pos, neg, s, order, starts, P, urows, M, reg, gP, gM)
    irows, istarts, iorder, _ = gi(np.concatenate([pos, neg]))
    gQ = np.empty((irows.size, dim), Q.dtype)
    K.item_grads(X, slot, s, iorder, istarts, Q, irows, reg, gQ)
    loss = float(losses.mean()) if losses.size else 0.0
    return loss, [fa.RowGrad(urows, gP), fa.BagGrad(indices, offsets, gM, mode="mean"), fa.RowGrad(irows, gQ)]


def bag_rows(g: Any) -> Tuple[np.ndarray, np.ndarray]:
    """A mean-mode ``BagGrad``'s ``(rows, values)``: one row per lookup, ``grad_out[bag] / size``."""
    sizes = np.diff(g.offsets)
    per = (g.grad_out / np.maximum(sizes, 1)[:, None]).astype(g.grad_out.dtype)
    return np.asarray(g.indices), np.repeat(per, sizes, axis=0)


def all_user_vectors(P: Any, C: Any, hist_ptr: Any, hist_idx: Any) -> Any:
    """The bag model's user vectors of every user (for the evaluation)."""
    return P + np.asarray(fa.embedding_bag(C, hist_idx, hist_ptr, mode="mean"), P.dtype)


def _as_csr(rows: Any, values: Any, shape: Any) -> Any:
    """A gradient as a scipy CSR (duplicate rows summed by scipy's COO -> CSR)."""
    import scipy.sparse as sp

    dim = shape[1]
    return sp.csr_matrix((values.reshape(-1), (np.repeat(rows, dim), np.tile(np.arange(dim), rows.size))),
                         shape=shape)


def _as_dense(rows: Any, values: Any, shape: Any) -> Any:
    g = np.zeros(shape, values.dtype)
    np.add.at(g, rows, values)
    return g


def _convert(grads: Any, tables: Any, grad_format: str) -> Any:
    """The step's gradients in ``grad_format`` (``rows`` leaves them as they are)."""
    if grad_format == "rows":
        return grads
    out = []
    for g, T in zip(grads, tables):
        rows, values = (g.rows, g.values) if isinstance(g, fa.RowGrad) else bag_rows(g)
        if grad_format == "csr":
            out.append(_as_csr(rows, values, T.shape))
        elif isinstance(g, fa.RowGrad):             # unique rows: a plain assignment
            d = np.zeros(T.shape, values.dtype)
            d[rows] = values
            out.append(d)
        else:
            out.append(_as_dense(rows, values, T.shape))
    return out


def train(
        R_train: Any,
        test_users: Any,
        test_items: Any,
        *,
        model: str = "bpr",
        dim: int = 32,
        epochs: int = 5,
        batch_size: int = 8192,
        optimizer: str = "adagrad",
        lr: Any = None,
        mode: str = "lazy",
        grad_format: str = "rows",
        reg: float = 1e-4,
        history: int = 20,
        k: int = 10,
        seed: int = 0,
        dtype: Any = np.float32,
        log: Any = print,
        progress: bool = True,
        profile: Optional[Dict[str, float]] = None,
) -> Any:
    """Train BPR or the bag model on ``R_train``; return per-epoch results and the final tables.

    Parameters
    ----------
    R_train : csr_matrix
        Training interactions (users x items).
    test_users, test_items : ndarray
        Held-out pairs for recall@k.
    model : {"bpr", "bag"}
        ``bpr``: user and item tables ``U``, ``V``, score ``U[u] . V[i]``.  ``bag``: user, context
        and item tables ``P``, ``C``, ``Q``, score ``(P[u] + mean(C[bag(u)])) . Q[i]`` with the bags
        of :func:`user_histories` (``history`` items each); the gradient of ``C`` is a
        :class:`fastadapt.BagGrad`.
    dim, epochs, batch_size : int
    optimizer : {"adagrad", "rmsprop", "adam"}
    lr : float, optional
        Default per optimizer (:data:`OPTIMIZERS`).
    mode : {"lazy", "exact"}
        ``sparse_mode`` of the optimizer.
    grad_format : {"rows", "csr", "dense"}
        How the gradients are given: :class:`fastadapt.RowGrad` (and ``BagGrad``), scipy CSR, or
        dense arrays of the tables' shape (dense steps).
    reg : float
        L2 weight.
    history : int
        Bag size of the bag model.
    k : int
        recall@k.
    seed : int
        Initial tables, batch order and negatives depend on it only, so runs with different
        ``grad_format`` see the same batches.
    log : callable or None
        Called with one line per epoch.
    progress : bool
        Show a progress bar.
    profile : dict, optional
        Seconds spent in ``sample`` (batch indices, negatives), ``grad`` (the model's forward and
        gradients) and ``step`` (format conversion and the optimizer) are added to it.

    Returns
    -------
    dict
        ``epochs``: list of ``{"epoch", "loss", "recall", "seconds"}`` (seconds: training only,
        evaluation excluded), the tables (``U``, ``V``; for the bag model ``P``, ``C``, ``Q``) and
        ``users``: the user vectors evaluated.
    """
    from . import recsys_kernels as K

    if model not in ("bpr", "bag"):
        raise ValueError(f"model must be 'bpr' or 'bag', got {model!r}")
    cls, default_lr = OPTIMIZERS[optimizer]
    lr = default_lr if lr is None else lr
    n_users, n_items = R_train.shape
    init = np.random.default_rng(seed)
    U = (init.standard_normal((n_users, dim)) * 0.1).astype(dtype)
    V = (init.standard_normal((n_items, dim)) * 0.1).astype(dtype)
    if model == "bag":
        C = (init.standard_normal((n_items, dim)) * 0.1).astype(dtype)
        hist_ptr, hist_idx = user_histories(R_train, history, seed)
        tables = [U, C, V]
    else:
        tables = [U, V]
    opt = cls(tables, lr=lr, sparse_mode=mode)
    groupers = (K.Grouper(n_users), K.Grouper(n_items))
    users_all = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(R_train.indptr))
    items_all = R_train.indices.astype(np.int64)
    n = users_all.size
    nbatches = (n + batch_size - 1) // batch_size
    history_out = []
    label = {"rows": "RowGrad", "csr": "CSR", "dense": "dense"}[grad_format]
    prof = profile if profile is not None else {}
    for key in ("sample", "grad", "step"):
        prof.setdefault(key, 0.0)
    clock = time.perf_counter
    for epoch in range(1, epochs + 1):
        bar = Progress(nbatches, f"{label} epoch {epoch}/{epochs}", "batches", enabled=progress, leave=False)
        total_loss = 0.0
        start = clock()
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(n)
        negatives = rng.integers(0, n_items, n)
        users_ep, pos_ep, neg_ep = users_all[order], items_all[order], negatives[order]
        prof["sample"] += clock() - start
        for b in range(nbatches):
            t0 = clock()
            sl = slice(b * batch_size, (b + 1) * batch_size)
            users, pos, neg = users_ep[sl], pos_ep[sl], neg_ep[sl]
            t1 = clock()
            if model == "bag":
                loss, grads = bag_gradients(U, C, V, hist_ptr, hist_idx, users, pos, neg, reg, groupers)
            else:
                loss, urows, gU, irows, gV = bpr_sparse_gradients(U, V, users, pos, neg, reg, groupers)
                grads = [fa.RowGrad(urows, gU), fa.RowGrad(irows, gV)]
            t2 = clock()
            total_loss += loss * users.size
            opt.step(_convert(grads, tables, grad_format))
            t3 = clock()
            prof["sample"] += t1 - t0
            prof["grad"] += t2 - t1
            prof["step"] += t3 - t2
            bar.update(postfix=f"batch loss {loss:.4f}")
        seconds = clock() - start
        bar.close()
        X = all_user_vectors(U, C, hist_ptr, hist_idx) if model == "bag" else U
        recall = recall_at_k(X, V, R_train, test_users, test_items, k)
        history_out.append({"epoch": epoch, "loss": total_loss / n, "recall": recall, "seconds": seconds})
        if log is not None:
            log(f"  {label:>7} epoch {epoch}: loss {total_loss / n:.4f}  recall@{k} {recall:.4f}  "
                f"{seconds:.2f} s")
    out = {"epochs": history_out, "U": U, "V": V, "users": X if epochs else U}
    if model == "bag":
        out.update(P=U, C=C, Q=V)
    return out


# =========================================================================== CLI

#: what ``--quick`` changes (options given explicitly keep their value)
QUICK = {"users": 5_000, "items": 2_000, "interactions": 100_000, "epochs": 2, "batch_size": 2048}


class _Given(argparse.Action):
    """Stores the value and records that the option was given (so that ``--quick`` leaves it)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Union[str, Sequence[Any], None], option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastadapt recsys`` (defaults are shown by the CLI's help formatter)."""
    from .cli import non_negative_float, positive_float, positive_int

    g = parser.add_argument_group("data")
    g.add_argument("--data", metavar="PATH",
                   help="MovieLens-style file, one 'user item rating [timestamp]' per line, separated by "
                        "whitespace, tabs, commas or '::' (default: a generated matrix)")
    g.add_argument("--min-rating", metavar="RATING", type=float, default=0.0,
                   help="with --data: ratings >= this count as interactions")
    g.add_argument("--users", metavar="N", type=positive_int, default=50_000, action=_Given,
                   help="users of the generated matrix")
    g.add_argument("--items", metavar="N", type=positive_int, default=20_000, action=_Given,
                   help="items of the generated matrix")
    g.add_argument("--interactions", metavar="N", type=positive_int, default=2_000_000, action=_Given,
                   help="interactions (distinct user-item pairs) of the generated matrix")
    g.add_argument("--topics", metavar="N", type=positive_int, default=50,
                   help="item groups (tastes) of the generated matrix; a user draws most items from one")
    g = parser.add_argument_group("training")
    g.add_argument("--model", choices=["bpr", "bag"], default="bpr",
                   help="bpr: user and item embeddings; bag: the user vector adds the mean of a context "
                        "embedding over the user's --history training items (fastadapt.embedding_bag forward, "
                        "fastadapt.BagGrad gradient)")
    g.add_argument("--history", metavar="H", type=positive_int, default=20,
                   help="with --model bag: items in a user's bag")
    g.add_argument("--optimizer", type=str.lower, choices=list(OPTIMIZERS), default="adagrad",
                   help="the optimizer of both tables")
    g.add_argument("--mode", choices=["lazy", "exact"], default="lazy",
                   help="the optimizer's sparse_mode: update only the rows in the batch (lazy) or give "
                        "the dense step's result (exact)")
    g.add_argument("--grad-format", choices=["rows", "csr"], default="rows",
                   help="sparse gradients as fastadapt.RowGrad (rows) or scipy CSR matrices (csr)")
    g.add_argument("--lr", metavar="LR", type=positive_float, default=None,
                   help="learning rate (default: "
                        + ", ".join(f"{name.lower()} {lr:g}" for name, lr in DEFAULT_LR.items()) + ")")
    g.add_argument("--dim", metavar="N", type=positive_int, default=32, help="embedding dimension")
    g.add_argument("--epochs", metavar="N", type=positive_int, default=3, action=_Given, help="training epochs")
    g.add_argument("--batch-size", metavar="N", type=positive_int, default=4096, action=_Given,
                   help="interactions per mini-batch (one sparse step each)")
    g.add_argument("--reg", metavar="X", type=non_negative_float, default="1e-4", help="L2 weight on the rows used")
    g.add_argument("--k", metavar="K", type=positive_int, default=10, help="the k of recall@k")
    g.add_argument("--eval-users", metavar="N", type=positive_int, default=5000,
                   help="held-out users evaluated (sampled when there are more)")
    g.add_argument("--seed", metavar="SEED", type=int, default=0,
                   help="seed of the generated data, the split, the initial tables, batches and negatives")
    g.add_argument("--no-dense", action="store_true", help="skip the dense-step comparison")
    g.add_argument("--compare", action="store_true",
                   help="instead: the same data, dimension and epochs in implicit's BPR, a torch bag model "
                        "(SparseAdam, Adagrad) and fastadapt's BPR and bag model; epoch time and recall "
                        "(absent packages are skipped)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress line on stderr (shown live on a terminal, one final line per epoch "
                        "otherwise)")
    g.add_argument("--quick", action="store_true",
                   help="a small problem for a smoke test: " + ", ".join(
                       f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + " (options given explicitly win)")


def _read_data(path: str, min_rating: Any) -> Any:
    """:func:`load_interactions`, with its errors as one-line :class:`~fastadapt.apps.cli.UsageError`."""
    from .cli import UsageError

    try:
        return load_interactions(path, min_rating)
    except OSError as exc:
        raise UsageError(f"cannot read --data {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"--data: {exc}") from None


def run(args: argparse.Namespace) -> int:
    """Run ``fastadapt recsys``; returns the exit status (raises
    :class:`fastadapt.apps.cli.UsageError` for a data file that cannot be used)."""
    if args.quick:
        given: frozenset = getattr(args, "given", frozenset())
        for dest, value in QUICK.items():
            if dest not in given:
                setattr(args, dest, value)
    t0 = time.perf_counter()
    if args.data:
        R = _read_data(args.data, args.min_rating)
        source = f"{args.data} (ratings >= {args.min_rating:g})"
    else:
        R = generate_interactions(args.users, args.items, args.interactions, args.topics, seed=args.seed)
        source = f"generated (Zipf item popularity, {args.topics} taste groups, seed {args.seed})"
    train_R, test_users, test_items = split_leave_one_out(R, args.seed)
    if test_users.size > args.eval_users:
        pick = np.sort(np.random.default_rng(args.seed).choice(test_users.size, args.eval_users, replace=False))
        test_users, test_items = test_users[pick], test_items[pick]
    print(f"interactions: {R.shape[0]:,} users x {R.shape[1]:,} items, {R.nnz:,} stored "
          f"({R.nnz / (R.shape[0] * R.shape[1]) * 100:.3f} % dense), scipy CSR; {source}; "
          f"ready in {time.perf_counter() - t0:.1f} s")
    kw = dict(dim=args.dim, epochs=args.epochs, batch_size=args.batch_size, reg=args.reg, history=args.history,
              k=args.k, seed=args.seed)
    if args.compare:
        from .recsys_compare import compare

        compare(sys.modules[__name__], train_R, test_users, test_items, optimizer=args.optimizer, lr=args.lr,
                progress=not args.no_progress, **kw)
        return 0
    what = "BPR" if args.model == "bpr" else f"bag model (user + mean of {args.history} history items)"
    print(f"{what}, dim {args.dim}, {args.optimizer} (sparse_mode={args.mode!r}), batch {args.batch_size}, "
          f"{args.epochs} epochs; held out: 1 item for {test_users.size:,} users, recall@{args.k} "
          f"(random ranking: {args.k / R.shape[1]:.4f})")
    kw.update(model=args.model, optimizer=args.optimizer, lr=args.lr, mode=args.mode,
              progress=not args.no_progress)
    sparse_run = train(train_R, test_users, test_items, grad_format=args.grad_format, **kw)
    sparse_t = [e["seconds"] for e in sparse_run["epochs"]]
    steady = slice(1, None) if len(sparse_t) > 1 else slice(None)     # the first epoch compiles
    note = " (epochs after the first; the first includes compilation)" if len(sparse_t) > 1 else ""
    result = [f"sparse steps ({args.grad_format}): {np.mean(sparse_t[steady]):.3f} s per epoch{note}, "
              f"final recall@{args.k} {sparse_run['epochs'][-1]['recall']:.4f}"]
    if not args.no_dense:
        dense_run = train(train_R, test_users, test_items, grad_format="dense", **kw)
        dense_t = [e["seconds"] for e in dense_run["epochs"]]
        ratio = np.mean(dense_t[steady]) / np.mean(sparse_t[steady])
        result.append(f"dense steps:          {np.mean(dense_t[steady]):.3f} s per epoch, final recall@{args.k} "
                      f"{dense_run['epochs'][-1]['recall']:.4f}  ->  sparse steps {ratio:.1f}x faster")
        if args.mode == "exact" or args.optimizer == "adagrad":
            names = ("P", "C", "Q") if args.model == "bag" else ("U", "V")
            d = max(float(np.max(np.abs(sparse_run[t] - dense_run[t]))) for t in names)
            why = "exact mode" if args.mode == "exact" else "Adagrad without weight decay: lazy is exact"
            result.append(f"sparse vs dense tables ({why}): max |difference| {d:.2e}")
    print("\n".join(result))
    return 0
