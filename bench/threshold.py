"""Where the parallel loop starts to pay: ``python bench/threshold.py``.

Times fastadapt's serial and parallel dense loops directly (no Python-side step overhead) on
one parameter of 2**11 .. 2**19 elements, per rule and dtype, interleaved (see
fastadapt.apps.benchmark.interleaved), and prints the medians and the smallest size from which the
parallel loop is faster at every larger size -- the measurement behind
``fastadapt.config.PARALLEL_THRESHOLD``.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastadapt.apps import benchmark as B  # noqa: E402
from fastadapt import config  # noqa: E402
from fastadapt.algorithms import BY_NAME  # noqa: E402
from fastadapt.backends import cpu  # noqa: E402


def _case(name):
    """(compiled rule, per-step scalars for a dtype, state buffers used) of an algorithm's defaults."""
    alg = BY_NAME[name]
    h = alg.defaults
    return (cpu.compiled(alg.rule), lambda dt: alg.scalars(dt, 3, h, dict(alg.carry)), len(alg.used_buffers(h)))


RULES = {name.lower(): _case(name) for name in ("Adam", "Adagrad", "RMSprop")}


def main():
    sizes = [2**e for e in range(11, 20)]
    print(f"median microseconds per call (serial / parallel), numba {B.threads_info()['numba_threads']} threads; "
          f"config.PARALLEL_THRESHOLD = {config.PARALLEL_THRESHOLD}")
    print(f"{'rule':<9}{'dtype':<9}" + "".join(f"{n:>16}" for n in sizes) + "   parallel wins from")
    for name, (rule, scalars, nstate) in RULES.items():
        for dtype in (np.float32, np.float64):
            k = scalars(dtype)
            cells, wins = [], []
            for n in sizes:
                p, g = np.ones(n, dtype), np.full(n, 0.01, dtype)
                s = [np.zeros(n, dtype) for _ in range(nstate)] + [np.zeros(1, dtype)] * (3 - nstate)
                cases = {"serial": lambda: cpu._dense_serial(rule, p, g, *s, k),
                         "parallel": lambda: cpu._dense_parallel(rule, p, g, *s, k, cpu.work_unit(n))}
                med = {c: float(np.median(v)) * 1e6 for c, v in B.interleaved(cases, 30).items()}
                cells.append(f"{med['serial']:7.1f}/{med['parallel']:<7.1f}")
                wins.append(med["parallel"] < med["serial"])
            first = next((sizes[i] for i in range(len(sizes)) if all(wins[i:])), None)
            print(f"{name:<9}{np.dtype(dtype).name:<9}" + "".join(f"{c:>16}" for c in cells) + f"   {first}")


if __name__ == "__main__":
    main()
