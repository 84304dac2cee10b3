"""Adam (Kingma & Ba) and AdamW (Loshchilov & Hutter), as torch.optim.Adam / AdamW; the spec's
sections "Adam" and "AdamW".

State: ``exp_avg`` (slot 1), ``exp_avg_sq`` (slot 2), ``max_exp_avg_sq`` (slot 3, with
amsgrad).  Epsilon is added after the bias-corrected square root (Algorithm 1), not in the
"epsilon-hat" form of Keras/TF (that is :mod:`fastadapt.algorithms.sparse_adam`'s).
"""

import math
from typing import Any, Mapping, NamedTuple, Tuple


from ._spec import Algorithm, Hyper, betas, flag, fma, nonneg, rule_helper, scalar_type


class Scalars(NamedTuple):
    maximize: bool
    amsgrad: bool
    decoupled: bool
    weight_decay: float
    decay_factor: float          # 1 - lr * weight_decay (decoupled form)
    one_minus_beta1: float
    lerp_one_minus_w: float      # 1 - (1 - beta1), in the array dtype
    beta2: float
    one_minus_beta2: float
    neg_step_size: float         # -lr / (1 - beta1**t)
    bc2_sqrt: float              # (1 - beta2**t) ** 0.5
    eps: float


@rule_helper
def moments(p: Any, s1: Any, s2: Any, s3: Any, i: int, g: Any, k: Any) -> Any:
    """The Adam family's first lines (Adam, AdamW, NAdam, RAdam): the sign, the weight decay (L2 or
    decoupled), then both moments, stored.  Returns ``(g, x, m, v)``: the gradient after maximize
    and L2, the parameter after decoupled decay, the new ``exp_avg`` and ``exp_avg_sq``.  ``k``
    has the fields used here (each family member's Scalars declares them)."""
    if k.maximize:
        g = -g
    x = p[i]
    if k.weight_decay != 0:
        if k.decoupled:
            x = x * k.decay_factor
        else:
            g = fma(k.weight_decay, x, g)           # torch: g.add(p, alpha=wd), one rounding
    m = s1[i]
    if k.one_minus_beta1 < 0.5:                                # lerp(m, g, 1 - beta1)
        m = m + k.one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * k.lerp_one_minus_w
    s1[i] = m
    v = s2[i] * k.beta2 + (k.one_minus_beta2 * g) * g
    s2[i] = v
    return g, x, m, v


def rule(p: Any, s1: Any, s2: Any, s3: Any, i: int, g: Any, k: Scalars) -> None:
    """Adam/AdamW: ``s1`` = exp_avg, ``s2`` = exp_avg_sq, ``s3`` = max_exp_avg_sq."""
    g, x, m, v = moments(p, s1, s2, s3, i, g, k)
    if k.amsgrad:
        vmax = s3[i]
        if v > vmax or v != v:      # torch.maximum: NaN from either side wins
            vmax = v
        s3[i] = vmax
        denom = math.sqrt(vmax) / k.bc2_sqrt + k.eps
    else:
        denom = math.sqrt(v) / k.bc2_sqrt + k.eps
    p[i] = x + (k.neg_step_size * m) / denom


def scalars(dtype: Any, step: int, h: Mapping[str, Any], carry: Mapping[str, float]) -> Scalars:
    dt = scalar_type(dtype)
    lr, wd = h["lr"], h["weight_decay"]
    beta1, beta2 = float(h["betas"][0]), float(h["betas"][1])
    t = float(step)
    bias_correction1 = 1 - beta1 ** t
    bias_correction2 = 1 - beta2 ** t
    w = dt(1 - beta1)
    return Scalars(bool(h["maximize"]), bool(h["amsgrad"]), bool(h["decoupled_weight_decay"]), dt(wd),
                   dt(1 - lr * wd), w, dt(1) - w, dt(beta2), dt(1 - beta2), dt(-(lr / bias_correction1)),
                   dt(bias_correction2 ** 0.5), dt(h["eps"]))


def buffers(h: Mapping[str, Any]) -> Tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if h["amsgrad"] else ())


_HYPERS = (
    Hyper("lr", 1e-3, nonneg, "learning rate"),
    Hyper("betas", (0.9, 0.999), betas, "decays of the first and second moments, each in [0, 1)",
          "(float, float)"),
    Hyper("eps", 1e-8, nonneg, "added after the bias-corrected square root (Algorithm 1, as torch)"),
    Hyper("weight_decay", 0.0, nonneg, "L2 penalty added to the gradient, or with "
          "``decoupled_weight_decay=True`` AdamW's decay ``p *= 1 - lr * weight_decay``"),
    Hyper("amsgrad", False, flag, "use the running maximum of the (raw) second moment", "bool"),
    Hyper("maximize", False, flag, "maximise the objective instead of minimising it", "bool",
          keyword_only=True),
    Hyper("decoupled_weight_decay", False, flag, "AdamW's decoupled weight decay", "bool",
          keyword_only=True),
)

ADAM = Algorithm(
    name="Adam",
    summary="""Adam (Kingma & Ba), with torch.optim.Adam's arguments and defaults.

    Momentum plus a per-coordinate scale, both bias-corrected with the parameter's own step
    count ``t`` (counted across the whole run, never reset per epoch).""",
    rule=rule,
    scalars=scalars,
    slots=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    signed=(True, False, False),
    hypers=_HYPERS,
    buffers=buffers,
    functional="adam",
)

ADAMW = ADAM.variant(
    name="AdamW",
    summary="""AdamW (Loshchilov & Hutter): Adam with decoupled weight decay.

    ``p *= 1 - lr * weight_decay`` before the moments are updated; the decay follows lr
    schedules and never enters the moments.  Same arguments as Adam but ``weight_decay``
    defaults to 1e-2 and there is no ``decoupled_weight_decay``.""",
    hypers=tuple(Hyper(h.name, 1e-2, h.check, "decoupled weight decay: ``p *= 1 - lr * weight_decay``",
                       h.kind, h.keyword_only) if h.name == "weight_decay" else h
                 for h in _HYPERS if h.name != "decoupled_weight_decay"),
    fixed={"decoupled_weight_decay": True},
    functional="adamw",
    parent="Adam",
)
