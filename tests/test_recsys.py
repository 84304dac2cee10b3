"""The recommender example (``python -m fastadapt recsys``): data, split, gradients, training, CLI."""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

import fastadapt as fa
from fastadapt.apps import cli, recsys
from fastadapt.apps.progress import Progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_numba_bpr_gradients_match_the_numpy_reference():
    rng = np.random.default_rng(4)
    U = rng.standard_normal((30, 5)).astype(np.float32)
    V = rng.standard_normal((20, 5)).astype(np.float32)
    users, pos, neg = rng.integers(0, 30, 200), rng.integers(0, 20, 200), rng.integers(0, 20, 200)
    loss, gU, item_rows, gV = recsys.bpr_gradients(U, V, users, pos, neg, 0.1)
    loss2, urows, gU2, irows, gV2 = recsys.bpr_sparse_gradients(U, V, users, pos, neg, 0.1)
    assert np.all(np.diff(urows) > 0) and np.all(np.diff(irows) > 0)      # unique, ascending
    assert set(urows) == set(users) and set(irows) == set(item_rows)
    assert gU2.dtype == U.dtype and gU2.flags.c_contiguous and gV2.flags.c_contiguous
    assert loss2 == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(recsys._as_dense(urows, gU2, U.shape), recsys._as_dense(users, gU, U.shape),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(recsys._as_dense(irows, gV2, V.shape), recsys._as_dense(item_rows, gV, V.shape),
                               rtol=1e-5, atol=1e-5)


def test_grouper_counting_sort():
    from fastadapt.apps.recsys_kernels import Grouper

    g = Grouper(10)
    rows = np.array([7, 2, 7, 0, 2, 7], np.int64)
    for _ in range(2):                                     # the counter is left clean for the next call
        urows, starts, order, slot = g(rows)
        assert urows.tolist() == [0, 2, 7] and starts.tolist() == [0, 1, 3, 6]
        assert order.tolist() == [3, 1, 4, 0, 2, 5] and slot.tolist() == [2, 1, 2, 0, 1, 2]
        assert not g.count.any()


def test_user_histories():
    R, train, _, _ = small_problem()
    ptr, idx = recsys.user_histories(train, history=4, seed=1)
    counts = np.diff(train.indptr)
    assert np.array_equal(np.diff(ptr), np.minimum(counts, 4))
    for u in range(train.shape[0]):
        bag = idx[ptr[u]:ptr[u + 1]]
        assert set(bag) <= set(train.indices[train.indptr[u]:train.indptr[u + 1]]) and len(set(bag)) == bag.size
    assert np.array_equal(recsys.user_histories(train, 4, 1)[1], idx)


def test_bag_model_gradients_match_finite_differences():
    rng = np.random.default_rng(5)
    n_users, n_items, dim, reg = 4, 7, 3, 0.1
    P, C, Q = (rng.standard_normal((n, dim)) for n in (n_users, n_items, n_items))
    hist_ptr = np.array([0, 3, 4, 4 + 2, 6 + 3])
    hist_idx = np.array([0, 2, 5, 1, 6, 6, 3, 4, 0])      # user 2's bag repeats item 6
    users, pos, neg = np.array([0, 3, 0, 2, 1]), np.array([1, 2, 4, 0, 3]), np.array([6, 5, 1, 1, 3])

    def objective(P, C, Q):
        total = 0.0
        for u, p, n in zip(users, pos, neg):
            m = C[hist_idx[hist_ptr[u]:hist_ptr[u + 1]]].mean(axis=0)
            x = (P[u] + m) @ (Q[p] - Q[n])
            total += np.logaddexp(0, -x) + 0.5 * reg * (P[u] @ P[u] + m @ m + Q[p] @ Q[p] + Q[n] @ Q[n])
        return total

    loss, (gP, gC, gQ) = recsys.bag_gradients(P, C, Q, hist_ptr, hist_idx, users, pos, neg, reg)
    assert isinstance(gP, fa.RowGrad) and isinstance(gC, fa.BagGrad) and isinstance(gQ, fa.RowGrad)
    assert gC.mode == "mean" and np.all(np.diff(gP.rows) > 0) and np.all(np.diff(gQ.rows) > 0)
    dP = recsys._as_dense(gP.rows, gP.values, P.shape)
    dC = recsys._as_dense(*recsys.bag_rows(gC), C.shape)
    dQ = recsys._as_dense(gQ.rows, gQ.values, Q.shape)
    eps = 1e-6
    for A, D in ((P, dP), (C, dC), (Q, dQ)):
        for idx in np.ndindex(A.shape):
            old = A[idx]
            A[idx] = old + eps
            up = objective(P, C, Q)
            A[idx] = old - eps
            down = objective(P, C, Q)
            A[idx] = old
            assert abs((up - down) / (2 * eps) - D[idx]) < 1e-6, (idx, D[idx])
    # the forward: user vectors through fastadapt.embedding_bag
    X = recsys.all_user_vectors(P, C, hist_ptr, hist_idx)
    np.testing.assert_allclose(X[3], P[3] + C[[3, 4, 0]].mean(axis=0), rtol=1e-12)


def test_bag_model_learns_and_exact_equals_dense():
    R, train, users, items = small_problem()
    kw = dict(model="bag", dim=8, epochs=3, batch_size=512, optimizer="adam", mode="exact", lr=0.05,
              history=5, k=10, log=None, progress=False)
    sparse_run = recsys.train(train, users, items, grad_format="rows", **kw)
    dense_run = recsys.train(train, users, items, grad_format="dense", **kw)
    assert sparse_run["epochs"][-1]["recall"] > 3 * 10 / R.shape[1]
    assert sparse_run["epochs"][-1]["loss"] < sparse_run["epochs"][0]["loss"]
    for t in ("P", "C", "Q"):
        np.testing.assert_allclose(sparse_run[t], dense_run[t], rtol=1e-4, atol=1e-5)


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


def test_cli_quick_run(capsys):
    rc = cli.main(["recsys", "--quick", "--users", "600", "--items", "200", "--interactions", "8000",
                   "--epochs", "2", "--dim", "8", "--optimizer", "rmsprop", "--mode", "exact"])
    assert rc == 0
    out, err = capsys.readouterr()
    assert "600 users x 200 items" in out                  # options given explicitly win over --quick
    assert "recall@10" in out and "s per epoch" in out and "dense steps" in out
    assert "exact mode" in out
    # stderr is not a terminal here: no "\r" redraws, one final line per epoch and run, newline-ended
    assert "\r" not in err and err.endswith("\n"), repr(err)
    lines = err.splitlines()
    assert len(lines) == 4 and all("batches" in line for line in lines), lines
    assert lines[0].startswith("RowGrad epoch 1/2: ") and lines[-1].startswith("dense epoch 2/2: ")


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


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_off_a_terminal_is_one_final_line():
    stream = io.StringIO()
    with Progress(5, "work", "items", stream=stream) as bar:
        for _ in range(5):
            bar.update(postfix="x 1")
        assert stream.getvalue() == ""                     # nothing while it runs
    assert re.fullmatch(r"work: 5/5 items, x 1, \d+\.\d s\n", stream.getvalue())
    stream = io.StringIO()
    Progress(3, "quiet", stream=stream, enabled=False).close()
    assert stream.getvalue() == ""


def test_progress_on_a_terminal_redraws_in_place():
    term = _Terminal()
    bar = Progress(4, "work", "items", stream=term, interval=0)
    for _ in range(4):
        bar.update()
    bar.close()
    text = term.getvalue()
    assert text.count("\r") >= 5 and text.endswith("\n") and text.count("\n") == 1
    assert "work: 1/4 items" in text and "left" in text and "work: 4/4 items" in text
    term = _Terminal()
    bar = Progress(2, "epoch", stream=term, interval=0, leave=False)
    bar.update(status="step one of two")
    bar.close()
    text = term.getvalue()
    assert "epoch: step one of two" in text and "\n" not in text and text.endswith("\r")   # cleared


def test_help_shows_every_default_and_no_markup(capsys):
    """Every option of every subcommand has help text, and each one taking a value shows its default."""
    parser, modules = cli.build_parser()
    assert set(modules) == {"demo", "recsys", "bench"}
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    top = capsys.readouterr().out
    assert "``" not in top and ":class:" not in top and "COMMAND --help" in top
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in modules:
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        assert "``" not in capsys.readouterr().out
        sub = commands[name]
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, (name, action.dest)
            if action.nargs != 0:                          # takes a value: its default is shown
                assert "default" in sub._get_formatter()._expand_help(action), (name, action.dest)
    with pytest.raises(SystemExit):
        cli.main(["recsys", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("users of the generated matrix (default: 50000)", "(default: 20000)", "(default: 32)",
                  "training epochs (default: 3)", "(default: 4096)", "(default: 1e-4)", "(default: 0)",
                  "(default: adagrad)", "adagrad 0.1, rmsprop 0.003, adam 0.005"):
        assert shown in text, shown


def test_user_errors_are_one_line_and_status_2(tmp_path, capsys):
    missing = tmp_path / "nonexistent.data"
    assert cli.main(["recsys", "--data", str(missing), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"fastadapt recsys: error: cannot read --data {missing}: No such file or directory\n"
    bad = tmp_path / "bad.txt"
    bad.write_text("just words here\nand more words\n")
    assert cli.main(["recsys", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastadapt recsys: error: --data: ") and len(err.splitlines()) == 1
    for argv in (["--users", "0"], ["--epochs", "many"], ["--lr", "-1"], ["--reg", "nan"],
                 ["--optimizer", "sgd"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["recsys", *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fastadapt recsys: error: argument {argv[0]}") and len(err.splitlines()) == 1, err


def test_missing_file_from_the_shell_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastadapt", "recsys", "--data", str(tmp_path / "none")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("fastadapt recsys: error: cannot read --data ")


def test_data_file_without_a_rating_kept(tmp_path, capsys):
    path = tmp_path / "ratings.csv"
    path.write_text("1,10,2\n2,11,3\n")
    assert cli.main(["recsys", "--data", str(path), "--min-rating", "4"]) == 2
    assert capsys.readouterr().err == f"fastadapt recsys: error: --data: {path}: no rating is >= 4 (--min-rating)\n"


def test_cli_bag_model_quick(capsys):
    rc = cli.main(["recsys", "--quick", "--model", "bag", "--users", "600", "--items", "200", "--interactions",
                   "8000", "--dim", "8", "--history", "6", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "bag model (user + mean of 6 history items)" in out and "600 users x 200 items" in out
    assert "recall@10" in out and "dense steps" in out
    # the BagGrad's rows are summed by the optimizer, the dense gradient's by np.add.at: rounding apart
    assert float(re.search(r"max \|difference\| (\S+)", out).group(1)) < 1e-5


def _compare_argv():
    return ["recsys", "--quick", "--compare", "--users", "500", "--items", "150", "--interactions", "6000",
            "--dim", "8", "--epochs", "2", "--batch-size", "1024", "--no-progress"]


def test_compare_skips_absent_packages(monkeypatch, capsys):
    import importlib.util

    from fastadapt.apps import recsys_compare

    real = importlib.util.find_spec
    monkeypatch.setattr(recsys_compare.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("implicit", "torch") else real(name, *a))
    assert cli.main(_compare_argv()) == 0
    out = capsys.readouterr().out
    assert "implicit: not installed, skipped" in out and "torch: not installed, skipped" in out
    assert "fastadapt BPR, Adagrad" in out and "fastadapt bag model, Adagrad" in out


def test_compare_quick_with_implicit_and_torch(capsys):
    pytest.importorskip("implicit")
    pytest.importorskip("torch")
    assert cli.main(_compare_argv()) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "s/epoch" in ln]
    assert len(lines) == 5, out
    for name in ("implicit BPR", "torch bag model, SparseAdam", "torch bag model, Adagrad", "fastadapt BPR",
                 "fastadapt bag model"):
        assert any(name in ln for ln in lines), name
    assert all(0 <= float(ln.rsplit(" ", 1)[1]) <= 1 for ln in lines)
