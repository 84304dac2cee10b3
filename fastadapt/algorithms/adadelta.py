"""Adadelta (Zeiler), as torch.optim.Adadelta; the spec's section "Adadelta".

State: ``square_avg`` (slot 1), ``acc_delta`` (slot 2).  eps sits inside both square roots
and lr (default 1.0) scales the step, as in torch.
"""

import math
from typing import Any, Mapping, NamedTuple


from ._spec import Algorithm, Decay, ExactPlan, FUSED, Hyper, flag, fma, nonneg, scalar_type, unit_interval


class Scalars(NamedTuple):
    maximize: bool
    weight_decay: float
    rho: float
    one_minus_rho: float
    eps: float
    neg_lr: float


def rule(p: Any, s1: Any, s2: Any, s3: Any, i: int, g: Any, k: Scalars) -> None:
    """Adadelta: ``s1`` = square_avg, ``s2`` = acc_delta."""
    if k.maximize:
        g = -g
    x = p[i]
    if k.weight_decay != 0:
        g = fma(k.weight_decay, x, g)               # torch: g.add(p, alpha=wd), one rounding
    v = s1[i] * k.rho + (k.one_minus_rho * g) * g
    s1[i] = v
    u = s2[i]
    delta = math.sqrt(u + k.eps) / math.sqrt(v + k.eps) * g
    s2[i] = u * k.rho + (k.one_minus_rho * delta) * delta
    p[i] = x + k.neg_lr * delta


def scalars(dtype: Any, step: int, h: Mapping[str, Any], carry: Mapping[str, float]) -> Scalars:
    dt = scalar_type(dtype)
    return Scalars(bool(h["maximize"]), dt(h["weight_decay"]), dt(h["rho"]), dt(1 - h["rho"]),
                   dt(h["eps"]), dt(-h["lr"]))


def exact(h: Mapping[str, Any]) -> ExactPlan:
    # without weight decay a zero gradient leaves p where it is (delta = ratio * 0 = 0, the
    # ratio being finite when eps > 0) and multiplies both averages by rho
    if h["weight_decay"] == 0 and h["eps"] > 0 and math.isfinite(h["lr"]):
        return Decay(base=float(h["rho"]), slots=(True, True, False))
    return FUSED


ADADELTA = Algorithm(
    name="Adadelta",
    summary="""Adadelta (Zeiler), with torch.optim.Adadelta's arguments and defaults.

    Scales the gradient by sqrt(acc_delta + eps) / sqrt(square_avg + eps), two decaying
    averages (of past updates and of squared gradients), then by ``lr`` (default 1.0).  Exact
    sparse mode catches untouched rows up in closed form when weight decay is 0.""",
    rule=rule,
    scalars=scalars,
    slots=("square_avg", "acc_delta", None),
    signed=(False, False, True),
    hypers=(
        Hyper("lr", 1.0, nonneg, "learning rate, scaling the Adadelta update"),
        Hyper("rho", 0.9, unit_interval, "decay of both running averages, in [0, 1]"),
        Hyper("eps", 1e-6, nonneg, "added inside both square roots"),
        Hyper("weight_decay", 0.0, nonneg, "L2 penalty, added to the gradient"),
        Hyper("maximize", False, flag, "maximise the objective instead of minimising it", "bool",
              keyword_only=True),
    ),
    exact=exact,
    functional="adadelta",
)
