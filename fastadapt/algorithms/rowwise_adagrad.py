"""Row-wise Adagrad, as FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` (TorchRec's ``RowWiseAdagrad``);
the spec's section "RowwiseAdagrad".

A row rule (:attr:`~fastadapt.algorithms.Algorithm.rows`): one accumulator per row of the
parameter's row view, ``sum`` (slot 1, shape ``(nrows,)``), created when the parameter is added
(filled with 0, as FBGEMM's ``momentum1``).  A 1M x 64 float32 table's state is 3.8 MiB where
Adagrad's is 244 MiB.
"""

import math
from typing import Any, Mapping, NamedTuple

from ._spec import Algorithm, Hyper, fma, nonneg, one_of, scalar_type
from .adagrad import exact as adagrad_exact


class Scalars(NamedTuple):
    l2: bool                # weight_decay > 0 and weight_decay_mode == "l2"
    weight_decay: float
    lr: float
    eps: float
    one: float
    shrink: float           # 1 - lr * weight_decay (decoupled), else 1


def rule(p: Any, s1: Any, s2: Any, s3: Any, r: int, g: Any, width: Any, k: Scalars) -> None:
    """Row-wise Adagrad on row ``r`` (``p``, gradient ``g``): ``s1[r]`` = sum."""
    n = p.size
    wd = k.weight_decay
    # the sum of squares in 8 lanes (element j goes to lane j % 8, a fused multiply-add each, as
    # FBGEMM's AVX2 kernel), combined pairwise: a fixed order with 8 independent chains (a single
    # running sum would be one chain of dependent adds)
    z = width - width                                   # 0 in the parameter's dtype
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z
    m8 = n - n % 8
    for j in range(0, m8, 8):
        if k.l2:                                        # FBGEMM: grad += weight_decay * w
            h0 = fma(wd, p[j], g[j])
            h1 = fma(wd, p[j + 1], g[j + 1])
            h2 = fma(wd, p[j + 2], g[j + 2])
            h3 = fma(wd, p[j + 3], g[j + 3])
            h4 = fma(wd, p[j + 4], g[j + 4])
            h5 = fma(wd, p[j + 5], g[j + 5])
            h6 = fma(wd, p[j + 6], g[j + 6])
            h7 = fma(wd, p[j + 7], g[j + 7])
        else:
            h0 = g[j]
            h1 = g[j + 1]
            h2 = g[j + 2]
            h3 = g[j + 3]
            h4 = g[j + 4]
            h5 = g[j + 5]
            h6 = g[j + 6]
            h7 = g[j + 7]
        a0 = fma(h0, h0, a0)
        a1 = fma(h1, h1, a1)
        a2 = fma(h2, h2, a2)
        a3 = fma(h3, h3, a3)
        a4 = fma(h4, h4, a4)
        a5 = fma(h5, h5, a5)
        a6 = fma(h6, h6, a6)
        a7 = fma(h7, h7, a7)
    for j in range(m8, n):                              # the tail: lanes 0 .. n % 8 - 1
        h = g[j]
        if k.l2:
            h = fma(wd, p[j], g[j])
        lane = j - m8
        if lane == 0:
            a0 = fma(h, h, a0)
        elif lane == 1:
            a1 = fma(h, h, a1)
        elif lane == 2:
            a2 = fma(h, h, a2)
        elif lane == 3:
            a3 = fma(h, h, a3)
        elif lane == 4:
            a4 = fma(h, h, a4)
        elif lane == 5:
            a5 = fma(h, h, a5)
        else:
            a6 = fma(h, h, a6)
    ss = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    acc = s1[r] + ss / width                            # the row's mean square, added once
    s1[r] = acc
    m = k.lr / (math.sqrt(acc) + k.eps)
    c = k.shrink
    if k.l2:
        c = k.one - m * k.weight_decay                  # (1 - m wd) w - m g  =  w - m (g + wd w)
    for j in range(n):
        p[j] = c * p[j] - m * g[j]


def scalars(dtype: Any, step: int, h: Mapping[str, Any], carry: Mapping[str, float]) -> Scalars:
    dt = scalar_type(dtype)
    wd = h["weight_decay"]
    decoupled = h["weight_decay_mode"] == "decoupled"
    return Scalars(bool(wd != 0 and not decoupled), dt(wd), dt(h["lr"]), dt(h["eps"]), dt(1.0),
                   dt(1.0 - h["lr"] * wd if decoupled else 1.0))


ROWWISE_ADAGRAD = Algorithm(
    name="RowwiseAdagrad",
    summary="""Row-wise Adagrad: Adagrad with one accumulator per row, as FBGEMM's
    ``EXACT_ROWWISE_ADAGRAD`` (TorchRec's ``RowWiseAdagrad``).

    For each row ``r`` of an embedding table with gradient row ``g``: ``sum[r] += mean(g**2)``,
    then the whole row moves by ``lr / (sqrt(sum[r]) + eps) * g``.  The state is one value per
    row (``ncols`` times smaller than Adagrad's), and a row's step size is shared by its
    elements.  A 1-D parameter's elements are its rows (this is then Adagrad).  Exact sparse
    mode costs O(touched rows) without weight decay.""",
    rule=rule,
    scalars=scalars,
    slots=("sum", None, None),
    signed=(False, True, True),
    hypers=(
        Hyper("lr", 1e-2, nonneg, "learning rate"),
        Hyper("eps", 1e-10, nonneg, "added to sqrt(sum)"),
        Hyper("weight_decay", 0.0, nonneg, "weight decay, applied as weight_decay_mode says"),
        Hyper("weight_decay_mode", "l2", one_of("l2", "decoupled"),
              '"l2": weight_decay * w is added to the gradient (before its mean square is taken); '
              '"decoupled": the row is first scaled by 1 - lr * weight_decay (FBGEMM\'s DECOUPLED)',
              kind="str"),
    ),
    exact=adagrad_exact,            # Adagrad's: without weight decay a zero gradient row changes nothing
    eager_state=True,
    functional="rowwise_adagrad",
    functional_args={"sum": "state_sum"},
    rows=True,
)
