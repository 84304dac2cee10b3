"""RAdam (Liu et al.), as torch.optim.RAdam; the spec's section "RAdam".

State: ``exp_avg`` (slot 1), ``exp_avg_sq`` (slot 2).  The adaptive, rectified step is taken
when the length of the approximated SMA exceeds 5 (``rho_t > 5``, torch's threshold);
before that the step is the bias-corrected momentum alone.
"""

import math
from typing import Any, Mapping, NamedTuple


from .adam import moments
from ._spec import Algorithm, Hyper, betas, flag, nonneg, scalar_type


class Scalars(NamedTuple):
    maximize: bool
    decoupled: bool
    rectify: bool                # rho_t > 5
    weight_decay: float
    decay_factor: float          # 1 - lr * weight_decay (decoupled form)
    one_minus_beta1: float
    lerp_one_minus_w: float      # 1 - (1 - beta1), in the array dtype
    beta2: float
    one_minus_beta2: float
    bias_correction1: float      # 1 - beta1**t
    lr: float
    one: float
    bc2_sqrt: float              # (1 - beta2**t) ** 0.5
    eps: float
    rect: float                  # the variance rectification term (1 when not rectifying)


def rule(p: Any, s1: Any, s2: Any, s3: Any, i: int, g: Any, k: Scalars) -> None:
    """RAdam: ``s1`` = exp_avg, ``s2`` = exp_avg_sq."""
    g, x, m, v = moments(p, s1, s2, s3, i, g, k)      # the Adam family's common lines
    step = (m / k.bias_correction1) * k.lr
    if k.rectify:
        adaptive = (k.one / (math.sqrt(v) + k.eps)) * k.bc2_sqrt
        step = (step * adaptive) * k.rect
    p[i] = x - step


def scalars(dtype: Any, step: int, h: Mapping[str, Any], carry: Mapping[str, float]) -> Scalars:
    dt = scalar_type(dtype)
    lr, wd = h["lr"], h["weight_decay"]
    beta1, beta2 = float(h["betas"][0]), float(h["betas"][1])
    t = float(step)
    bias_correction1 = 1 - beta1 ** t
    bias_correction2 = 1 - beta2 ** t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * (beta2 ** t) / bias_correction2
    rectify = rho_t > 5.0
    rect = 1.0
    if rectify:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
    w = dt(1 - beta1)
    return Scalars(bool(h["maximize"]), bool(h["decoupled_weight_decay"]), bool(rectify), dt(wd),
                   dt(1 - lr * wd), w, dt(1) - w, dt(beta2), dt(1 - beta2), dt(bias_correction1), dt(lr),
                   dt(1), dt(bias_correction2 ** 0.5), dt(h["eps"]), dt(rect))


RADAM = Algorithm(
    name="RAdam",
    summary="""RAdam (Liu et al.), with torch.optim.RAdam's arguments and defaults.

    Adam whose adaptive step is switched on, and rectified, only once the variance of the
    adaptive learning rate is tractable (``rho_t > 5``); until then the step is SGD with
    bias-corrected momentum.""",
    rule=rule,
    scalars=scalars,
    slots=("exp_avg", "exp_avg_sq", None),
    signed=(True, False, True),
    hypers=(
        Hyper("lr", 1e-3, nonneg, "learning rate"),
        Hyper("betas", (0.9, 0.999), betas, "decays of the first and second moments, each in [0, 1)",
              "(float, float)"),
        Hyper("eps", 1e-8, nonneg, "added after the square root of the second moment"),
        Hyper("weight_decay", 0.0, nonneg, "L2 penalty added to the gradient, or with "
              "``decoupled_weight_decay=True`` the decay ``p *= 1 - lr * weight_decay``"),
        Hyper("decoupled_weight_decay", False, flag, "decoupled weight decay (as AdamW)", "bool"),
        Hyper("maximize", False, flag, "maximise the objective instead of minimising it", "bool",
              keyword_only=True),
    ),
    functional="radam",
)
