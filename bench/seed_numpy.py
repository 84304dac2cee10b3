"""The source material's optimizers, as written there: plain numpy classes, one new array per
operation.  The benchmarks' "numpy seed-style" comparison runs exactly this code.

``update(params, grads)`` returns the new parameters (a new array) and keeps its state in
attributes, as in the seed.  The seed's RMSprop ``beta`` is fastadapt's ``alpha``; the benchmarks
pass their hyper-parameters explicitly where the defaults differ.
"""

import numpy as np


class AdaGrad:
    def __init__(self, lr=0.01, eps=1e-8):
        self.lr = lr
        self.eps = eps
        self.G = None

    def update(self, params, grads):
        if self.G is None:
            self.G = np.zeros_like(params)
        self.G += grads**2
        return params - self.lr * grads / (np.sqrt(self.G) + self.eps)


class RMSprop:
    def __init__(self, lr=0.001, beta=0.9, eps=1e-8):
        self.lr = lr
        self.beta = beta
        self.eps = eps
        self.v = None

    def update(self, params, grads):
        if self.v is None:
            self.v = np.zeros_like(params)
        self.v = self.beta * self.v + (1 - self.beta) * grads**2
        return params - self.lr * grads / (np.sqrt(self.v) + self.eps)


class Adam:
    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.m = None
        self.v = None
        self.t = 0

    def update(self, params, grads):
        if self.m is None:
            self.m = np.zeros_like(params)
            self.v = np.zeros_like(params)
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * grads
        self.v = self.beta2 * self.v + (1 - self.beta2) * grads**2
        m_hat = self.m / (1 - self.beta1**self.t)
        v_hat = self.v / (1 - self.beta2**self.t)
        return params - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


#: benchmark name -> factory of the seed-style optimizer with fastadapt's default hyper-parameters
#: (AdamW has no seed counterpart: its row uses Adam, which moves the same bytes)
FACTORIES = {
    "adagrad": lambda: AdaGrad(lr=1e-2, eps=1e-10),
    "rmsprop": lambda: RMSprop(lr=1e-2, beta=0.99, eps=1e-8),
    "adam": lambda: Adam(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8),
    "adamw": lambda: Adam(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8),
}


def seed_case(name, n, dtype=np.float32, seed=0):
    """A no-argument callable doing one seed-style step of ``name`` on ``n`` elements.

    Like the seed's training loops, the returned parameters replace the old ones
    (``params = opt.update(params, grads)``).
    """
    rng = np.random.default_rng(seed)
    box = [rng.standard_normal(n).astype(dtype)]
    grads = (rng.standard_normal(n) * 0.01).astype(dtype)
    opt = FACTORIES[name]()

    def step():
        box[0] = opt.update(box[0], grads)

    return step


def seed_many_case(name, sizes, dtype=np.float32, seed=0):
    """One seed-style optimizer per tensor (the seed has no multi-tensor API)."""
    steps = [seed_case(name, n, dtype, seed + j) for j, n in enumerate(sizes)]

    def step():
        for s in steps:
            s()

    return step
