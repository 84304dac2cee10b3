"""Plain numpy reference implementations of the fastadapt update rules.

Written straight from the project's specification, docs/spec.rst (torch.optim 2.13's rules, and fastadapt's
decisions). These are the oracles the test suite compares fastadapt against; they are deliberately
simple, elementwise and slow.

Conventions
-----------
* Every rule works **in place** on ``p`` and on the arrays of ``state``; ``state["step"]`` is a Python
  int that the rule increments (before the math, as torch does).
* Every scalar marked [py] in the spec ("Conventions") is computed in Python float64 exactly as written there and then
  cast to the parameter dtype (``dt = p.dtype.type; dt(scalar)``) before it meets an array, so float32
  arrays are never promoted to float64.  The spec's evaluation order is kept literally.
* numpy does not contract ``x*y+z`` into an FMA and its sqrt is correctly rounded, so against torch these
  rules agree to plain-IEEE accuracy (the spec, "Agreement with torch.optim": ~1e-15 relative in float64, <1e-6 in float32), not bit-for-bit.
* Sparse gradients are given as COO triples ``(rows, cols, vals)`` for the parameter's 2-D shape
  (``(1, n)`` for a 1-D parameter, rows all 0); see :func:`coalesce`, :func:`lazy_step`,
  :func:`exact_step`.

``torch_run`` (at the end) runs the real torch.optim for comparison; torch is imported lazily there only.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import warnings

import numpy as np

__all__ = [
    "lerp",
    "adagrad",
    "rmsprop",
    "adam",
    "adamw",
    "sgd",
    "adadelta",
    "adamax",
    "nadam",
    "radam",
    "ftrl",
    "c_pow",
    "sparse_adam_rule",
    "sparse_adam",
    "sparse_adagrad_rule",
    "sparse_adagrad",
    "DENSE_RULES",
    "LAZY_RULES",
    "TORCH_REFERENCE_HYPER",
    "init_state",
    "shape2d_of",
    "coalesce",
    "row_grad_to_coo",
    "lazy_step",
    "exact_step",
    "torch_run",
]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _check(p, g):
    if not isinstance(p, np.ndarray) or p.dtype not in (np.float32, np.float64):
        raise TypeError(f"p must be a float32/float64 ndarray, got {type(p).__name__} {getattr(p, 'dtype', '')}")
    if g.shape != p.shape or g.dtype != p.dtype:
        raise ValueError(f"gradient {g.dtype}{g.shape} does not match parameter {p.dtype}{p.shape}")
    return p.dtype.type


def lerp(a, b, w):
    """ATen's lerp (the spec, "Conventions"): ``a + w*(b-a)`` if ``|w| < 0.5`` else ``b - (b-a)*(1-w)``.

    ``w`` must already be a scalar of the arrays' dtype; ``1 - w`` is then computed in that dtype, as the
    kernel does (opmath_t of float is float).
    """
    dt = type(w)
    if abs(w) < dt(0.5):
        return a + w * (b - a)
    return b - (b - a) * (dt(1) - w)


def fma(a, w, b):
    """``a * w + b`` elementwise with one rounding (IEEE fused multiply-add), as torch's CPU kernels
    compute ``b.add(w, alpha=a)``, ``addcmul`` and ``lerp``.  Evaluated by the hardware instruction
    (a numba ufunc over ``llvm.fma``), which tests/test_reference.py checks against the exact rational
    definition, :func:`fastadapt.algorithms.fma`."""
    a, w, b = np.broadcast_arrays(*(np.asarray(x) for x in (a, w, b)))
    dtype = np.result_type(b)
    out = _fma_ufunc()(a.astype(dtype), w.astype(dtype), b.astype(dtype))
    return out.astype(dtype) if out.ndim else dtype.type(out)


_FMA = []


def _fma_ufunc():
    if not _FMA:
        import numba
        from fastadapt.algorithms import fma as exact_fma
        from fastadapt.backends import cpu_compile  # noqa: F401  (compiles fma to llvm.fma)
        _FMA.append(numba.vectorize(["float32(float32, float32, float32)", "float64(float64, float64, float64)"])(
            lambda a, w, b: exact_fma(a, w, b)))
    return _FMA[0]


def lerp_fma(a, b, w):
    """torch's CPU ``lerp`` kernel: :func:`lerp`'s two formulas, each one fused multiply-add."""
    dt = type(w)
    if abs(w) < dt(0.5):
        return fma(w, b - a, a)
    return fma(-(dt(1) - w), b - a, b)


def _buf(state, key, p, fill=0.0):
    """Return state[key], creating it lazily (zeros / fill, shape and dtype of p) like torch does."""
    if key not in state:
        state[key] = np.full_like(p, fill)
    return state[key]


# --------------------------------------------------------------------------------------------------
# dense rules (the spec, sections "Adagrad" to "RAdam")
# --------------------------------------------------------------------------------------------------


def adagrad(p, g, state, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False,
            initial_accumulator_value=0.0):
    """The spec's section "Adagrad", dense. ``initial_accumulator_value`` only matters to :func:`init_state`
    (it is accepted here so that one hyper-parameter dict can serve both)."""
    dt = _check(p, g)
    s = _buf(state, "sum", p, initial_accumulator_value)
    state["step"] = int(state.get("step", 0)) + 1                       # 1
    t = float(state["step"])
    if maximize:
        g = -g                                                         # 2
    if weight_decay != 0:
        g = fma(dt(weight_decay), p, g)                                # 3 (one rounding, as torch)
    clr = lr / (1 + (t - 1) * lr_decay)                                # 4 [py]
    s[...] = s + g * g                                                 # 5  addcmul value=1
    std = np.sqrt(s) + dt(eps)                                         # 6
    p[...] = p + (dt(-clr) * g) / std                                  # 7  addcdiv value=-clr


def rmsprop(p, g, state, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
            maximize=False, clamp=True):
    """The spec's section "RMSprop". ``clamp=True`` is fastadapt's clamp ("Deliberate differences from torch.optim") (``max(v - gavg**2, 0)`` before the sqrt;
    NaN still propagates); ``clamp=False`` is torch's behaviour."""
    dt = _check(p, g)
    v = _buf(state, "square_avg", p)
    if maximize:
        g = -g                                                         # 1
    state["step"] = int(state.get("step", 0)) + 1                       # 2
    if weight_decay != 0:
        g = fma(dt(weight_decay), p, g)                                # 3 (one rounding, as torch)
    v[...] = fma(dt(1 - alpha) * g, g, v * dt(alpha))                  # 4  addcmul: one fma; (1-alpha) [py]
    if centered:
        ga = _buf(state, "grad_avg", p)
        ga[...] = lerp_fma(ga, g, dt(1 - alpha))                       # 5  lerp: one fma
        diff = fma(-ga, ga, v)                                         #    addcmul value=-1: one fma
        if clamp:
            diff = np.maximum(diff, dt(0))                             #    Part A.4 (propagates NaN)
        d = np.sqrt(diff)
    else:
        d = np.sqrt(v)
    d = d + dt(eps)                                                    # 6
    if momentum > 0:
        b = _buf(state, "momentum_buffer", p)
        b[...] = b * dt(momentum) + g / d                              # 7  addcdiv value=1
        p[...] = fma(dt(-lr), b, p)                                    #    add alpha=-lr: one fma
    else:
        p[...] = p + (dt(-lr) * g) / d                                 #    addcdiv value=-lr


