"""Adamax (Kingma & Ba, section 7.1), as torch.optim.Adamax; the spec's section "Adamax".

State: ``exp_avg`` (slot 1), ``exp_inf`` (slot 2).  eps is inside the maximum,
``u = max(beta2 * u, |g| + eps)``, as in torch.
"""

from typing import Any, Mapping, NamedTuple


from ._spec import Algorithm, Hyper, betas, flag, fma, nonneg, scalar_type


class Scalars(NamedTuple):
    maximize: bool
    weight_decay: float
    one_minus_beta1: float
    lerp_one_minus_w: float      # 1 - (1 - beta1), in the array dtype
    beta2: float
    eps: float
    neg_clr: float               # -lr / (1 - beta1**t)


def rule(p: Any, s1: Any, s2: Any, s3: Any, i: int, g: Any, k: Scalars) -> None:
    """Adamax: ``s1`` = exp_avg, ``s2`` = exp_inf."""
    if k.maximize:
        g = -g
    x = p[i]
    if k.weight_decay != 0:
        g = fma(k.weight_decay, x, g)               # torch: g.add(p, alpha=wd), one rounding
    m = s1[i]
    if k.one_minus_beta1 < 0.5:                                # lerp(m, g, 1 - beta1)
        m = m + k.one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * k.lerp_one_minus_w
    s1[i] = m
    u = s2[i] * k.beta2
    a = abs(g) + k.eps
    if a > u or a != a:          # torch.maximum: NaN from either side wins
        u = a
    s2[i] = u
    p[i] = x + (k.neg_clr * m) / u


def scalars(dtype: Any, step: int, h: Mapping[str, Any], carry: Mapping[str, float]) -> Scalars:
    dt = scalar_type(dtype)
    beta1, beta2 = float(h["betas"][0]), float(h["betas"][1])
    clr = h["lr"] / (1 - beta1 ** float(step))
    w = dt(1 - beta1)
    return Scalars(bool(h["maximize"]), dt(h["weight_decay"]), w, dt(1) - w, dt(beta2), dt(h["eps"]),
                   dt(-clr))


ADAMAX = Algorithm(
    name="Adamax",
    summary="""Adamax (Kingma & Ba, section 7.1), with torch.optim.Adamax's arguments and defaults.

    Adam with the infinity norm: the scale is a decaying running maximum of ``|g|`` (eps inside
    the maximum), so only the first moment needs bias correction.""",
    rule=rule,
    scalars=scalars,
    slots=("exp_avg", "exp_inf", None),
    signed=(True, False, True),
    hypers=(
        Hyper("lr", 2e-3, nonneg, "learning rate"),
        Hyper("betas", (0.9, 0.999), betas, "decays of the first moment and of the infinity norm, "
              "each in [0, 1)", "(float, float)"),
        Hyper("eps", 1e-8, nonneg, "added to ``|g|`` inside the running maximum"),
        Hyper("weight_decay", 0.0, nonneg, "L2 penalty, added to the gradient"),
        Hyper("maximize", False, flag, "maximise the objective instead of minimising it", "bool",
              keyword_only=True),
    ),
    functional="adamax",
)
