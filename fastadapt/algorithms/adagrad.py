"""Adagrad (Duchi et al.), as torch.optim.Adagrad; the spec's section "Adagrad".

State: ``sum`` (slot 1), created when the parameter is added, filled with the group's
``initial_accumulator_value`` (torch uses the constructor's value; fastadapt honours a
per-group one).
"""

import math
from typing import Any, Mapping, NamedTuple


from ._spec import Algorithm, ExactPlan, FUSED, Hyper, LAZY, flag, fma, nonneg, scalar_type


class Scalars(NamedTuple):
    maximize: bool
    weight_decay: float
    neg_clr: float          # -lr / (1 + (t - 1) * lr_decay)
    eps: float


def rule(p: Any, s1: Any, s2: Any, s3: Any, i: int, g: Any, k: Scalars) -> None:
    """Adagrad: ``s1`` = sum."""
    if k.maximize:
        g = -g
    x = p[i]
    if k.weight_decay != 0:
        g = fma(k.weight_decay, x, g)               # torch: g.add(p, alpha=wd), one rounding
    s = s1[i] + g * g
    s1[i] = s
    p[i] = x + (k.neg_clr * g) / (math.sqrt(s) + k.eps)


def scalars(dtype: Any, step: int, h: Mapping[str, Any], carry: Mapping[str, float]) -> Scalars:
    dt = scalar_type(dtype)
    clr = h["lr"] / (1 + (step - 1) * h["lr_decay"])
    return Scalars(bool(h["maximize"]), dt(h["weight_decay"]), dt(-clr), dt(h["eps"]))


def exact(h: Mapping[str, Any]) -> ExactPlan:
    # without weight decay a zero gradient leaves sum and p unchanged (eps > 0 keeps 0/0 out)
    if h["weight_decay"] == 0 and h["eps"] > 0 and math.isfinite(h["lr"]):
        return LAZY
    return FUSED


ADAGRAD = Algorithm(
    name="Adagrad",
    summary="""Adagrad (Duchi et al.), with torch.optim.Adagrad's arguments and defaults.

    Accumulates squared gradients forever, so the step size of a dense, frequently updated
    coordinate decays like 1/sqrt(t): suited to sparse features.  Exact sparse mode costs
    O(nnz) without weight decay (a zero gradient changes nothing).""",
    rule=rule,
    scalars=scalars,
    slots=("sum", None, None),
    signed=(False, True, True),
    hypers=(
        Hyper("lr", 1e-2, nonneg, "learning rate"),
        Hyper("lr_decay", 0.0, nonneg, "inverse-time decay: step t uses lr / (1 + (t - 1) * lr_decay)"),
        Hyper("weight_decay", 0.0, nonneg, "L2 penalty, added to the gradient"),
        Hyper("initial_accumulator_value", 0.0, nonneg,
              "initial value of the sum state; unlike torch, a per-group value is honoured",
              functional=False),
        Hyper("eps", 1e-10, nonneg, "added to sqrt(sum)"),
        Hyper("maximize", False, flag, "maximise the objective instead of minimising it", "bool",
              keyword_only=True),
    ),
    fill=lambda h, name: h["initial_accumulator_value"],
    exact=exact,
    eager_state=True,
    functional="adagrad",
    functional_args={"sum": "state_sum"},
)
