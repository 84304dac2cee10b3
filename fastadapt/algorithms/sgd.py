"""SGD with momentum (Polyak / Nesterov), as torch.optim.SGD; the spec's section "SGD".

State: ``momentum_buffer`` (slot 1, when momentum > 0).  As in torch, the buffer of the
parameter's first step is the gradient itself (no dampening); a buffer that momentum switched
on later needs is created with zeros and follows the general recurrence (see the spec).
"""

import math
from typing import Any, Mapping, NamedTuple, Tuple


from ._spec import Algorithm, ExactPlan, FUSED, Hyper, LAZY, check_number, flag, fma, nonneg, scalar_type


class Scalars(NamedTuple):
    maximize: bool
    use_momentum: bool
    first: bool                  # the parameter's first step: the buffer is the gradient
    nesterov: bool
    weight_decay: float
    momentum: float
    one_minus_dampening: float
    neg_lr: float


def rule(p: Any, s1: Any, s2: Any, s3: Any, i: int, g: Any, k: Scalars) -> None:
    """SGD: ``s1`` = momentum_buffer."""
    if k.maximize:
        g = -g
    x = p[i]
    if k.weight_decay != 0:
        g = fma(k.weight_decay, x, g)               # torch: g.add(p, alpha=wd), one rounding
    if k.use_momentum:
        if k.first:
            b = g
        else:
            b = s1[i] * k.momentum + k.one_minus_dampening * g
        s1[i] = b
        if k.nesterov:
            g = g + k.momentum * b
        else:
            g = b
    p[i] = x + k.neg_lr * g


def scalars(dtype: Any, step: int, h: Mapping[str, Any], carry: Mapping[str, float]) -> Scalars:
    dt = scalar_type(dtype)
    return Scalars(bool(h["maximize"]), bool(h["momentum"] != 0), step == 1, bool(h["nesterov"]),
                   dt(h["weight_decay"]), dt(h["momentum"]), dt(1 - h["dampening"]), dt(-h["lr"]))


def buffers(h: Mapping[str, Any]) -> Tuple[str, ...]:
    return ("momentum_buffer",) if h["momentum"] != 0 else ()


def exact(h: Mapping[str, Any]) -> ExactPlan:
    # without momentum or weight decay a zero gradient leaves p where it is
    if h["momentum"] == 0 and h["weight_decay"] == 0 and math.isfinite(h["lr"]):
        return LAZY
    return FUSED


def real(name: str, value: Any) -> None:
    """Any real number (torch does not bound SGD's dampening)."""
    check_number(name, value)


def validate(h: Mapping[str, Any]) -> None:
    if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


SGD = Algorithm(
    name="SGD",
    summary="""Stochastic gradient descent with optional momentum, with torch.optim.SGD's arguments
    and defaults.

    ``p -= lr * g`` (heavy-ball or Nesterov momentum on request; the learning rate stays
    outside the momentum buffer).  The buffer of the parameter's first step is the gradient
    itself, as in torch.  Exact sparse mode costs O(nnz) without momentum and weight decay.""",
    rule=rule,
    scalars=scalars,
    slots=("momentum_buffer", None, None),
    hypers=(
        Hyper("lr", 1e-3, nonneg, "learning rate"),
        Hyper("momentum", 0.0, nonneg, "momentum factor (0: plain SGD, no buffer)"),
        Hyper("dampening", 0.0, real, "the buffer takes (1 - dampening) * g after its first step"),
        Hyper("weight_decay", 0.0, nonneg, "L2 penalty, added to the gradient"),
        Hyper("nesterov", False, flag, "Nesterov momentum: step along g + momentum * buffer "
              "(needs momentum > 0 and dampening 0)", "bool"),
        Hyper("maximize", False, flag, "maximise the objective instead of minimising it", "bool",
              keyword_only=True),
    ),
    buffers=buffers,
    exact=exact,
    validate=validate,
    functional="sgd",
)
