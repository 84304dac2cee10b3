"""RMSprop with weight_decay in float32 near cancellation (issue #10 item 5).

torch.optim.RMSprop adds the weight decay to the gradient as ``grad.add(param, alpha=wd)``: on the
CPU one fused multiply-add, a single rounding of ``g + wd*p``.  Rounding ``wd*p`` first and then
adding (two roundings) differs from that by up to half an ulp of ``wd*p``; where ``g`` nearly
cancels ``wd*p`` (to a few ulps) that half ulp is a large part of the decayed gradient, and with a
small ``eps`` the update ``lr * g' / (sqrt(v) + eps)`` carries it into the parameter.  The spec
("Agreement with torch.optim") promises 1e-5 (relative, with the array's magnitude as absolute floor) against torch in float32.

The gradients are built from torch's own trajectory at every step: ``g = -(wd*p)`` rounded to
float32, plus -3..3 ulps.  A numpy emulation of the fix (``g + wd*p`` computed in float64, where
the product of two float32 numbers is exact, and rounded once) meets 1e-5 on every case here.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastadapt as fa

RTOL = 1e-5
N = 4096
STEPS = 3


def assert_close(actual, desired, rtol, what=""):
    """test_dense's ``assert_close``: relative error <= rtol with the array's magnitude as floor."""
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale, err_msg=what)


def near_cancelling_gradient(p, wd, rng):
    """float32 ``g`` with ``g + wd*p`` a few float32 ulps of ``wd*p`` away from 0 (or exactly 0)."""
    prod = (np.float64(np.float32(wd)) * p.astype(np.float64)).astype(np.float32)
    k = rng.integers(-3, 4, p.shape).astype(np.float32)
    return (-prod + k * np.spacing(prod)).astype(np.float32)


def run(wd, eps, lr, alpha, centered, momentum, steps=STEPS, seed=0):
    """(fastadapt, torch) parameters and square_avg after ``steps`` steps on the same gradients."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    p0 = rng.uniform(0.5, 2.0, N).astype(np.float32) * rng.choice([-1, 1], N).astype(np.float32)
    p = p0.copy()
    hyper = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=wd, centered=centered, momentum=momentum)
    opt = fa.RMSprop([p], **hyper)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch.optim.RMSprop([tp], foreach=False, **hyper)
    for _ in range(steps):
        g = near_cancelling_gradient(tp.detach().numpy(), wd, rng)
        opt.step([g])
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    return (p, opt.state[0]["square_avg"]), (tp.detach().numpy().copy(),
                                               topt.state[tp]["square_avg"].numpy().copy())


def max_rel_error(actual, desired):
    scale = float(np.max(np.abs(desired)))
    return float(np.max(np.abs(actual - desired) / np.maximum(np.abs(desired), scale)))


# Before weight decay was one fused multiply-add (issue 10 item 5), fastadapt differed from torch here
# by up to 3.3e-2 (param) and 2.4e10 (square_avg) relative, after 3 plain steps.  Only the plain configuration runs several steps: with momentum or
# centered, torch rounds other operations once as well (``param.add_(buf, alpha=-lr)``, ``lerp_``),
# so the parameters differ by an ulp after the first step, and then the next gradient, built to
# cancel torch's parameter, no longer cancels fastadapt's: that would measure torch's other fused
# operations, not this one.  One step isolates the weight decay there.
CASES = [
    pytest.param(dict(wd=0.1, eps=1e-8, lr=1e-2, alpha=0.99, centered=False, momentum=0.0, steps=STEPS),
                 id="plain-3-steps"),
    pytest.param(dict(wd=0.1, eps=1e-8, lr=1e-2, alpha=0.99, centered=False, momentum=0.0, steps=1),
                 id="plain-1-step"),
    pytest.param(dict(wd=0.3, eps=1e-10, lr=1e-3, alpha=0.9, centered=True, momentum=0.0, steps=1),
                 id="centered-1-step"),
    pytest.param(dict(wd=0.05, eps=1e-9, lr=1e-2, alpha=0.99, centered=False, momentum=0.9, steps=1),
                 id="momentum-1-step"),
]


@pytest.mark.parametrize("hyper", CASES)
def test_weight_decay_is_one_fused_multiply_add(hyper):
    (p, v), (tp, tv) = run(**hyper)
    assert_close(v, tv, RTOL, "square_avg")
    assert_close(p, tp, RTOL, "param")


def test_far_from_cancellation_agrees():
    """Control: the same comparison with ordinary gradients is well inside 1e-5."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(N).astype(np.float32)
    hyper = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.1)
    p = p0.copy()
    opt = fa.RMSprop([p], **hyper)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch.optim.RMSprop([tp], foreach=False, **hyper)
    for _ in range(STEPS):
        g = rng.standard_normal(N).astype(np.float32)
        opt.step([g])
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    assert_close(p, tp.detach().numpy(), RTOL, "param")
    assert_close(opt.state[0]["square_avg"], topt.state[tp]["square_avg"].numpy(), RTOL, "square_avg")
