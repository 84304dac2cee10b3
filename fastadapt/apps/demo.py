"""``python -m fastadapt demo``: the seed comparison of AdaGrad, RMSprop and Adam, on fastadapt.

The project's source material compares three hand-written numpy optimizers on a linear regression:
``np.random.seed(42)``, ``X = randn(1000, 10)``, ``true_theta = randn(10) * 2``,
``y = X @ true_theta + randn(1000) * 0.5``; mini-batches of 32, reshuffled every epoch with
``np.random.permutation``, 50 epochs from ``theta = zeros(10)``; the MSE loss and its gradient
``2 * X_b.T @ (X_b @ theta - y_b) / len(batch)``; AdaGrad (lr 0.1, eps 1e-8), RMSprop (lr 0.01,
beta 0.9, eps 1e-8) and Adam (lr 0.01, betas 0.9/0.999, eps 1e-8), trained in that order on the same
data.  This module reruns it with :class:`fastadapt.Adagrad`, :class:`fastadapt.RMSprop` and
:class:`fastadapt.Adam` and prints, per optimizer, the final loss, the distance to the true parameters
and the wall time.

The random stream is the seed's: one ``RandomState(seed)`` draws the data, then every epoch's
permutation, AdaGrad's epochs first, then RMSprop's, then Adam's (the same numbers as
``np.random.seed(seed)`` followed by the seed's ``np.random`` calls, without touching numpy's global
state).

Hyper-parameters are passed explicitly where fastadapt's defaults (torch's) differ from the seed's:
the seed's RMSprop ``beta=0.9`` is fastadapt's ``alpha`` (default 0.99), and the seed's AdaGrad
``eps=1e-8`` replaces fastadapt's default 1e-10.

Two defects of the seed code are fixed here (and named in the output):

1. **Adam's step counter restarted at every epoch**, so its bias correction restarted too: every
   epoch began again with ``m / (1 - 0.9**1)``, a tenfold-amplified first moment.  fastadapt counts
   each parameter's steps over the whole run (50 epochs x 32 batches = 1600 steps).
2. **The epoch loss divided by ``n // batch`` while summing ``ceil(n / batch)`` batch losses**
   (32 batch losses divided by 31: 3.2 % too high).  Here the epoch loss is the mean squared error
   over the epoch's n samples, each batch's loss weighted by its size.

``--plot PATH`` saves the loss curves as a PNG (needs matplotlib: ``pip install "fastadapt[plot]"``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
import argparse
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

import fastadapt as fa

__all__ = ["SEED_OPTIMIZERS", "RunResult", "make_data", "train", "compare", "format_report",
           "save_plot", "add_arguments", "run"]

#: (name, the seed's hyper-parameters, the fastadapt call that reproduces them, factory)
SEED_OPTIMIZERS = [
    ("AdaGrad", "lr=0.1, eps=1e-8",
     "fastadapt.Adagrad(lr=0.1, eps=1e-8)",
     lambda params: fa.Adagrad(params, lr=0.1, eps=1e-8)),
    ("RMSprop", "lr=0.01, beta=0.9, eps=1e-8",
     "fastadapt.RMSprop(lr=0.01, alpha=0.9, eps=1e-8)",
     lambda params: fa.RMSprop(params, lr=0.01, alpha=0.9, eps=1e-8)),
    ("Adam", "lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8",
     "fastadapt.Adam(lr=0.01, betas=(0.9, 0.999), eps=1e-8)",
     lambda params: fa.Adam(params, lr=0.01, betas=(0.9, 0.999), eps=1e-8)),
]

N_SAMPLES, N_FEATURES, NOISE = 1000, 10, 0.5

#: each training loop is timed this many times on the same shuffles (the fastest counts)
TIMING_REPEATS = 3


@dataclass
class RunResult:
    """One optimizer's training run.

    Attributes
    ----------
    name : str
        The seed's name for the optimizer.
    seed_hyper : str
        The seed's hyper-parameters.
    call : str
        The fastadapt call used.
    losses : list of float
        Per-epoch loss: the mean squared error over the epoch's samples.
    theta : ndarray
        The final parameters.
    distance : float
        ``||theta - true_theta||_2``.
    wall_s : float
        Wall time of the training loop (gradients included, kernel loading excluded): the
        fastest of :data:`TIMING_REPEATS` runs on the same shuffles.
    steps : int
        The optimizer's step count for ``theta`` at the end.
    """

    name: str
    seed_hyper: str
    call: str
    losses: list = field(default_factory=list)
    theta: Optional[np.ndarray] = None
    distance: float = float("nan")
    wall_s: float = float("nan")
    steps: int = 0

    @property
    def final_loss(self) -> float:
        """The last epoch's loss."""
        return self.losses[-1]