def adam(p, g, state, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
         decoupled_weight_decay=False):
    """The spec's section "Adam" (and "AdamW" with ``decoupled_weight_decay=True``), Adam, Kingma & Ba Algorithm 1."""
    dt = _check(p, g)
    beta1, beta2 = betas
    m = _buf(state, "exp_avg", p)
    v = _buf(state, "exp_avg_sq", p)
    if maximize:
        g = -g                                                         # 1
    state["step"] = int(state.get("step", 0)) + 1                       # 2
    t = float(state["step"])
    if weight_decay != 0:                                              # 3
        if decoupled_weight_decay:
            p[...] = p * dt(1 - lr * weight_decay)                     #    [py]
        else:
            g = fma(dt(weight_decay), p, g)                            # one rounding, as torch
    m[...] = lerp(m, g, dt(1 - beta1))                                 # 4
    v[...] = v * dt(beta2) + (dt(1 - beta2) * g) * g                   # 5
    bc1 = 1 - beta1 ** t                                               # 6 [py]
    bc2 = 1 - beta2 ** t
    step_size = lr / bc1                                               # 7 [py]
    bc2_sqrt = bc2 ** 0.5
    if amsgrad:                                                        # 8
        vmax = _buf(state, "max_exp_avg_sq", p)
        vmax[...] = np.maximum(vmax, v)                                #    raw v, NaN propagates
        denom = np.sqrt(vmax) / dt(bc2_sqrt) + dt(eps)
    else:
        denom = np.sqrt(v) / dt(bc2_sqrt) + dt(eps)
    p[...] = p + (dt(-step_size) * m) / denom                          # 9  addcdiv value=-step_size


def adamw(p, g, state, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
          maximize=False):
    """The spec's section "AdamW": Adam with decoupled weight decay, weight_decay default 1e-2."""
    adam(p, g, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
         maximize=maximize, decoupled_weight_decay=True)


