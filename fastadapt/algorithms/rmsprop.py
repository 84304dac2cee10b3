"""RMSprop (Hinton), as torch.optim.RMSprop; the spec's section "RMSprop".

State: ``square_avg`` (slot 1), ``momentum_buffer`` (slot 2, with momentum > 0),
``grad_avg`` (slot 3, when centered).  The centered variance is clamped at 0 (torch lets
rounding make it negative and returns NaN).
"""

import math
from typing import Any, Mapping, NamedTuple, Tuple


from ._spec import Algorithm, Decay, ExactPlan, FUSED, Hyper, flag, fma, nonneg, scalar_type


class Scalars(NamedTuple):
    maximize: bool
    centered: bool
    use_momentum: bool
    weight_decay: float
    alpha: float
    one_minus_alpha: float
    lerp_one_minus_w: float      # 1 - (1 - alpha), in the array dtype (lerp's second branch)
    eps: float
    momentum: float
    neg_lr: float


def rule(p: Any, s1: Any, s2: Any, s3: Any, i: int, g: Any, k: Scalars) -> None:
    """RMSprop: ``s1`` = square_avg, ``s2`` = momentum_buffer, ``s3`` = grad_avg."""
    if k.maximize:
        g = -g
    x = p[i]
    if k.weight_decay != 0:
        g = fma(k.weight_decay, x, g)               # torch: g.add(p, alpha=wd), one rounding
    # torch's CPU kernels round addcmul, lerp and add(alpha) once each: so do these fma calls
    v = fma(k.one_minus_alpha * g, g, s1[i] * k.alpha)
    s1[i] = v
    if k.centered:
        ga = s3[i]
        if k.one_minus_alpha < 0.5:                       # lerp(ga, g, 1 - alpha)
            ga = fma(k.one_minus_alpha, g - ga, ga)
        else:
            ga = fma(-k.lerp_one_minus_w, g - ga, g)
        s3[i] = ga
        var = fma(-ga, ga, v)
        if var < 0:          # rounding can make it negative; NaN passes through
            var = var - var
        d = math.sqrt(var)
    else:
        d = math.sqrt(v)
    d = d + k.eps
    if k.use_momentum:
        b = s2[i] * k.momentum + g / d
        s2[i] = b
        p[i] = fma(k.neg_lr, b, x)
    else:
        p[i] = x + (k.neg_lr * g) / d


def scalars(dtype: Any, step: int, h: Mapping[str, Any], carry: Mapping[str, float]) -> Scalars:
    dt = scalar_type(dtype)
    one_minus_alpha = dt(1 - h["alpha"])
    return Scalars(bool(h["maximize"]), bool(h["centered"]), bool(h["momentum"] > 0),
                   dt(h["weight_decay"]), dt(h["alpha"]), one_minus_alpha, dt(1) - one_minus_alpha,
                   dt(h["eps"]), dt(h["momentum"]), dt(-h["lr"]))


def buffers(h: Mapping[str, Any]) -> Tuple[str, ...]:
    return ("square_avg",) + (("momentum_buffer",) if h["momentum"] > 0 else ()) + (
        ("grad_avg",) if h["centered"] else ())


def exact(h: Mapping[str, Any]) -> ExactPlan:
    # without momentum or weight decay a zero gradient leaves p alone and multiplies the
    # averages by alpha: caught up per row in closed form
    if (h["momentum"] == 0 and h["weight_decay"] == 0 and h["eps"] > 0 and h["alpha"] <= 1
            and math.isfinite(h["lr"])):
        return Decay(base=float(h["alpha"]), slots=(True, False, bool(h["centered"])))
    return FUSED


RMSPROP = Algorithm(
    name="RMSprop",
    summary="""RMSprop (Hinton), with torch.optim.RMSprop's arguments and defaults.

    Divides by the root of a decaying average of squared gradients.  Note the default
    ``alpha=0.99`` (torch); Keras and the original lecture use 0.9.  Exact sparse mode
    catches untouched rows up in closed form when momentum and weight decay are 0.""",
    rule=rule,
    scalars=scalars,
    slots=("square_avg", "momentum_buffer", "grad_avg"),
    signed=(False, True, True),
    hypers=(
        Hyper("lr", 1e-2, nonneg, "learning rate"),
        Hyper("alpha", 0.99, nonneg, "decay of the squared-gradient average"),
        Hyper("eps", 1e-8, nonneg, "added after the square root"),
        Hyper("weight_decay", 0.0, nonneg, "L2 penalty, added to the gradient"),
        Hyper("momentum", 0.0, nonneg, "momentum of g / (sqrt(v) + eps); lr stays outside the buffer"),
        Hyper("centered", False, flag, "divide by an estimate of the variance (v - mean(g)**2, "
              "clamped at 0) instead of the raw second moment", "bool"),
        Hyper("maximize", False, flag, "maximise the objective instead of minimising it", "bool",
              keyword_only=True),
    ),
    buffers=buffers,
    exact=exact,
    functional="rmsprop",
)
