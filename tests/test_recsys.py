"""The recommender example (``python -m fastadapt recsys``): data, split, gradients, training, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from fastadapt import cli, recsys


def small_problem(seed=0):
    R = recsys.generate_interactions(400, 150, 6000, topics=5, seed=seed)
    return R, *recsys.split_leave_one_out(R, seed)


def test_generated_interactions():
    R = recsys.generate_interactions(300, 100, 4000, topics=4, seed=1)
    assert isinstance(R, sp.csr_matrix) and R.shape == (300, 100)
    assert abs(R.nnz - 4000) <= 4 and R.has_canonical_format
    assert np.all(R.data == 1.0)
    pop = np.sort(np.asarray(R.sum(axis=0)).ravel())[::-1]
    assert pop[0] > 5 * np.median(pop)                     # Zipf-like: a few items dominate
    assert (recsys.generate_interactions(300, 100, 4000, topics=4, seed=1) != R).nnz == 0   # seeded


def test_leave_one_out_split():
    R, train, users, items = small_problem()
    assert train.nnz + users.size == R.nnz
    assert np.all(np.asarray(R[users, items]).ravel() == 1)
    assert np.all(np.asarray(train[users, items]).ravel() == 0)
    counts = np.diff(R.indptr)
    assert set(users) == set(np.flatnonzero(counts >= 2))


def test_bpr_gradients_match_finite_differences():
    rng = np.random.default_rng(2)
    U, V = rng.standard_normal((5, 3)), rng.standard_normal((6, 3))
    users, pos, neg = np.array([0, 3, 0]), np.array([1, 2, 4]), np.array([5, 5, 0])
    reg = 0.1

    def objective(U, V):
        x = np.einsum("ij,ij->i", U[users], V[pos] - V[neg])
        l2 = 0.5 * reg * (np.sum(U[users] ** 2) + np.sum(V[pos] ** 2) + np.sum(V[neg] ** 2))
        return np.sum(np.logaddexp(0, -x)) + l2

    _, gU, item_rows, gV = recsys.bpr_gradients(U, V, users, pos, neg, reg)
    dU, dV = np.zeros_like(U), np.zeros_like(V)
    np.add.at(dU, users, gU)
    np.add.at(dV, item_rows, gV)
    eps = 1e-6
    for A, D in ((U, dU), (V, dV)):
        for idx in np.ndindex(A.shape):
            old = A[idx]
            A[idx] = old + eps
            up = objective(U, V)
            A[idx] = old - eps
            down = objective(U, V)
            A[idx] = old
            assert abs((up - down) / (2 * eps) - D[idx]) < 1e-6


def test_recall_at_k():
    U = np.array([[1.0, 0.0], [0.0, 1.0]])
    V = np.array([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    train = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.float32))
    # user 0 has seen item 0, so item 1 ranks first among unseen and item 2 second
    assert recsys.recall_at_k(U, V, train, np.array([0]), np.array([1]), k=1) == 1.0
    assert recsys.recall_at_k(U, V, train, np.array([0]), np.array([2]), k=1) == 0.0
    assert recsys.recall_at_k(U, V, train, np.array([0, 1]), np.array([2, 3]), k=2) == 1.0


@pytest.mark.parametrize("optimizer,mode,lr", [("adagrad", "lazy", 0.1), ("adam", "exact", 0.05),
                                               ("rmsprop", "exact", 0.02)])
def test_sparse_training_learns_and_exact_equals_dense(optimizer, mode, lr):
    R, train, users, items = small_problem()
    kw = dict(dim=8, epochs=3, batch_size=512, optimizer=optimizer, mode=mode, lr=lr, k=10, log=None,
              progress=False)
    sparse_run = recsys.train(train, users, items, grad_format="rows", **kw)
    dense_run = recsys.train(train, users, items, grad_format="dense", **kw)
    random_recall = 10 / R.shape[1]
    assert sparse_run["epochs"][-1]["recall"] > 3 * random_recall
    assert sparse_run["epochs"][-1]["loss"] < sparse_run["epochs"][0]["loss"]
    # Adagrad without weight decay is exact in lazy mode too; exact mode is the dense step
    rtol = 1e-4 if optimizer == "rmsprop" else 0         # RMSprop: closed-form decay vs repeated
    np.testing.assert_allclose(sparse_run["U"], dense_run["U"], rtol=rtol, atol=rtol)
    np.testing.assert_allclose(sparse_run["V"], dense_run["V"], rtol=rtol, atol=rtol)


def test_csr_gradients_give_the_rowgrad_result():
    R, train, users, items = small_problem()
    kw = dict(dim=8, epochs=1, batch_size=512, optimizer="adam", log=None, progress=False)
    a = recsys.train(train, users, items, grad_format="rows", **kw)
    b = recsys.train(train, users, items, grad_format="csr", **kw)
    np.testing.assert_allclose(a["U"], b["U"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["V"], b["V"], rtol=1e-5, atol=1e-6)


def test_load_movielens_style_files(tmp_path):
    path = tmp_path / "ratings.dat"
    path.write_text("1::10::5::978300760\n1::11::3::978302109\n2::10::4::978301968\n7::12::1::1\n")
    R = recsys.load_interactions(path, min_rating=3)
    assert R.shape == (2, 2) and R.nnz == 3                # the rating-1 line (user 7, item 12) is dropped
    csv = tmp_path / "ratings.csv"
    csv.write_text("userId,movieId,rating\n5,1,4.0\n5,2,2.0\n9,1,5.0\n")
    R = recsys.load_interactions(csv)
    assert R.shape == (2, 2) and R.nnz == 3
    bad = tmp_path / "bad.txt"
    bad.write_text("just words here\nand more words\n")
    with pytest.raises(ValueError):
        recsys.load_interactions(bad)


def test_cli_quick_run(capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):                    # the plain progress line fallback
        if name == "tqdm":
            raise ImportError("tqdm hidden by the test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    rc = cli.main(["recsys", "--quick", "--users", "600", "--items", "200", "--interactions", "8000",
                   "--epochs", "2", "--dim", "8", "--optimizer", "rmsprop", "--mode", "exact"])
    assert rc == 0
    out, err = capsys.readouterr()
    assert "recall@10" in out and "s per epoch" in out and "dense steps" in out
    assert "exact mode" in out
    assert "batches" in err                                # the plain progress line


def test_cli_with_data_file(tmp_path, capsys):
    rng = np.random.default_rng(3)
    lines = [f"{u}\t{i}\t{rng.integers(1, 6)}\t0" for u in range(50) for i in rng.choice(40, 6, replace=False)]
    path = tmp_path / "u.data"
    path.write_text("\n".join(lines) + "\n")
    rc = cli.main(["recsys", "--data", str(path), "--epochs", "1", "--dim", "4", "--no-dense",
                   "--no-progress", "--grad-format", "csr"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "50 users x 40 items" in out and "sparse steps (csr)" in out