def sgd(p, g, state, *, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False):
    """torch.optim.SGD (docs "Specification", SGD). The momentum buffer of the parameter's first step is the
    gradient itself (torch's clone); a buffer first used at a later step starts from zeros (fastadapt's
    decision: torch clones the gradient whenever it creates the buffer)."""
    dt = _check(p, g)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    state["step"] = int(state.get("step", 0)) + 1                       # 1 (fastadapt counts; torch does not)
    if maximize:
        g = -g                                                         # 2
    if weight_decay != 0:
        g = fma(dt(weight_decay), p, g)                                # 3  add alpha=weight_decay: one rounding
    if momentum != 0:
        b = _buf(state, "momentum_buffer", p)
        if state["step"] == 1:
            b[...] = g                                                 # 4  clone on the first step
        else:
            b[...] = b * dt(momentum) + dt(1 - dampening) * g          #    mul_, add_ alpha=1-dampening [py]
        if nesterov:
            g = g + dt(momentum) * b                                   # 5  add alpha=momentum
        else:
            g = b.copy()
    p[...] = p + dt(-lr) * g                                           # 6  add alpha=-lr


def adadelta(p, g, state, *, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False):
    """torch.optim.Adadelta (Zeiler): eps inside both roots, lr scales the step."""
    dt = _check(p, g)
    v = _buf(state, "square_avg", p)
    u = _buf(state, "acc_delta", p)
    state["step"] = int(state.get("step", 0)) + 1                       # 1
    if maximize:
        g = -g                                                         # 2
    if weight_decay != 0:
        g = fma(dt(weight_decay), p, g)                                # 3  add alpha=weight_decay: one rounding
    v[...] = v * dt(rho) + (dt(1 - rho) * g) * g                       # 4  addcmul value=1-rho [py]
    std = np.sqrt(v + dt(eps))                                         # 5
    delta = np.sqrt(u + dt(eps)) / std * g                             # 6  div_(std).mul_(g)
    u[...] = u * dt(rho) + (dt(1 - rho) * delta) * delta               # 7
    p[...] = p + dt(-lr) * delta                                       # 8  add alpha=-lr


def adamax(p, g, state, *, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False):
    """torch.optim.Adamax (Kingma & Ba, section 7.1): eps inside the running maximum."""
    dt = _check(p, g)
    beta1, beta2 = betas
    m = _buf(state, "exp_avg", p)
    u = _buf(state, "exp_inf", p)
    if maximize:
        g = -g                                                         # 1
    state["step"] = int(state.get("step", 0)) + 1                       # 2
    t = float(state["step"])
    if weight_decay != 0:
        g = fma(dt(weight_decay), p, g)                                # 3  add alpha=weight_decay: one rounding
    m[...] = lerp(m, g, dt(1 - beta1))                                 # 4
    u[...] = np.maximum(u * dt(beta2), np.abs(g) + dt(eps))            # 5  NaN propagates
    clr = lr / (1 - beta1 ** t)                                        # 6 [py]
    p[...] = p + (dt(-clr) * m) / u                                    # 7  addcdiv value=-clr


def nadam(p, g, state, *, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
          decoupled_weight_decay=False, maximize=False):
    """torch.optim.NAdam (Dozat). ``mu_product`` is a Python float (float64) in ``state`` (fastadapt's
    decision; torch keeps a 0-d tensor of its default dtype)."""
    dt = _check(p, g)
    beta1, beta2 = betas
    m = _buf(state, "exp_avg", p)
    v = _buf(state, "exp_avg_sq", p)
    if maximize:
        g = -g                                                         # 1
    state["step"] = int(state.get("step", 0)) + 1                       # 2
    t = float(state["step"])
    bc2 = 1 - beta2 ** t                                               #   [py]
    if weight_decay != 0:                                              # 3
        if decoupled_weight_decay:
            p[...] = p * dt(1 - lr * weight_decay)                     #   [py]
        else:
            g = fma(dt(weight_decay), p, g)                            # one rounding, as torch
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (t * momentum_decay)))          # 4 [py]
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((t + 1) * momentum_decay)))
    mu_product = float(state.get("mu_product", 1.0)) * mu              # 5 [py]
    state["mu_product"] = mu_product
    m[...] = lerp(m, g, dt(1 - beta1))                                 # 6
    v[...] = v * dt(beta2) + (dt(1 - beta2) * g) * g                   # 7
    denom = np.sqrt(v / dt(bc2)) + dt(eps)                             # 8
    c1 = -lr * (1.0 - mu) / (1.0 - mu_product)                         # 9 [py]
    c2 = (-lr * mu_next) / (1.0 - mu_product * mu_next)                #   [py]
    p[...] = p + (dt(c1) * g) / denom                                  # 10 addcdiv value=c1
    p[...] = p + (dt(c2) * m) / denom                                  #    addcdiv value=c2


