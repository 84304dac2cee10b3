"""The update rules, written once.

Each algorithm's per-element update is one plain Python function over scalars and
state arrays.  It is the single source of the math: :mod:`fastadapt.cpu` compiles it
with ``numba.njit(inline="always")`` into its loops and :mod:`fastadapt.cuda` with
``numba.cuda.jit(device=True)``.  A loop only knows how to walk memory (dense flat
arrays, CSR rows, indexed rows, a CUDA grid); it finds the flat index ``i`` and the
gradient value ``g`` and calls the rule.

Every rule has the signature ``rule(p, s1, s2, s3, i, g, k)``:

``p``
    the flat parameter, updated in place at ``i``;
``s1, s2, s3``
    the flat state buffers (which buffer holds what is listed per rule; an unused
    slot receives a 1-element dummy and is never read);
``i``
    the flat index of the element;
``g``
    the gradient value at ``i`` (already summed over duplicates for sparse inputs);
``k``
    the per-step scalars, a tuple built by the matching ``*_scalars`` function below:
    flags as booleans, every number already in the parameter dtype, so that a float32
    loop never promotes to float64 (numba turns ``1 - x`` with a float32 ``x`` into
    float64, which costs vectorisation: those differences are taken here, in Python).

The equations and their evaluation order are SPEC.md Part B, §1-§5; the ``[py]``
scalars are computed in Python float64 exactly as written there, then rounded to the
parameter dtype.

Rules call nothing but ``math`` functions (so that every backend can compile them
as they are); ATen's ``lerp`` -- ``a + w*(b-a)`` if ``|w| < 0.5`` else
``b - (b-a)*(1-w)`` -- is therefore written out where it is used.
"""

import math

import numpy as np

__all__ = [
    "adagrad_rule", "rmsprop_rule", "adam_rule", "sparse_adam_rule",
    "adagrad_scalars", "rmsprop_scalars", "adam_scalars", "sparse_adam_scalars",
    "rmsprop_decay_scalars", "rmsprop_decay", "rmsprop_decay_factor",
]


# --------------------------------------------------------------------------- Adagrad
# s1 = sum

def adagrad_rule(p, s1, s2, s3, i, g, k):
    """Adagrad (SPEC §1 dense, §6 sparse).  ``k = adagrad_scalars(...)``."""
    maximize, weight_decay, neg_clr, eps = k
    if maximize:
        g = -g
    x = p[i]
    if weight_decay != 0:
        g = g + weight_decay * x
    s = s1[i] + g * g
    s1[i] = s
    p[i] = x + (neg_clr * g) / (math.sqrt(s) + eps)


def adagrad_scalars(dtype, step, lr, lr_decay, weight_decay, eps, maximize):
    """Per-step scalars of :func:`adagrad_rule`; ``step`` is the count after this step."""
    dt = np.dtype(dtype).type
    clr = lr / (1 + (step - 1) * lr_decay)
    return (bool(maximize), dt(weight_decay), dt(-clr), dt(eps))


# --------------------------------------------------------------------------- RMSprop
# s1 = square_avg, s2 = momentum_buffer, s3 = grad_avg

def rmsprop_rule(p, s1, s2, s3, i, g, k):
    """RMSprop (SPEC §2), centered variance clamped at 0 (SPEC Part A.4)."""
    (maximize, centered, use_momentum, weight_decay, alpha, one_minus_alpha,
     lerp_one_minus_w, eps, momentum, neg_lr) = k
    if maximize:
        g = -g
    x = p[i]
    if weight_decay != 0:
        g = g + weight_decay * x
    v = s1[i] * alpha + (one_minus_alpha * g) * g
    s1[i] = v
    if centered:
        ga = s3[i]
        if one_minus_alpha < 0.5:                       # lerp(ga, g, 1 - alpha)
            ga = ga + one_minus_alpha * (g - ga)
        else:
            ga = g - (g - ga) * lerp_one_minus_w
        s3[i] = ga
        var = v - ga * ga
        if var < 0:          # rounding can make it negative; NaN passes through
            var = var - var
        d = math.sqrt(var)
    else:
        d = math.sqrt(v)
    d = d + eps
    if use_momentum:
        b = s2[i] * momentum + g / d
        s2[i] = b
        p[i] = x + neg_lr * b
    else:
        p[i] = x + (neg_lr * g) / d


def rmsprop_scalars(dtype, step, lr, alpha, eps, weight_decay, momentum, centered, maximize):
    """Per-step scalars of :func:`rmsprop_rule` (``step`` is counted, never used)."""
    dt = np.dtype(dtype).type
    one_minus_alpha = dt(1 - alpha)
    return (bool(maximize), bool(centered), bool(momentum > 0), dt(weight_decay),
            dt(alpha), one_minus_alpha, dt(1) - one_minus_alpha, dt(eps),
            dt(momentum), dt(-lr))


