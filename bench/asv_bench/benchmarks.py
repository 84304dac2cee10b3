"""asv suite (``asv run``, ``asv continuous``; configuration: asv.conf.json at the top).

Parameter grids over optimizer, dtype and size; every ``setup`` runs the step once, so that numba's
compilation (or cache load) and the state allocation happen before timing.  Compile cost is timed
on its own, in fresh interpreters (``timeraw_*``).  The comparisons with torch and numpy live in
the pytest-benchmark suite (bench/test_*.py) and bench/targets.py; this suite tracks fastadapt
across commits.
"""

import os
import sys

_ROOT = None
try:
    import fastadapt.apps  # noqa: F401   (installed in asv's environment, or the current one)
except ImportError:                  # `asv run --python=same` from a clone that was not installed, or
    _ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    sys.path.insert(0, _ROOT)        # whose installed fastadapt predates fastadapt.apps: the clone's
    for _name in [m for m in sys.modules if m == "fastadapt" or m.startswith("fastadapt.")]:
        del sys.modules[_name]

import numpy as np  # noqa: E402

from fastadapt.apps import benchmark as B  # noqa: E402

OPTIMIZERS = list(B.OPTIMIZERS)


class DenseStep:
    """One parameter: a dense step per optimizer, dtype and size."""

    params = (OPTIMIZERS, ["float32", "float64"], [10_000, 1_000_000, 10_000_000])
    param_names = ["optimizer", "dtype", "elements"]
    timeout = 300

    def setup(self, name, dtype, n):
        self.step = B.dense_case(name, n, np.dtype(dtype))
        self.step()

    def time_step(self, name, dtype, n):
        self.step()

    def track_fraction_of_streaming_ceiling(self, name, dtype, n):
        """fastadapt's GB/s over the streaming loop's, medians of 7 interleaved rounds."""
        times = B.interleaved({"stream": B.stream_case(n, np.dtype(dtype)), "step": self.step}, 7, warmup=1)
        t_step, t_stream = np.median(times["step"]), np.median(times["stream"])
        return (B.bytes_per_element(name, dtype) / t_step) / (B.bytes_per_element("stream", dtype) / t_stream)

    track_fraction_of_streaming_ceiling.unit = "fraction"


class ManyTensors:
    """200 float32 tensors of log-uniform sizes 100..200k, one step over all of them."""

    params = OPTIMIZERS
    param_names = ["optimizer"]

    def setup(self, name):
        self.step = B.many_case(name, B.log_uniform_sizes(200, 100, 200_000, seed=0))
        self.step()

    def time_step(self, name):
        self.step()


class PerParameterOverhead:
    """200 tensors of 100 elements: the step is nearly all per-parameter Python work."""

    def setup(self):
        self.step = B.many_case("adam", [100] * 200)
        self.step()

    def time_step_200_params(self):
        self.step()


class SparseStep:
    """A 1M x 64 float32 table, 0.1 / 1 / 10 % of the rows touched, CSR and RowGrad gradients."""

    params = (["SparseAdam", "Adagrad"], ["csr", "rowgrad"], [0.001, 0.01, 0.1])
    param_names = ["optimizer", "gradient", "rows touched"]
    timeout = 300

    def setup(self, name, form, density):
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
        if here not in sys.path:
            sys.path.append(here)
        from bench_sparse import make_case   # bench/bench_sparse.py

        import fastadapt as fa

        case = make_case(density)
        table = np.zeros((case.nrows, case.ncols), np.float32)
        opt = fa.SparseAdam([table]) if name == "SparseAdam" else fa.Adagrad([table])
        grads = [case.csr if form == "csr" else case.row_grad]
        self.step = lambda: opt.step(grads)
        self.step()

    def time_step(self, name, form, density):
        self.step()


_FIRST_STEP = ("" if _ROOT is None else f"import sys; sys.path.insert(0, {_ROOT!r})\n") + """
import numpy as np
import fastadapt as fa
w = np.zeros(1_000_000, np.float32)
fa.Adam([w]).step([np.ones_like(w)])
"""


class Startup:
    """Fresh interpreters: ``import fastadapt`` + the first step, with the numba cache warm
    (``timeraw_import_and_first_step``) and empty (``timeraw_cold_compile``)."""

    timeout = 600

    def setup_cache(self):
        import subprocess
        subprocess.run([sys.executable, "-c", _FIRST_STEP], check=True)   # warm the numba cache

    def timeraw_import_and_first_step(self):
        return _FIRST_STEP

    def timeraw_cold_compile(self):
        return ("import os, tempfile\n"
                "os.environ['NUMBA_CACHE_DIR'] = tempfile.mkdtemp()\n" + _FIRST_STEP)