def radam(p, g, state, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
          maximize=False):
    """torch.optim.RAdam (Liu et al.): rectified when rho_t > 5, else the bias-corrected momentum step."""
    dt = _check(p, g)
    beta1, beta2 = betas
    m = _buf(state, "exp_avg", p)
    v = _buf(state, "exp_avg_sq", p)
    if maximize:
        g = -g                                                         # 1
    state["step"] = int(state.get("step", 0)) + 1                       # 2
    t = float(state["step"])
    if weight_decay != 0:                                              # 3
        if decoupled_weight_decay:
            p[...] = p * dt(1 - lr * weight_decay)                     #   [py]
        else:
            g = fma(dt(weight_decay), p, g)                            # one rounding, as torch
    m[...] = lerp(m, g, dt(1 - beta1))                                 # 4
    v[...] = v * dt(beta2) + (dt(1 - beta2) * g) * g                   # 5
    bc1 = 1 - beta1 ** t                                               # 6 [py]
    bc2 = 1 - beta2 ** t
    mhat = m / dt(bc1)                                                 # 7
    rho_inf = 2 / (1 - beta2) - 1                                      # 8 [py]
    rho_t = rho_inf - 2 * t * (beta2 ** t) / bc2
    if rho_t > 5.0:                                                    # 9
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        adaptive = (dt(1) / (np.sqrt(v) + dt(eps))) * dt(bc2 ** 0.5)    #   float / tensor = reciprocal * float
        p[...] = p - ((mhat * dt(lr)) * adaptive) * dt(rect)
    else:
        p[...] = p - mhat * dt(lr)


# --------------------------------------------------------------------------------------------------
# sparse rules (the spec, "SparseAdam" and "Adagrad's sparse path"); the *_rule functions are the per-touched-element math, written as dense
# elementwise rules so that lazy_step can apply them to the gathered touched elements.
# --------------------------------------------------------------------------------------------------


#: the C library's ``pow`` and ``powf``: what ``math.pow`` in a compiled rule calls on the CPU (LLVM's
#: ``llvm.pow`` intrinsic).  pow is not correctly rounded, and numpy's ``power`` is other code (SIMD loops,
#: ``sqrt`` for an exponent of 0.5), so a reference that must match the kernels bit for bit calls these.
_LIBM = ctypes.CDLL(ctypes.util.find_library("m"))
_LIBM.pow.restype, _LIBM.pow.argtypes = ctypes.c_double, (ctypes.c_double, ctypes.c_double)
_LIBM.powf.restype, _LIBM.powf.argtypes = ctypes.c_float, (ctypes.c_float, ctypes.c_float)


def c_pow(x, q):
    """``pow(x, q)`` elementwise by the C library (``powf`` for float32 arrays), ``q`` a scalar of x's dtype."""
    fn = _LIBM.powf if x.dtype == np.float32 else _LIBM.pow
    qf = float(q)
    out = np.fromiter((fn(float(v), qf) for v in np.ravel(x)), dtype=x.dtype, count=x.size)
    return out.reshape(x.shape)


def ftrl(p, g, state, *, lr=1e-3, lr_power=-0.5, initial_accumulator_value=0.1, l1=0.0, l2=0.0, l2_shrinkage=0.0,
         beta=0.0, maximize=False):
    """The spec's section "Ftrl": McMahan et al. 2013, Algorithm 1, with the semantics of Keras'
    ``keras.optimizers.Ftrl.update_step`` (keras/src/optimizers/ftrl.py) under torch-style names, in Keras'
    order of operations.  Keras adds ``beta / (2 * lr)`` to ``l2`` ([py] here).  The power of the
    accumulator is the paper's ``sqrt`` for ``lr_power = -0.5`` and the C library's ``pow`` otherwise
    (:func:`c_pow`), as in the kernels."""
    dt = _check(p, g)
    accum = _buf(state, "accumulator", p, initial_accumulator_value)
    linear = _buf(state, "linear", p)
    state["step"] = int(state.get("step", 0)) + 1
    if maximize:
        g = -g
    l2_reg = l2 + beta / (2.0 * lr)                                    # [py]
    if float(lr_power) == -0.5:
        root = np.sqrt
    else:
        power = dt(-lr_power)
        root = lambda x: c_pow(x, power)                               # noqa: E731
    grad_to_use = g + dt(2 * l2_shrinkage) * p                         # ops.add(g, ops.multiply(2*s, var))
    new_accum = accum + g * g                                          # ops.add(accum, ops.square(g))
    pn = root(new_accum)
    linear[...] = linear + (grad_to_use - ((pn - root(accum)) / dt(lr)) * p)
    quadratic = pn / dt(lr) + dt(2 * l2_reg)
    linear_clipped = np.clip(linear, dt(-l1), dt(l1))
    p[...] = (linear_clipped - linear) / quadratic
    accum[...] = new_accum


