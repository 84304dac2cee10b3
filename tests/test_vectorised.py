"""The dense loops vectorise, for every rule and both dtypes, and float32 stays float32.

Checked in the machine code numba generates (``inspect_asm``), compiled afresh in a subprocess
with an empty numba cache (cached code cannot be inspected): the inner loop of the shared
``fastadapt.cpu._run`` must use packed square roots and divisions, and a float32 loop must not
convert to float64 (``cvtss2sd``).  Each check here once failed: RMSprop's loop ran scalar
(reference counts left in the loop) until the loops built their arrays from raw addresses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, re
    import numpy as np
    from fastadapt import cpu, rules
    cases = {
        "adam": (cpu.adam, lambda dt: rules.adam_scalars(dt, 2, 1e-3, (0.9, 0.999), 1e-8, 0.1, True, True, True)),
        "rmsprop": (cpu.rmsprop, lambda dt: rules.rmsprop_scalars(dt, 2, 1e-2, 0.99, 1e-8, 0.1, 0.9, True, True)),
        "adagrad": (cpu.adagrad, lambda dt: rules.adagrad_scalars(dt, 2, 1e-2, 0.1, 0.1, 1e-10, True)),
    }
    out = {}
    for name, (rule, scalars) in cases.items():
        for dt in (np.float32, np.float64):
            a = [np.ones(64, dt) for _ in range(5)]
            cpu._dense_serial(rule, *a, scalars(dt))
    for sig, asm in cpu._run.inspect_asm().items():
        rule = re.search(r"function (\\w+)_rule", str(sig[0])).group(1)
        suffix = "s" if str(sig[1].dtype) == "float32" else "d"
        out[f"{rule}-{sig[1].dtype}"] = {
            "packed_sqrt": len(re.findall(rf"\\bv?sqrtp{suffix}\\b", asm)),
            "packed_div": len(re.findall(rf"\\bv?divp{suffix}\\b", asm)),
            "to_float64": len(re.findall(r"\\bv?cvtss2sd\\b", asm)),
            "calls_in_kernel": len(re.findall(r"NRT_incref", asm)),
        }
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def asm_counts(tmp_path_factory):
    cache = tmp_path_factory.mktemp("numba_cache")
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache),
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rule", ["adam", "rmsprop", "adagrad"])
def test_dense_loop_is_vectorised(asm_counts, rule, dtype):
    counts = asm_counts[f"{rule}-{dtype}"]
    assert counts["packed_sqrt"] > 0, counts
    assert counts["packed_div"] > 0, counts
    assert counts["calls_in_kernel"] == 0, counts            # no reference counting left in the loop
    if dtype == "float32":
        assert counts["to_float64"] == 0, counts
