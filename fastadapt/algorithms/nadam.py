"""NAdam (Dozat), as torch.optim.NAdam; the spec's section "NAdam".

State: ``exp_avg`` (slot 1), ``exp_avg_sq`` (slot 2) and the carried scalar ``mu_product``,
the product of the momentum schedule mu_1 ... mu_t, kept per parameter as a Python float
(float64; torch keeps a 0-d tensor of its default dtype).
"""

import math
from typing import Any, Dict, Mapping, NamedTuple

import numpy as np

from .adam import moments
from ._spec import Algorithm, Hyper, betas, flag, nonneg, scalar_type


class Scalars(NamedTuple):
    maximize: bool
    decoupled: bool
    weight_decay: float
    decay_factor: float          # 1 - lr * weight_decay (decoupled form)
    one_minus_beta1: float
    lerp_one_minus_w: float      # 1 - (1 - beta1), in the array dtype
    beta2: float
    one_minus_beta2: float
    bias_correction2: float      # 1 - beta2**t
    eps: float
    grad_coef: float             # -lr * (1 - mu_t) / (1 - mu_product)
    avg_coef: float              # (-lr * mu_{t+1}) / (1 - mu_product * mu_{t+1})


def rule(p: Any, s1: Any, s2: Any, s3: Any, i: int, g: Any, k: Scalars) -> None:
    """NAdam: ``s1`` = exp_avg, ``s2`` = exp_avg_sq."""
    g, x, m, v = moments(p, s1, s2, s3, i, g, k)      # the Adam family's common lines
    denom = math.sqrt(v / k.bias_correction2) + k.eps
    x = x + (k.grad_coef * g) / denom
    p[i] = x + (k.avg_coef * m) / denom


def momentum_cache(beta1: float, momentum_decay: float, t: float) -> float:
    """mu_t = beta1 * (1 - 0.5 * 0.96 ** (t * momentum_decay)), in float64."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (t * momentum_decay)))


def advance(step: int, h: Mapping[str, Any], carry: Mapping[str, float]) -> Dict[str, float]:
    mu = momentum_cache(float(h["betas"][0]), h["momentum_decay"], float(step))
    return {"mu_product": carry["mu_product"] * mu}


def scalars(dtype: Any, step: int, h: Mapping[str, Any], carry: Mapping[str, float]) -> Scalars:
    dt = scalar_type(dtype)
    lr, wd = h["lr"], h["weight_decay"]
    beta1, beta2 = float(h["betas"][0]), float(h["betas"][1])
    t = float(step)
    mu = momentum_cache(beta1, h["momentum_decay"], t)
    mu_next = momentum_cache(beta1, h["momentum_decay"], t + 1)
    mu_product = np.float64(carry["mu_product"])                # after this step's advance
    with np.errstate(divide="ignore", invalid="ignore"):        # IEEE: a product of 1 gives inf, not an error
        grad_coef = np.float64(-lr * (1.0 - mu)) / (1.0 - mu_product)
        avg_coef = np.float64(-lr * mu_next) / (1.0 - mu_product * mu_next)
    w = dt(1 - beta1)
    return Scalars(bool(h["maximize"]), bool(h["decoupled_weight_decay"]), dt(wd), dt(1 - lr * wd), w,
                   dt(1) - w, dt(beta2), dt(1 - beta2), dt(1 - beta2 ** t), dt(h["eps"]),
                   dt(grad_coef), dt(avg_coef))


NADAM = Algorithm(
    name="NAdam",
    summary="""NAdam (Dozat), with torch.optim.NAdam's arguments and defaults.

    Adam with Nesterov momentum and a warming momentum schedule
    ``mu_t = beta1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))``; the product of the schedule,
    ``mu_product``, is carried per parameter in float64.""",
    rule=rule,
    scalars=scalars,
    slots=("exp_avg", "exp_avg_sq", None),
    signed=(True, False, True),
    hypers=(
        Hyper("lr", 2e-3, nonneg, "learning rate"),
        Hyper("betas", (0.9, 0.999), betas, "decays of the first and second moments, each in [0, 1)",
              "(float, float)"),
        Hyper("eps", 1e-8, nonneg, "added after the bias-corrected square root"),
        Hyper("weight_decay", 0.0, nonneg, "L2 penalty added to the gradient, or with "
              "``decoupled_weight_decay=True`` the decay ``p *= 1 - lr * weight_decay``"),
        Hyper("momentum_decay", 4e-3, nonneg, "psi of the momentum schedule"),
        Hyper("decoupled_weight_decay", False, flag, "decoupled weight decay (as AdamW; NAdamW)", "bool"),
        Hyper("maximize", False, flag, "maximise the objective instead of minimising it", "bool",
              keyword_only=True),
    ),
    carry=(("mu_product", 1.0),),
    advance=advance,
    functional="nadam",
)
