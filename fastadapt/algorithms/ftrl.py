"""FTRL-Proximal (McMahan et al. 2013, Algorithm 1), as Keras' ``keras.optimizers.Ftrl``;
the spec's section "Ftrl".

Keras' arguments under torch-style names: ``learning_rate`` -> ``lr``,
``learning_rate_power`` -> ``lr_power``, ``l1_regularization_strength`` -> ``l1``,
``l2_regularization_strength`` -> ``l2``, ``l2_shrinkage_regularization_strength`` ->
``l2_shrinkage``; ``initial_accumulator_value`` and ``beta`` keep their names, and
``maximize`` negates the gradient first, as in the other optimizers.

State: ``accumulator`` (slot 1, ``n``), filled with the group's ``initial_accumulator_value``,
and ``linear`` (slot 2, ``z``, zeros), created when the parameter is added, as Keras builds its
variables before the first step (and as Adagrad's ``sum``): a compressed ``state_dtype`` then
stores the fill once, and the first step decodes it like every later one.

The update of one element, in evaluation order (every operation rounded to the parameter
dtype; ``two_shrinkage = 2 * l2_shrinkage`` and ``two_l2_reg = 2 * (l2 + beta / (2 * lr))``
are Python float64 scalars rounded to the dtype, as Keras folds ``beta`` into ``l2``)::

    g = -g if maximize
    g_shrunk  = g + two_shrinkage * w
    n_new     = n + g * g
    pn        = root(n_new)                     # sqrt if lr_power == -0.5, else pow(n_new, -lr_power)
    sigma     = (pn - root(n)) / lr
    z         = z + (g_shrunk - sigma * w)
    quadratic = pn / lr + two_l2_reg
    w         = (clip(z, -l1, l1) - z) / quadratic    # 0 where |z| <= l1
    n         = n_new

``root`` is the paper's ``sqrt`` for the default ``lr_power = -0.5`` (Algorithm 1 is written with
square roots, TensorFlow's FTRL kernel special-cases it, numpy's ``power(x, 0.5)`` is ``sqrt``): it is
correctly rounded on every backend, so the default update is reproducible bit for bit.  Any other
``lr_power`` uses ``math.pow`` (the C library's ``pow``/``powf`` on the CPU), which is not correctly
rounded; the numpy reference calls the same C function.

Exact sparse mode is always ``FUSED``.  A zero gradient leaves ``n`` alone and, without
shrinkage, ``z`` too, and recomputes ``w`` from ``(z, n)``: that reproduces ``w`` only where
``w`` was itself produced by the formula, i.e. on elements updated before.  An element never
touched keeps its initial value under a lazy step, while the dense step with ``g = 0`` sets it
to the FTRL solution for ``z = 0``, which is 0; with ``l2_shrinkage > 0`` ``z`` moves as well.
So only the fused pass (the rule with ``g = 0`` on every untouched element) equals the dense
step.
"""

import math
from typing import Any, Mapping, NamedTuple


from ._spec import Algorithm, ExactPlan, FUSED, Hyper, check_number, flag, nonneg, positive, scalar_type


class Scalars(NamedTuple):
    maximize: bool
    sqrt_power: bool         # lr_power == -0.5: sqrt (the paper's Algorithm 1) instead of pow
    two_shrinkage: float     # 2 * l2_shrinkage
    neg_power: float         # -lr_power
    lr: float
    two_l2_reg: float        # 2 * (l2 + beta / (2 * lr))
    l1: float
    neg_l1: float


def rule(p: Any, s1: Any, s2: Any, s3: Any, i: int, g: Any, k: Scalars) -> None:
    """FTRL-Proximal: ``s1`` = accumulator (n), ``s2`` = linear (z)."""
    if k.maximize:
        g = -g
    x = p[i]
    n = s1[i]
    gs = g + k.two_shrinkage * x
    n_new = n + g * g
    if k.sqrt_power:
        pn = math.sqrt(n_new)
        po = math.sqrt(n)
    else:
        pn = math.pow(n_new, k.neg_power)
        po = math.pow(n, k.neg_power)
    sigma = (pn - po) / k.lr
    z = s2[i] + (gs - sigma * x)
    s2[i] = z
    quadratic = pn / k.lr + k.two_l2_reg
    c = z                                       # clip(z, -l1, l1); NaN passes through
    if z > k.l1:
        c = k.l1
    elif z < k.neg_l1:
        c = k.neg_l1
    p[i] = (c - z) / quadratic
    s1[i] = n_new


def scalars(dtype: Any, step: int, h: Mapping[str, Any], carry: Mapping[str, float]) -> Scalars:
    dt = scalar_type(dtype)
    lr = float(h["lr"])
    two_l2_reg = 2.0 * (h["l2"] + h["beta"] / (2.0 * lr))
    return Scalars(bool(h["maximize"]), float(h["lr_power"]) == -0.5, dt(2.0 * h["l2_shrinkage"]),
                   dt(-h["lr_power"]), dt(lr), dt(two_l2_reg), dt(h["l1"]), dt(-h["l1"]))


def nonpositive(name: str, value: Any) -> None:
    """A real number <= 0 (Keras: ``learning_rate_power`` "needs to be negative or zero")."""
    check_number(name, value, None, 0.0, high_inclusive=True)


def exact(h: Mapping[str, Any]) -> ExactPlan:
    # never lazy: a zero gradient sets a never-updated element to the FTRL solution (see above)
    return FUSED


FTRL = Algorithm(
    name="Ftrl",
    summary="""FTRL-Proximal (McMahan et al. 2013), with Keras' Ftrl semantics and defaults.

    Follow-the-regularized-leader with per-coordinate learning rates ``lr / n**(-lr_power)``
    (``n`` the accumulated squared gradients): L1 (``l1``) drives weights to exactly 0, online
    L2 (``l2``, ``beta``) stabilises, and ``l2_shrinkage`` adds an L2 magnitude penalty to the
    gradient.  Suited to shallow models over large, sparse feature spaces.  There is no
    torch.optim counterpart.  Exact sparse mode is a fused pass over the whole parameter
    (a zero gradient moves a never-updated weight to 0).""",
    rule=rule,
    scalars=scalars,
    slots=("accumulator", "linear", None),
    signed=(False, True, True),
    hypers=(
        Hyper("lr", 1e-3, positive, "learning rate (Keras' learning_rate)"),
        Hyper("lr_power", -0.5, nonpositive,
              "power of the accumulator in the per-coordinate rate, <= 0; 0 is a fixed rate "
              "(Keras' learning_rate_power)"),
        Hyper("initial_accumulator_value", 0.1, nonneg, "initial value of the accumulator state",
              functional=False),
        Hyper("l1", 0.0, nonneg, "L1 regularisation strength (Keras' l1_regularization_strength)"),
        Hyper("l2", 0.0, nonneg, "online L2 regularisation strength (Keras' l2_regularization_strength)"),
        Hyper("l2_shrinkage", 0.0, nonneg,
              "L2 magnitude penalty added to the gradient as 2 * l2_shrinkage * w "
              "(Keras' l2_shrinkage_regularization_strength)"),
        Hyper("beta", 0.0, nonneg, "the paper's beta: adds beta / lr to the quadratic term"),
        Hyper("maximize", False, flag, "maximise the objective instead of minimising it", "bool",
              keyword_only=True),
    ),
    fill=lambda h, name: h["initial_accumulator_value"] if name == "accumulator" else 0.0,
    exact=exact,
    eager_state=True,
    functional="ftrl",
)