def rmsprop_decay(s1, s3, i, k):
    """What ``n`` zero-gradient RMSprop steps do to the averages at ``i``, in closed form.

    With ``g = 0`` (no momentum, no weight decay) the parameter does not move and
    ``square_avg`` and ``grad_avg`` are multiplied by ``alpha`` once per step; ``k`` is
    ``rmsprop_decay_scalars(...)`` holding ``alpha**n``.  Used by the exact sparse
    mode to catch a row up when it is next touched or read.
    """
    centered, factor = k
    s1[i] = s1[i] * factor
    if centered:
        s3[i] = s3[i] * factor


def rmsprop_decay_factor(alpha, gap):
    """``alpha**gap`` in float64: the factor of :func:`rmsprop_decay` after ``gap`` steps.

    The exact-mode loops of every backend call it once per row that has decay to catch
    up, and round the result to the array dtype (as :func:`rmsprop_decay_scalars` does).
    """
    return alpha ** (gap * 1.0)


def rmsprop_decay_scalars(dtype, alpha, n, centered):
    """``k`` for :func:`rmsprop_decay`: the factor ``alpha**n`` in the array dtype."""
    dt = np.dtype(dtype).type
    return (bool(centered), dt(rmsprop_decay_factor(float(alpha), n)))


# --------------------------------------------------------------------------- Adam / AdamW
# s1 = exp_avg, s2 = exp_avg_sq, s3 = max_exp_avg_sq

def adam_rule(p, s1, s2, s3, i, g, k):
    """Adam and AdamW (SPEC §3, §4): Kingma & Ba's Algorithm 1, eps after the sqrt."""
    (maximize, amsgrad, decoupled, weight_decay, decay_factor, one_minus_beta1,
     lerp_one_minus_w, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps) = k
    if maximize:
        g = -g
    x = p[i]
    if weight_decay != 0:
        if decoupled:
            x = x * decay_factor
        else:
            g = g + weight_decay * x
    m = s1[i]
    if one_minus_beta1 < 0.5:                                # lerp(m, g, 1 - beta1)
        m = m + one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * lerp_one_minus_w
    s1[i] = m
    v = s2[i] * beta2 + (one_minus_beta2 * g) * g
    s2[i] = v
    if amsgrad:
        vmax = s3[i]
        if v > vmax or v != v:      # torch.maximum: NaN from either side wins
            vmax = v
        s3[i] = vmax
        denom = math.sqrt(vmax) / bc2_sqrt + eps
    else:
        denom = math.sqrt(v) / bc2_sqrt + eps
    p[i] = x + (neg_step_size * m) / denom


def adam_scalars(dtype, step, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled):
    """Per-step scalars of :func:`adam_rule`; ``step`` is the count after this step."""
    dt = np.dtype(dtype).type
    beta1, beta2 = float(betas[0]), float(betas[1])
    t = float(step)
    bias_correction1 = 1 - beta1 ** t
    bias_correction2 = 1 - beta2 ** t
    step_size = lr / bias_correction1
    bc2_sqrt = bias_correction2 ** 0.5
    w = dt(1 - beta1)
    return (bool(maximize), bool(amsgrad), bool(decoupled), dt(weight_decay),
            dt(1 - lr * weight_decay), w, dt(1) - w, dt(beta2), dt(1 - beta2),
            dt(-step_size), dt(bc2_sqrt), dt(eps))


# --------------------------------------------------------------------------- SparseAdam
# s1 = exp_avg, s2 = exp_avg_sq

def sparse_adam_rule(p, s1, s2, s3, i, g, k):
    """torch.optim.SparseAdam (SPEC §5): lazy, epsilon-hat form; touched entries only."""
    maximize, one_minus_beta1, one_minus_beta2, neg_step_size, eps = k
    if maximize:
        g = -g
    m_old = s1[i]
    u1 = (g - m_old) * one_minus_beta1
    s1[i] = m_old + u1
    v_old = s2[i]
    u2 = (g * g - v_old) * one_minus_beta2
    s2[i] = v_old + u2
    numer = u1 + m_old
    denom = math.sqrt(u2 + v_old) + eps
    p[i] = p[i] + neg_step_size * (numer / denom)


def sparse_adam_scalars(dtype, step, lr, betas, eps, maximize):
    """Per-step scalars of :func:`sparse_adam_rule`; ``step`` counts empty steps too."""
    dt = np.dtype(dtype).type
    beta1, beta2 = float(betas[0]), float(betas[1])
    t = float(step)
    bias_correction1 = 1 - beta1 ** t
    bias_correction2 = 1 - beta2 ** t
    step_size = lr * math.sqrt(bias_correction2) / bias_correction1
    return (bool(maximize), dt(1 - beta1), dt(1 - beta2), dt(-step_size), dt(eps))