def sparse_adam_rule(p, g, state, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False):
    """The spec's "SparseAdam" update applied to every element of ``p`` (epsilon-hat form).

    Meant for the gathered touched elements (see :func:`sparse_adam`); applied densely it is NOT a valid
    SparseAdam step (untouched entries must not change)."""
    dt = _check(p, g)
    beta1, beta2 = betas
    m = _buf(state, "exp_avg", p)
    v = _buf(state, "exp_avg_sq", p)
    state["step"] = int(state.get("step", 0)) + 1        # done in step() before the functional call
    t = state["step"]
    if maximize:
        g = -g                                                         # 1
    m_old = m.copy()
    v_old = v.copy()
    u1 = (g - m_old) * dt(1 - beta1)                                   # 4
    m[...] = m_old + u1
    u2 = (g * g - v_old) * dt(1 - beta2)                               # 5
    v[...] = v_old + u2
    numer = u1 + m_old                                                 # 6
    denom = np.sqrt(u2 + v_old) + dt(eps)
    bc1 = 1 - beta1 ** t                                               # 7 [py]
    bc2 = 1 - beta2 ** t
    step_size = (lr * math.sqrt(bc2)) / bc1
    p[...] = p + dt(-step_size) * (numer / denom)                      # 8


def sparse_adagrad_rule(p, g, state, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False,
                        initial_accumulator_value=0.0):
    """torch's sparse Adagrad path (the spec, "Adagrad's sparse path") per touched element. Same result as :func:`adagrad` up to the
    rounding of ``(-clr)*(g/std)`` vs ``((-clr)*g)/std``."""
    dt = _check(p, g)
    if weight_decay != 0:
        raise RuntimeError("weight_decay option is not compatible with sparse gradients")
    s = _buf(state, "sum", p, initial_accumulator_value)
    state["step"] = int(state.get("step", 0)) + 1                       # 1
    t = float(state["step"])
    if maximize:
        g = -g
    clr = lr / (1 + (t - 1) * lr_decay)                                #   [py]
    s[...] = s + g * g                                                 # 3
    std = np.sqrt(s) + dt(eps)                                         # 4
    p[...] = p + dt(-clr) * (g / std)                                  # 5


def sparse_adam(p, rows, cols, vals, state, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False):
    """torch.optim.SparseAdam (the spec, "SparseAdam") for a COO gradient of p's 2-D shape ((1, n) for a 1-D p):
    duplicates summed, explicit zeros touched, lazy, the step advances even when nnz == 0."""
    lazy_step(sparse_adam_rule, p, None, rows, cols, vals, state, lr=lr, betas=betas, eps=eps, maximize=maximize)


def sparse_adagrad(p, rows, cols, vals, state, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                   maximize=False, initial_accumulator_value=0.0):
    """torch.optim.Adagrad with a sparse COO gradient (the spec, "Adagrad's sparse path")."""
    lazy_step(sparse_adagrad_rule, p, None, rows, cols, vals, state, lr=lr, lr_decay=lr_decay,
              weight_decay=weight_decay, eps=eps, maximize=maximize,
              initial_accumulator_value=initial_accumulator_value)


def rowwise_adagrad(p, g, state, *, lr=1e-2, eps=1e-10, weight_decay=0.0, weight_decay_mode="l2"):
    """The spec's section "RowwiseAdagrad" (FBGEMM's EXACT_ROWWISE_ADAGRAD), dense: one accumulator
    per row of the row view ``(p.shape[0], prod(p.shape[1:]))`` (a 1-D ``p``: its elements)."""
    dt = _check(p, g)
    nrows, ncols = (p.shape[0], int(np.prod(p.shape[1:], dtype=np.int64))) if p.ndim else (1, 1)
    P, G = p.reshape(nrows, ncols), g.reshape(nrows, ncols)
    s = state.setdefault("sum", np.zeros(p.shape[:1], p.dtype)).reshape(nrows)
    state["step"] = int(state.get("step", 0)) + 1
    if ncols == 0:                                                     # rows of no element: nothing moves
        return
    l2 = weight_decay != 0 and weight_decay_mode == "l2"
    lanes = [np.zeros(nrows, p.dtype) for _ in range(8)]
    for j in range(P.shape[1]):                                        # 1 sum of squares: lane j % 8,
        gj = fma(dt(weight_decay), P[:, j], G[:, j]) if l2 else G[:, j]  #   j ascending in each lane
        lanes[j % 8] = fma(gj, gj, lanes[j % 8])
    a = lanes
    ss = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))   # combined pairwise
    acc = s + ss / dt(P.shape[1])                                      # 2 the row's mean square
    s[...] = acc
    m = dt(lr) / (np.sqrt(acc) + dt(eps))                              # 3
    if l2:
        c = dt(1) - m * dt(weight_decay)                               # 4 (1 - m wd) w - m g
    elif weight_decay_mode == "decoupled":
        c = np.full(nrows, dt(1.0 - lr * weight_decay))                # 4 (1 - lr wd) w - m g
    else:
        c = np.full(nrows, dt(1))
    P[...] = c[:, None] * P - m[:, None] * G                           # 5


