"""A user's view of fastadapt's types: ``python3 -m mypy tests/typing_check.py`` must pass.

Not a pytest module (the name does not start with ``test_``): a type checker reads it.  It uses
the public API as the README does -- the generated classes and functions come from the stubs
``fastadapt/__init__.pyi`` and ``fastadapt/functional.pyi`` (tools/gen_stubs.py).  The calls
under ``_rejected`` are mistakes the checker must catch: each carries a ``type: ignore`` for the
expected error code, and ``warn_unused_ignores`` (pyproject.toml) fails the run if one is not
reported.  Running the file (``python tests/typing_check.py``) executes the correct calls.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

import fastadapt as fa
from fastadapt import functional as F


def readme_dense() -> float:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1000, 10))
    y = X @ rng.standard_normal(10)
    w = np.zeros(10)
    opt: fa.Optimizer = fa.Adam([w], lr=1e-2)
    for _ in range(10):
        grad = 2 * X.T @ (X @ w - y) / len(y)
        applied: bool = opt.step([grad])
        assert applied
    return float(np.mean((X @ w - y) ** 2))


def readme_sparse() -> int:
    rng = np.random.default_rng(0)
    E = rng.standard_normal((10_000, 16)).astype(np.float32)
    opt = fa.Adagrad([E], lr=0.1)
    rows = np.array([3, 42, 3])
    values = np.ones((3, 16), np.float32)
    opt.step([fa.RowGrad(rows, values), ])
    opt.step([None])
    exact = fa.RMSprop([E], lr=1e-3, sparse_mode="exact", nonfinite="skip")
    exact.step([fa.RowGrad(rows, values)])
    out: np.ndarray = fa.embedding_bag(E, rows, np.array([0, 1, 3]), mode="mean")
    opt.step([fa.BagGrad(rows, np.array([0, 1, 3]), np.ones_like(out), mode="mean")])
    step: int = opt.state_of(E)["step"]
    return step


def readme_groups() -> None:
    w1, w2 = np.zeros(5), np.zeros(3, np.float32)
    opt = fa.AdamW([{"params": [w1], "lr": 1e-2}, {"params": [w2]}], lr=1e-3, weight_decay=0.1)
    opt.step([np.ones(5), np.ones(3, np.float32)])
    opt.param_groups[0]["lr"] = 5e-3
    sd: dict[str, Any] = opt.state_dict()
    fresh: fa.Adam = fa.AdamW([{"params": [w1.copy()], "lr": 1e-2}, {"params": [w2.copy()]}], lr=1e-3)
    fresh.load_state_dict(sd)
    fresh.add_param_group({"params": [np.zeros(2)]})
    others: list[fa.Optimizer] = [fa.SGD([w1], lr=0.1, momentum=0.9, nesterov=True), fa.SparseAdam([w1]),
                                  fa.Adadelta([w1]), fa.Adamax([w1]), fa.NAdam([w1]),
                                  fa.RAdam([w1], betas=(0.9, 0.99), decoupled_weight_decay=True),
                                  fa.Adam([w1], 1e-3, (0.9, 0.999), 1e-8, 0.0, True, maximize=True)]
    assert all(o.skipped_steps == 0 for o in others)


def functional_layer() -> float:
    p = np.ones(4)
    g = np.full(4, 0.5)
    m, v = np.zeros(4), np.zeros(4)
    F.adam(p, g, m, v, step=1, lr=0.1)
    fa.functional.adagrad(p, g, np.zeros(4), step=1)
    c = F.nadam(p, g, np.zeros(4), np.zeros(4), step=1)
    c = F.nadam(p, g, np.zeros(4), np.zeros(4), step=2, **c)
    mu: float = c["mu_product"]
    as_dict: dict[str, Any] = dict(c)
    assert "mu_product" in as_dict
    return mu


def metadata() -> str:
    f32: npt.NDArray[np.float32] = np.zeros(3, np.float32)
    fa.Adam([f32]).step([f32.copy()])
    print(fa.config.PARALLEL_THRESHOLD + 1)
    return fa.__version__


def _rejected() -> None:  # never called: each line is an error the checker must report
    w = np.zeros(3)
    fa.Adam([w], lr="fast")  # type: ignore[arg-type]
    fa.Adam([w], sparse_mode="eager")  # type: ignore[arg-type]
    fa.Adam([w], nonfinite="ignore")  # type: ignore[arg-type]
    fa.Adam([w], 1e-3, (0.9, 0.999), 1e-8, 0.0, False, True)  # type: ignore[call-arg]
    fa.SparseAdam([w], sparse_mode="lazy")  # type: ignore[call-arg]
    fa.AdamW([w], decoupled_weight_decay=False)  # type: ignore[call-arg]
    fa.Adam([w], betas=(0.9, 0.999, 0.5))  # type: ignore[arg-type]
    fa.Adam([w]).step([w], [w])  # type: ignore[call-arg]
    F.adam(w, w, w, w, 1)  # type: ignore[call-arg]
    F.adam(w, w, w, w, step=1.5)  # type: ignore[arg-type]
    F.adam(w, w, w, w, step=1).keys()  # type: ignore[func-returns-value, attr-defined]
    fa.Addam([w])  # type: ignore[attr-defined]
    F.nadam(w, w, w, w, step=1)["mu"]  # type: ignore[typeddict-item]


if __name__ == "__main__":
    print(readme_dense(), readme_sparse(), functional_layer(), metadata())
    readme_groups()