def make_data(seed: int = 42, n: int = N_SAMPLES, d: int = N_FEATURES, noise: float = NOISE
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.random.RandomState]:
    """The seed's regression data, and the random stream positioned after it.

    Parameters
    ----------
    seed : int
        The seed (42 in the source material).
    n, d : int
        Samples and features (1000 and 10).
    noise : float
        Standard deviation of the label noise (0.5).

    Returns
    -------
    X : ndarray, shape (n, d)
    y : ndarray, shape (n,)
    true_theta : ndarray, shape (d,)
    rng : numpy.random.RandomState
        Continues the stream; the epochs' permutations are drawn from it.
    """
    rng = np.random.RandomState(seed)
    X = rng.randn(n, d)
    true_theta = rng.randn(d) * 2
    y = X @ true_theta + rng.randn(n) * noise
    return X, y, true_theta, rng


def train(make_optimizer: Callable[[List[np.ndarray]], Any], X: np.ndarray, y: np.ndarray,
          rng: np.random.RandomState, *, epochs: int = 50, batch_size: int = 32
          ) -> Tuple[np.ndarray, List[float], float, int]:
    """Mini-batch training of ``theta`` (from zeros) on the MSE loss, as the seed does it.

    Parameters
    ----------
    make_optimizer : callable
        ``make_optimizer([theta])`` returns a fastadapt optimizer over ``theta``.
    X, y : ndarray
        The data.
    rng : numpy.random.RandomState
        Draws one permutation of the samples per epoch.
    epochs, batch_size : int

    Returns
    -------
    theta : ndarray
        The trained parameters.
    losses : list of float
        Per-epoch mean squared error over the epoch's samples (the batch losses, computed before each
        update as in the seed, weighted by batch size: the seed's ``n // batch`` divisor is fixed).
    wall_s : float
        Wall time of the loop.
    steps : int
        The optimizer's step count for ``theta`` (epochs * ceil(n / batch_size): never reset).
    """
    n, d = X.shape
    theta = np.zeros(d)
    opt = make_optimizer([theta])
    losses: List[float] = []
    start = time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(n)
        Xs, ys = X[order], y[order]
        sse = 0.0
        for lo in range(0, n, batch_size):
            Xb, yb = Xs[lo:lo + batch_size], ys[lo:lo + batch_size]
            residual = Xb @ theta - yb
            sse += float(residual @ residual)
            grad = 2 * Xb.T @ residual / len(yb)
            opt.step([grad])
        losses.append(sse / n)
    wall_s = time.perf_counter() - start
    return theta, losses, wall_s, int(opt.state[0]["step"])


class _NoUpdate:
    """An optimizer that changes nothing: the loop's cost without the update (for the optimizer's
    share of the training time)."""

    def __init__(self, params: List[np.ndarray]) -> None:
        self.state: List[Dict[str, int]] = [{"step": 0}]

    def step(self, grads: List[np.ndarray]) -> None:
        pass


def _timed_again(make_optimizer: Callable[[List[np.ndarray]], Any], X: np.ndarray, y: np.ndarray,
                 rng_state: Any, epochs: int, batch_size: int, repeats: int) -> float:
    """The fastest of ``repeats`` reruns of :func:`train`, each with the shuffles of ``rng_state``."""
    best = math.inf
    for _ in range(repeats):
        rng = np.random.RandomState()
        rng.set_state(rng_state)
        best = min(best, train(make_optimizer, X, y, rng, epochs=epochs, batch_size=batch_size)[2])
    return best


