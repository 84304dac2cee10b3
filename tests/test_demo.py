"""``python -m fastadapt demo``: the seed comparison, its two fixed defects, its output and its --plot option."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from fastadapt.apps import cli, demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seed_adam(X, y, rng, epochs, batch_size, lr=0.01, b1=0.9, b2=0.999, eps=1e-8, restart_each_epoch=False):
    """The seed's textbook Adam loop, with its step-counter defect optional (``restart_each_epoch``)."""
    n, d = X.shape
    theta, m, v = np.zeros(d), np.zeros(d), np.zeros(d)
    t = 0
    for _ in range(epochs):
        if restart_each_epoch:
            t = 0
        order = rng.permutation(n)
        Xs, ys = X[order], y[order]
        for lo in range(0, n, batch_size):
            Xb, yb = Xs[lo:lo + batch_size], ys[lo:lo + batch_size]
            g = 2 * Xb.T @ (Xb @ theta - yb) / len(yb)
            t += 1
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            theta = theta - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return theta


def test_data_is_the_seed_stream():
    """make_data(42) draws exactly what np.random.seed(42); randn(...) draws, without touching the global state."""
    saved = np.random.get_state()
    try:
        np.random.seed(42)
        X = np.random.randn(1000, 10)
        true_theta = np.random.randn(10) * 2
        y = X @ true_theta + np.random.randn(1000) * 0.5
        perm = np.random.permutation(1000)
        np.random.seed(7)
        after = np.random.get_state()[1].copy()
        X2, y2, t2, rng = demo.make_data(42)
        assert np.array_equal(np.random.get_state()[1], after)
    finally:
        np.random.set_state(saved)
    assert np.array_equal(X, X2) and np.array_equal(y, y2) and np.array_equal(true_theta, t2)
    assert np.array_equal(rng.permutation(1000), perm)


def test_adam_counts_steps_over_the_whole_run():
    """Defect 1 fixed: fastadapt's Adam equals the seed's loop with a global step counter, and the seed's
    restarting counter gives measurably different parameters (so the fix matters)."""
    X, y, _, rng = demo.make_data(42)
    state = rng.get_state()
    factory = demo.SEED_OPTIMIZERS[2][3]
    theta, losses, _, steps = demo.train(factory, X, y, rng, epochs=5, batch_size=32)
    assert steps == 5 * 32
    rng.set_state(state)
    fixed = seed_adam(X, y, rng, 5, 32)
    rng.set_state(state)
    defective = seed_adam(X, y, rng, 5, 32, restart_each_epoch=True)
    np.testing.assert_allclose(theta, fixed, rtol=1e-9, atol=1e-12)
    assert np.max(np.abs(defective - fixed)) > 1e-3


@pytest.mark.parametrize("batch_size", [32, 300, 1000])
def test_epoch_loss_is_the_mean_over_the_samples(batch_size):
    """Defect 2 fixed: the epoch loss is the size-weighted mean of the batch losses (before each update)."""
    X, y, _, rng = demo.make_data(3)
    state = rng.get_state()
    losses = demo.train(demo.SEED_OPTIMIZERS[0][3], X, y, rng, epochs=1, batch_size=batch_size)[1]
    rng.set_state(state)
    order = rng.permutation(1000)
    Xs, ys = X[order], y[order]
    theta = np.zeros(10)
    opt = demo.SEED_OPTIMIZERS[0][3]([theta])
    total = 0.0
    n_batches = 0
    for lo in range(0, 1000, batch_size):
        Xb, yb = Xs[lo:lo + batch_size], ys[lo:lo + batch_size]
        total += np.mean((Xb @ theta - yb) ** 2) * len(yb)
        opt.step([2 * Xb.T @ (Xb @ theta - yb) / len(yb)])
        n_batches += 1
    assert n_batches == math.ceil(1000 / batch_size)
    assert losses == pytest.approx([total / 1000], rel=1e-12)


def test_default_comparison_converges_and_is_deterministic():
    results, info = demo.compare()
    assert [r.name for r in results] == ["AdaGrad", "RMSprop", "Adam"]
    assert info["epochs"] == 50 and info["batch_size"] == 32 and info["seed"] == 42
    for r in results:
        assert len(r.losses) == 50 and r.steps == 50 * 32
        assert r.losses[0] > 10 * r.final_loss                # it learned
        assert r.final_loss == pytest.approx(info["noise_mse"], rel=0.05)   # down to the noise level
        assert r.distance < 0.1
        assert r.wall_s > 0
    again, _ = demo.compare()
    for a, b in zip(results, again):
        assert a.losses == b.losses and np.array_equal(a.theta, b.theta)
    other, _ = demo.compare(epochs=2, seed=1)
    assert other[0].losses != results[0].losses[:2]