rowwise_adagrad.rows = True     # a row rule: lazy_step hands it whole touched rows


DENSE_RULES = {"adagrad": adagrad, "rmsprop": rmsprop, "adam": adam, "adamw": adamw, "sgd": sgd,
               "adadelta": adadelta, "adamax": adamax, "nadam": nadam, "radam": radam,
               "rowwise_adagrad": rowwise_adagrad, "ftrl": ftrl}
#: the rule a lazy sparse step runs on the touched elements (:func:`lazy_step`): the dense rule,
#: or the sparse-only optimizer's own
LAZY_RULES = dict(DENSE_RULES, sparse_adam=sparse_adam_rule)
#: hyper-parameters the reference needs to reproduce torch rather than fastadapt (Part A.4:
#: fastadapt clamps RMSprop's centered variance at 0, torch does not)
TORCH_REFERENCE_HYPER = {"rmsprop": {"clamp": False}}


# --------------------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------------------


def init_state(name, p, **hyper):
    """Initial state dict for optimizer ``name`` (a key of :data:`DENSE_RULES`, "sparse_adam" or
    "sparse_adagrad") and parameter ``p``. Unrelated hyper-parameters are ignored, so the same dict
    of hyper-parameters can be passed here and to the rule.

    Adagrad's ``sum`` is filled with ``initial_accumulator_value`` (fastadapt honours it per group,
    Part A.5); everything else starts at zero; ``step`` starts at 0."""
    z = lambda: np.zeros_like(p)  # noqa: E731
    if name in ("adagrad", "sparse_adagrad"):
        return {"step": 0, "sum": np.full_like(p, hyper.get("initial_accumulator_value", 0.0))}
    if name == "rmsprop":
        st = {"step": 0, "square_avg": z()}
        if hyper.get("momentum", 0.0) > 0:
            st["momentum_buffer"] = z()
        if hyper.get("centered", False):
            st["grad_avg"] = z()
        return st
    if name in ("adam", "adamw"):
        st = {"step": 0, "exp_avg": z(), "exp_avg_sq": z()}
        if hyper.get("amsgrad", False):
            st["max_exp_avg_sq"] = z()
        return st
    if name == "sparse_adam":
        return {"step": 0, "exp_avg": z(), "exp_avg_sq": z()}
    if name == "sgd":
        return {"step": 0, **({"momentum_buffer": z()} if hyper.get("momentum", 0.0) != 0 else {})}
    if name == "adadelta":
        return {"step": 0, "square_avg": z(), "acc_delta": z()}
    if name == "adamax":
        return {"step": 0, "exp_avg": z(), "exp_inf": z()}
    if name == "nadam":
        return {"step": 0, "mu_product": 1.0, "exp_avg": z(), "exp_avg_sq": z()}
    if name == "radam":
        return {"step": 0, "exp_avg": z(), "exp_avg_sq": z()}
    if name == "rowwise_adagrad":
        return {"step": 0, "sum": np.zeros(p.shape[:1], p.dtype)}      # one per row (0-d: one row, shape ())
    if name == "ftrl":
        return {"step": 0, "accumulator": np.full_like(p, hyper.get("initial_accumulator_value", 0.1)),
                "linear": z()}
    raise ValueError(f"unknown optimizer {name!r}")


# --------------------------------------------------------------------------------------------------
# sparse helpers (the spec, "Sparse gradients")
# --------------------------------------------------------------------------------------------------


def shape2d_of(p):
    """The 2-D shape a sparse gradient of ``p`` has: p.shape for 2-D p, (1, n) for 1-D p."""
    if p.ndim == 2:
        return tuple(p.shape)
    if p.ndim == 1:
        return (1, p.shape[0])
    raise ValueError(f"sparse gradients need a 1-D or 2-D parameter, got shape {p.shape}")


def _view2d(a, shape2d):
    v = a.view()
    v.shape = shape2d  # raises instead of silently copying
    return v


