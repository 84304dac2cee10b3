"""Sparse steps on a 1M x 64 float32 embedding table, 0.1 %, 1 % and 10 % of the rows touched.

Group ``sparse <optimizer> <density>``: fastadapt with a scipy CSR gradient and with a RowGrad,
torch with sparse COO gradients in its two forms (one index per element, which is what a CSR
gradient is, and hybrid COO, ``nn.Embedding(sparse=True)``'s form).  Inputs come from
bench/bench_sparse.py's ``make_case``.
"""

import numpy as np
import pytest
from bench_sparse import make_case
from conftest import run_benchmark

import fastadapt as fa

DENSITIES = [0.001, 0.01, 0.1]
IMPLS = ["fastadapt CSR", "fastadapt RowGrad", "torch element COO", "torch hybrid COO"]


@pytest.fixture(scope="module", params=DENSITIES, ids=lambda d: f"{d * 100:g}pct")
def case(request):
    return make_case(request.param)


def make_step(impl, name, case):
    if impl.startswith("fastadapt"):
        table = np.zeros((case.nrows, case.ncols), np.float32)
        opt = fa.SparseAdam([table]) if name == "SparseAdam" else fa.Adagrad([table])
        grads = [case.csr if impl.endswith("CSR") else case.row_grad]
        step = lambda: opt.step(grads)      # noqa: E731
    else:
        torch = pytest.importorskip("torch")
        element, hybrid = case.torch_grads()
        g = element if "element" in impl else hybrid
        p = torch.nn.Parameter(torch.zeros(case.nrows, case.ncols))
        opt = torch.optim.SparseAdam([p]) if name == "SparseAdam" else torch.optim.Adagrad([p])

        def step():
            p.grad = g
            opt.step()
    step()
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["SparseAdam", "Adagrad"])
def test_sparse(benchmark, case, name, impl):
    density = case.rows.size / case.nrows
    step = make_step(impl, name, case)
    run_benchmark(benchmark, f"sparse {name} {density:.1%} of 1M x 64 rows", step, impl=impl,
                  touched_rows=int(case.rows.size))