def _warm_up() -> float:
    """One step of each optimizer on a throwaway array: loads (or compiles) the float64 kernels so
    that the timed loops measure training, not numba.  Returns the seconds it took."""
    start = time.perf_counter()
    for _, _, _, factory in SEED_OPTIMIZERS:
        w = np.zeros(N_FEATURES)
        factory([w]).step([np.ones(N_FEATURES)])
    return time.perf_counter() - start


def compare(epochs: int = 50, seed: int = 42, batch_size: int = 32) -> Tuple[List[RunResult], Dict[str, Any]]:
    """Run the seed comparison.

    Parameters
    ----------
    epochs : int
        Epochs per optimizer (50 in the source material).
    seed : int
        Seed of the data and of the shuffles (42).
    batch_size : int
        Mini-batch size (32).

    Returns
    -------
    results : list of RunResult
        AdaGrad, RMSprop, Adam, in the seed's order.
    info : dict
        ``true_theta``, ``n``, ``batch_size``, ``epochs``, ``seed``, ``warmup_s``, ``noise_mse``
        (the mean squared noise, the loss of the true parameters) and ``loop_s`` (the same loop
        with an update that does nothing: the optimizer's share of ``wall_s`` is the rest).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    warmup_s = _warm_up()
    X, y, true_theta, rng = make_data(seed)
    results = []
    loop_s = math.inf
    for name, seed_hyper, call, factory in SEED_OPTIMIZERS:
        before = rng.get_state()
        theta, losses, wall_s, steps = train(factory, X, y, rng, epochs=epochs, batch_size=batch_size)
        # timing: the fastest of this run and TIMING_REPEATS - 1 reruns on the same shuffles, and the
        # same loop with an update that does nothing (the optimizer's share is the difference)
        wall_s = min(wall_s, _timed_again(factory, X, y, before, epochs, batch_size, TIMING_REPEATS - 1))
        loop_s = min(loop_s, _timed_again(_NoUpdate, X, y, before, epochs, batch_size, TIMING_REPEATS))
        results.append(RunResult(name, seed_hyper, call, losses, theta,
                                 float(np.linalg.norm(theta - true_theta)), wall_s, steps))
    info = dict(true_theta=true_theta, n=X.shape[0], batch_size=batch_size, epochs=epochs, seed=seed,
                warmup_s=warmup_s, noise_mse=float(np.mean((X @ true_theta - y) ** 2)), loop_s=loop_s)
    return results, info


def format_report(results: List[RunResult], info: Dict[str, Any]) -> str:
    """The demo's printed report: the hyper-parameter mapping, the table and the notes.

    Parameters
    ----------
    results, info
        What :func:`compare` returns.

    Returns
    -------
    str
    """
    n, b, epochs = info["n"], info["batch_size"], info["epochs"]
    n_batches = math.ceil(n / b)
    lines = [
        f"Seed comparison: linear regression, X {n}x{len(info['true_theta'])}, noise {NOISE}, "
        f"seed {info['seed']}, batch {b}, {epochs} epochs ({n_batches} batches each)",
        "",
        "Hyper-parameters (the seed's -> fastadapt's):",
    ]
    width = max(len(r.name) for r in results)
    for r in results:
        lines.append(f"  {r.name:<{width}}  {r.seed_hyper:<42} -> {r.call}")
    lines += [
        "  (RMSprop: the seed's beta is fastadapt's alpha, whose default is torch's 0.99, so 0.9 is passed;",
        "   AdaGrad: the seed's eps=1e-8 is passed, fastadapt's default is 1e-10)",
        "",
    ]
    header = (f"{'optimizer':<{width + 2}}{'final loss':>12}{'|theta - true|':>16}{'steps':>8}{'time':>10}"
              f"{'optimizer':>11}{'per step':>10}")
    lines += [header, "-" * len(header)]
    loop_s = info["loop_s"]
    for r in results:
        spent = max(r.wall_s - loop_s, 0.0)
        lines.append(f"{r.name:<{width + 2}}{r.final_loss:>12.6f}{r.distance:>16.6f}{r.steps:>8d}"
                     f"{r.wall_s * 1e3:>8.1f}ms{spent / r.wall_s * 100:>10.0f}%"
                     f"{spent / max(r.steps, 1) * 1e6:>8.1f}us")
    lines += [
        "-" * len(header),
        f"final loss: the last epoch's mean squared error over its {n} samples (the noise alone gives "
        f"{info['noise_mse']:.6f});",
        f"time: the {epochs}-epoch training loop, numpy gradients included (fastest of {TIMING_REPEATS} runs), "
        f"after a {info['warmup_s'] * 1e3:.0f} ms warm-up",
        "that loads the compiled kernels; optimizer: its share of that time, against the same loop with an "
        f"update that does nothing ({loop_s * 1e3:.1f} ms), and per step.",
        "",
        "Notes: two defects of the seed code are fixed here.",
        f"  1. Its Adam restarted the step counter at every epoch, so bias correction restarted too; "
        f"fastadapt",
        f"     counts each parameter's steps over the whole run (Adam took "
        f"{results[-1].steps} steps: t = 1..{results[-1].steps}).",
        f"  2. Its epoch loss summed ceil({n}/{b}) = {n_batches} batch losses but divided by "
        f"{n}//{b} = {n // b}"
        + (f" ({(n_batches / (n // b) - 1) * 100:.1f}% too high)" if n // b and n % b else "")
        + ";",
        "     here it is the mean over the epoch's samples (each batch weighted by its size).",
    ]
    return "\n".join(lines)


def _require_matplotlib() -> bool:
    try:
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        return False
    return True


def save_plot(results: List[RunResult], info: Dict[str, Any], path: str) -> None:
    """Save the per-epoch loss curves of ``results`` as a PNG at ``path`` (needs matplotlib).

    Raises
    ------
    ImportError
        When matplotlib is not installed (``pip install "fastadapt[plot]"``).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError('saving the loss curves needs matplotlib: pip install "fastadapt[plot]" '
                          "(or pip install matplotlib)") from exc
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    epochs = np.arange(1, info["epochs"] + 1)
    for r in results:
        ax.plot(epochs, r.losses, label=f"{r.name} ({r.seed_hyper})")
    ax.axhline(info["noise_mse"], color="grey", linestyle=":", label="noise level")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean squared error")
    ax.set_title(f"fastadapt: the seed comparison (seed {info['seed']}, batch {info['batch_size']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    from .cli import positive_int

    parser.add_argument("--epochs", metavar="N", type=positive_int, default=50, help="epochs per optimizer")
    parser.add_argument("--seed", metavar="SEED", type=int, default=42, help="seed of the data and the shuffles")
    parser.add_argument("--batch-size", metavar="N", type=positive_int, default=32, help="mini-batch size")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help='save the loss curves as a PNG (needs matplotlib: pip install "fastadapt[plot]"; '
                             "default: no plot)")


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``args``; print the report; return the exit status (raises
    :class:`fastadapt.apps.cli.UsageError` when ``--plot`` cannot work)."""
    from .cli import UsageError

    if args.plot is not None and not _require_matplotlib():
        raise UsageError('--plot needs matplotlib, which is not installed; install it with '
                         'pip install "fastadapt[plot]" (or pip install matplotlib), or run without --plot')
    results, info = compare(epochs=args.epochs, seed=args.seed, batch_size=args.batch_size)
    print(format_report(results, info))
    if args.plot is not None:
        try:
            save_plot(results, info, args.plot)
        except OSError as exc:
            print(f"fastadapt demo: error: could not write {args.plot}: {exc}", file=sys.stderr)
            return 1
        print(f"\nLoss curves saved to {args.plot}")
    return 0