def coalesce(shape, rows, cols, vals, dtype=None):
    """COO -> (touched, dense).

    ``touched``: bool array of ``shape`` (2-D), True at every stored coordinate, explicit zeros included.
    ``dense``: the gradient with duplicates summed, in ``dtype`` (default: vals' dtype). ``vals`` is cast
    to ``dtype`` first (Part A.7: O(nnz) cast), then duplicates are summed in their order of appearance
    ``((v1 + v2) + v3)`` (the first occurrence is stored, not added to 0, so -0.0 survives).
    Indices are bounds-checked (IndexError) before anything is built.
    """
    nr, nc = shape
    rows = np.asarray(rows, dtype=np.int64).ravel()
    cols = np.asarray(cols, dtype=np.int64).ravel()
    vals = np.asarray(vals)
    if dtype is not None:
        vals = vals.astype(dtype, copy=False)
    vals = vals.ravel()
    if not (rows.shape == cols.shape == vals.shape):
        raise ValueError("rows, cols and vals must have the same length")
    if rows.size and (rows.min() < 0 or rows.max() >= nr or cols.min() < 0 or cols.max() >= nc):
        raise IndexError(f"sparse index out of bounds for shape {shape}")
    lin = rows * nc + cols
    touched = np.zeros(nr * nc, dtype=bool)
    touched[lin] = True
    dense = np.zeros(nr * nc, dtype=vals.dtype)
    order = np.argsort(lin, kind="stable")
    lin_s, vals_s = lin[order], vals[order]
    first = np.ones(lin_s.shape, dtype=bool)
    first[1:] = lin_s[1:] != lin_s[:-1]
    dense[lin_s[first]] = vals_s[first]
    np.add.at(dense, lin_s[~first], vals_s[~first])  # unbuffered, sequential in this order
    return touched.reshape(shape), dense.reshape(shape)


def row_grad_to_coo(row_indices, values):
    """Row-indexed gradient ``(row_indices[k], values[k, dim])`` (embedding tables) -> COO triple."""
    row_indices = np.asarray(row_indices, dtype=np.int64).ravel()
    values = np.asarray(values)
    k, dim = values.shape
    if row_indices.shape != (k,):
        raise ValueError("row_indices must have one entry per row of values")
    rows = np.repeat(row_indices, dim)
    cols = np.tile(np.arange(dim, dtype=np.int64), k)
    return rows, cols, values.ravel()


def lazy_step(fn, p, shape2d, rows, cols, vals, state, **hyper):
    """Apply the dense rule ``fn`` only at the touched entries of the COO gradient (``sparse_mode="lazy"``).

    The touched elements of p, of the coalesced gradient and of every state array are gathered into 1-D
    copies, ``fn`` runs on those, and the results are scattered back. Untouched entries of p and of the
    state are therefore bit-for-bit unchanged; ``state["step"]`` advances exactly as ``fn`` advances it
    (also when nothing is touched). State arrays that ``fn`` creates lazily are created full-size with
    zeros. ``shape2d=None`` means :func:`shape2d_of` (p).
    """
    if shape2d is None:
        shape2d = shape2d_of(p)
    shape2d = tuple(shape2d)
    touched, G = coalesce(shape2d, rows, cols, vals, dtype=p.dtype)
    if getattr(fn, "rows", False):      # a row rule: every row with a stored entry, whole
        _lazy_rows(fn, p, shape2d, touched, G, state, **hyper)
        return
    p2 = _view2d(p, shape2d)
    arrays = {k: _view2d(a, shape2d) for k, a in state.items() if isinstance(a, np.ndarray)}
    sub = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    sub.update({k: a[touched] for k, a in arrays.items()})
    p_t = p2[touched]
    fn(p_t, G[touched], sub, **hyper)
    p2[touched] = p_t
    for k, v in sub.items():
        if isinstance(v, np.ndarray):
            if k not in arrays:
                state[k] = np.zeros_like(p)
                arrays[k] = _view2d(state[k], shape2d)
            arrays[k][touched] = v
        else:
            state[k] = v


