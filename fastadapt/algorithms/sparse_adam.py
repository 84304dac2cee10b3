"""SparseAdam, as torch.optim.SparseAdam; the spec's section "SparseAdam".

Lazy Adam for sparse gradients: only touched entries change (parameter and moments); the
step count advances at every step, also when a gradient is empty.  Epsilon in the
"epsilon-hat" form ``lr*sqrt(bc2)/bc1 * m / (sqrt(v) + eps)``.
"""

import math
from typing import Any, Mapping, NamedTuple


from ._spec import Algorithm, Hyper, betas, flag, positive, scalar_type


class Scalars(NamedTuple):
    maximize: bool
    one_minus_beta1: float
    one_minus_beta2: float
    neg_step_size: float         # -lr * sqrt(1 - beta2**t) / (1 - beta1**t)
    eps: float


def rule(p: Any, s1: Any, s2: Any, s3: Any, i: int, g: Any, k: Scalars) -> None:
    """SparseAdam: ``s1`` = exp_avg, ``s2`` = exp_avg_sq."""
    if k.maximize:
        g = -g
    m_old = s1[i]
    u1 = (g - m_old) * k.one_minus_beta1
    s1[i] = m_old + u1
    v_old = s2[i]
    u2 = (g * g - v_old) * k.one_minus_beta2
    s2[i] = v_old + u2
    numer = u1 + m_old
    denom = math.sqrt(u2 + v_old) + k.eps
    p[i] = p[i] + k.neg_step_size * (numer / denom)


def scalars(dtype: Any, step: int, h: Mapping[str, Any], carry: Mapping[str, float]) -> Scalars:
    dt = scalar_type(dtype)
    beta1, beta2 = float(h["betas"][0]), float(h["betas"][1])
    t = float(step)
    bias_correction1 = 1 - beta1 ** t
    bias_correction2 = 1 - beta2 ** t
    step_size = h["lr"] * math.sqrt(bias_correction2) / bias_correction1
    return Scalars(bool(h["maximize"]), dt(1 - beta1), dt(1 - beta2), dt(-step_size), dt(h["eps"]))


SPARSE_ADAM = Algorithm(
    name="SparseAdam",
    summary="""torch.optim.SparseAdam: lazy Adam for sparse gradients (CSR or RowGrad).

    Only touched entries change (parameter and moments); the step count advances at every
    step, also when a gradient is empty, and bias-corrects every entry.  Epsilon is in the
    "epsilon-hat" form ``lr*sqrt(bc2)/bc1 * m / (sqrt(v) + eps)``, so even a gradient holding
    every entry differs from Adam (use Adam with ``sparse_mode="lazy"`` for Adam's own
    epsilon).  Dense gradients are refused.""",
    rule=rule,
    scalars=scalars,
    slots=("exp_avg", "exp_avg_sq", None),
    signed=(True, False, True),
    hypers=(
        Hyper("lr", 1e-3, positive, "learning rate, > 0"),
        Hyper("betas", (0.9, 0.999), betas, "decays of the moments, each in [0, 1)", "(float, float)"),
        Hyper("eps", 1e-8, positive, "added to sqrt(v), > 0 (epsilon-hat form)"),
        Hyper("maximize", False, flag, "maximise the objective instead of minimising it", "bool"),
    ),
    accepts_dense=False,
    sparse_mode=False,
)