def test_hyper_parameters_are_the_seeds():
    _, _, _, factories = zip(*demo.SEED_OPTIMIZERS)
    groups = [f([np.zeros(2)]).param_groups[0] for f in factories]
    assert groups[0]["lr"] == 0.1 and groups[0]["eps"] == 1e-8
    assert groups[1]["lr"] == 0.01 and groups[1]["alpha"] == 0.9 and groups[1]["eps"] == 1e-8
    assert groups[2]["lr"] == 0.01 and groups[2]["betas"] == (0.9, 0.999) and groups[2]["eps"] == 1e-8


def test_cli_output(capsys):
    assert cli.main(["demo", "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    for name in ("AdaGrad", "RMSprop", "Adam"):
        row = [line for line in out.splitlines() if line.startswith(name + " ")]
        assert len(row) == 1, name
        final_loss, distance, steps, time, share, per_step = row[0].split()[1:7]
        assert float(final_loss) > 0 and float(distance) > 0 and steps == "96" and time.endswith("ms")
        assert share.endswith("%") and 0 <= float(share[:-1]) <= 100 and per_step.endswith("us")
    assert "against the same loop with an update that does nothing" in out
    assert "alpha=0.9" in out and "eps=1e-8" in out and "beta=0.9" in out
    assert "Notes" in out
    assert "restarted the step counter at every epoch" in out and "t = 1..96" in out
    assert "ceil(1000/32) = 32" in out and "1000//32 = 31" in out


def test_cli_options(capsys):
    assert cli.main(["demo", "--epochs", "2", "--seed", "5", "--batch-size", "100"]) == 0
    out = capsys.readouterr().out
    assert "seed 5, batch 100, 2 epochs (10 batches each)" in out
    assert "t = 1..20" in out and "1000//100 = 10;" in out    # no remainder: no percentage
    for bad in (["--epochs", "0"], ["--batch-size", "-1"], ["--epochs", "x"]):
        with pytest.raises(SystemExit):
            cli.main(["demo", *bad])


def test_docstring_names_the_two_defects():
    doc = demo.__doc__
    assert "step counter restarted at every epoch" in doc
    assert "n // batch" in doc and "ceil(n / batch)" in doc


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    path = tmp_path / "curves.png"
    assert cli.main(["demo", "--epochs", "1", "--plot", str(path)]) == 2
    captured = capsys.readouterr()
    assert "needs matplotlib" in captured.err and 'pip install "fastadapt[plot]"' in captured.err
    assert captured.out == ""                                  # it failed before training
    assert not path.exists()
    with pytest.raises(ImportError, match="needs matplotlib"):
        demo.save_plot([], {}, str(path))


def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    assert cli.main(["demo", "--epochs", "2", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"saved to {path}" in capsys.readouterr().out
    bad = tmp_path / "missing-dir" / "curves.png"
    assert cli.main(["demo", "--epochs", "1", "--plot", str(bad)]) == 1
    assert "could not write" in capsys.readouterr().err


def test_python_m_fastadapt_demo():
    proc = subprocess.run([sys.executable, "-m", "fastadapt", "demo", "--epochs", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "AdaGrad" in proc.stdout and "Notes" in proc.stdout


def test_apps_use_only_the_public_api():
    """fastadapt.apps imports `fastadapt` (the public names) and its own modules, nothing internal;
    `import fastadapt` does not import the apps."""
    import ast

    import fastadapt.apps

    folder = os.path.dirname(fastadapt.apps.__file__)
    for filename in sorted(os.listdir(folder)):
        if not filename.endswith(".py"):
            continue
        with open(os.path.join(folder, filename)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                assert node.level == 1 or not module.startswith("fastadapt") or module.startswith("fastadapt.apps"), \
                    (filename, module)
                assert node.level <= 1, (filename, module)             # no `from .. import internals`
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name == "fastadapt" or not alias.name.startswith("fastadapt"), (filename, alias.name)
    code = "import sys, fastadapt; print(sorted(m for m in sys.modules if m.startswith('fastadapt.apps')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_entry_points_and_no_command(capsys):
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        assert 'fastadapt = "fastadapt.apps.cli:main"' in f.read()
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: fastadapt ") and "demo" in out and "recsys" in out and "bench" in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    import fastadapt
    assert capsys.readouterr().out.strip() == f"fastadapt {fastadapt.__version__}"
