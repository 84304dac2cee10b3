"""The dense loops vectorise, for every registered algorithm and both dtypes, and float32 stays float32.

Checked in the machine code numba generates (``inspect_asm``), compiled afresh in a subprocess
with an empty numba cache (cached code cannot be inspected): the inner loop of the shared
``fastadapt.backends.cpu._run`` must use packed square roots and divisions, and a float32 loop must not
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

from fastadapt.algorithms import REGISTRY

SCRIPT = textwrap.dedent("""
    import ast, inspect, json, re, textwrap
    import numpy as np
    from fastadapt.algorithms import REGISTRY
    from fastadapt.backends import cpu, cpu_rows
    out = {}
    seen = set()
    by_rule = {}
    for alg in REGISTRY:
        if alg.rule in by_rule:             # a variant (AdamW): the same loop as its parent's
            for dt in ("float32", "float64"):
                out[f"{alg.name}-{dt}"] = out[f"{by_rule[alg.rule]}-{dt}"]
            continue
        by_rule[alg.rule] = alg.name
        # every option that adds work switched on (flags True, numbers non-zero)
        h = dict(alg.defaults)
        for hp in alg.hypers:
            if hp.kind == "bool":
                h[hp.name] = True
            elif hp.kind == "float" and h[hp.name] == 0 and hp.name != "lr_decay":
                h[hp.name] = 0.1
        try:
            alg.check_group(h)
        except ValueError:                  # combinations the algorithm refuses: defaults then
            h = dict(alg.defaults)
        rule = cpu.compiled(alg.rule)
        if alg.rows:                        # a row rule: the row loop's update of the row is packed
            for dt in (np.float32, np.float64):
                p, g, s = np.ones(64 * 8, dt), np.ones(64 * 8, dt), np.ones(8, dt)
                cpu_rows._lazy(rule, p, np.arange(8), g, 64, s, s[:1], s[:1], dt(64),
                               alg.scalars(dt, 2, h, {}))
                new = [(sig, asm) for sig, asm in cpu_rows._lazy.inspect_asm().items() if sig not in seen]
                assert len(new) == 1, len(new)
                sig, asm = new[0]
                seen.add(sig)
                suffix = "s" if dt == np.float32 else "d"
                out[f"{alg.name}-{np.dtype(dt).name}"] = {
                    "rows": True,
                    "packed_mul": len(re.findall(rf"\\bv?mulp{suffix}\\b", asm)),
                    "to_float64": len(re.findall(r"\\bv?cvtss2sd\\b", asm)),
                    "calls_in_kernel": len(re.findall(r"NRT_incref", asm)),
                }
            continue
        for dt in (np.float32, np.float64):
            a = [np.ones(64, dt) for _ in range(5)]
            cpu._dense_serial(rule, *a, alg.scalars(dt, 2, h, {n: v for n, v in alg.carry}))
            new = [(sig, asm) for sig, asm in cpu._run.inspect_asm().items() if sig not in seen]
            assert len(new) == 1, len(new)
            sig, asm = new[0]
            seen.add(sig)
            suffix = "s" if dt == np.float32 else "d"
            out[f"{alg.name}-{np.dtype(dt).name}"] = {
                "uses_sqrt": "math.sqrt" in inspect.getsource(alg.rule),
                "uses_div": any(isinstance(n, ast.Div) for n in ast.walk(ast.parse(
                    textwrap.dedent(inspect.getsource(alg.rule))))),
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
@pytest.mark.parametrize("name", [a.name for a in REGISTRY])
def test_dense_loop_is_vectorised(asm_counts, name, dtype):
    counts = asm_counts[f"{name}-{dtype}"]
    if counts.get("rows"):                  # a row rule: the scalar part is once per row
        assert counts["packed_mul"] > 0, counts
    elif counts["uses_sqrt"]:
        assert counts["packed_sqrt"] > 0, counts
    if counts.get("uses_div"):
        assert counts["packed_div"] > 0, counts
    assert counts["calls_in_kernel"] == 0, counts            # no reference counting left in the loop
    if dtype == "float32":
        assert counts["to_float64"] == 0, counts