def _lazy_rows(fn, p, shape2d, touched, G, state, **hyper):
    """:func:`lazy_step` of a row rule: the touched rows of the row view (the elements of a 1-D ``p``)
    and their state values are gathered, ``fn`` runs on them, and they are scattered back."""
    if p.ndim == 1:
        touched, G = touched.reshape(-1, 1), G.reshape(-1, 1)
    nrows, ncols = p.shape[0], int(np.prod(p.shape[1:], dtype=np.int64))
    P = p.reshape(nrows, ncols)
    which = np.flatnonzero(touched.reshape(nrows, ncols).any(axis=1))
    sub = {k: (v[which] if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    p_t = P[which]
    fn(p_t, G.reshape(nrows, ncols)[which], sub, **hyper)
    P[which] = p_t
    for k, v in sub.items():
        if isinstance(v, np.ndarray):
            state.setdefault(k, np.zeros(nrows, p.dtype))[which] = v
        else:
            state[k] = v


def exact_step(fn, p, rows, cols, vals, state, **hyper):
    """``sparse_mode="exact"``: the dense rule ``fn`` on the densified gradient (duplicates summed)."""
    _, G = coalesce(shape2d_of(p), rows, cols, vals, dtype=p.dtype)
    fn(p, G.reshape(p.shape), state, **hyper)


# --------------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_default_dtype(dtype):
    """torch's default dtype set to ``dtype`` (a numpy or torch float dtype) for the block: torch keeps
    scalar optimizer state (NAdam's ``mu_product``) in it, float32 unless changed."""
    import torch
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float64 if np.dtype(dtype) == np.float64 else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def torch_run(name, p0, grads, steps=None, *, updates=None, torch_class=None, **hyper):
    """Run the real torch.optim on a copy of ``p0`` and return ``(p, state)`` as numpy.

    name: a key of :data:`DENSE_RULES` (the torch.optim class of that name, case and underscores
    ignored: "sgd", "nadam", ...), "sparse_adam", or "sparse_adagrad" (= Adagrad; any gradient given as a
    tuple is sent as a sparse COO gradient to Adagrad as well).  The run sets torch's default dtype to
    p0's, so that torch's scalar state tensors (NAdam's ``mu_product``) have the parameter's precision
    (torch would keep them in float32 for a float64 parameter).
    grads: list of gradients, each a dense ndarray of p0's shape and dtype, a COO triple
    ``(rows, cols, vals)`` for p0's 2-D shape (``(1, n)`` for a 1-D p0; rows ignored then), or None
    (``.grad = None``: torch skips the parameter, no step counted).
    steps: number of ``step()`` calls; default ``len(grads)``; the gradients are cycled if it is larger.
    updates: optional list (one entry per step, or None) of dicts applied to ``param_groups[0]`` before
    that step (e.g. lr changes).
    torch_class: the torch.optim class name to use (default: the one ``name`` stands for).
    hyper: fastadapt/reference hyper-parameter names; ``decoupled_weight_decay`` is passed to torch Adam
    as is; ``clamp`` (fastadapt-only) is dropped; ``initial_accumulator_value`` goes to Adagrad's
    constructor.

    Returns the final parameter (numpy, dtype of p0) and the state dict with numpy arrays and
    ``step`` as a Python int.
    """
    import torch

    hyper = dict(hyper)
    hyper.pop("clamp", None)
    p0 = np.asarray(p0)
    if steps is None:
        steps = len(grads)
    param = torch.nn.Parameter(torch.from_numpy(np.array(p0, copy=True)))
    dtype = param.dtype

    classes = {n.lower(): n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)}
    cls_name = torch_class or ("Adagrad" if name == "sparse_adagrad" else classes.get(name.replace("_", "")))
    if cls_name is None:
        raise ValueError(f"unknown optimizer {name!r}")
    opt = getattr(torch.optim, cls_name)([param], **hyper)

    def to_grad(gr):
        if gr is None:
            return None
        if isinstance(gr, tuple):
            r, c, v = gr
            c = torch.as_tensor(np.asarray(c, dtype=np.int64).ravel())
            v = torch.as_tensor(np.asarray(v).ravel()).to(dtype)
            if p0.ndim == 1:
                idx = c.reshape(1, -1)
            else:
                idx = torch.stack([torch.as_tensor(np.asarray(r, dtype=np.int64).ravel()), c])
            # not coalesced (torch's optimizers coalesce themselves)
            return torch.sparse_coo_tensor(idx, v, tuple(p0.shape), check_invariants=True)
        return torch.from_numpy(np.array(gr, copy=True))

    with torch_default_dtype(dtype):     # torch's scalar state (NAdam's mu_product) in p0's dtype
        for i in range(steps):
            if updates is not None and i < len(updates) and updates[i]:
                opt.param_groups[0].update(updates[i])
            param.grad = to_grad(grads[i % len(grads)])
            with warnings.catch_warnings():  # torch's own _make_sparse warns about invariant checks
                warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)
                opt.step()

    st = opt.state[param]
    out = {}
    for k, v in st.items():
        if k == "step":
            out[k] = int(v.item()) if torch.is_tensor(v) else int(v)
        elif torch.is_tensor(v):
            out[k] = v.detach().numpy().copy()
        else:
            out[k] = v
    if "step" not in out:                  # torch keeps no count (SGD): the number of its updates
        out["step"] = sum(1 for i in range(steps) if grads[i % len(grads)] is not None)
    return param.detach().numpy().copy(), out
