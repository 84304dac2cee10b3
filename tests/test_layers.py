"""The package's layers hold: import-linter's contracts (pyproject.toml) and no import cycles.

The layers, bottom to top: ``algorithms`` (declarations) <- ``backends`` (loops) <- ``grads``
(gradient formats) <- ``optim`` / ``functional`` (the API) <- ``distributed`` <- ``torch`` (torch.optim classes) <- ``apps``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_import_contracts_are_kept():
    pytest.importorskip("importlinter")
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command;"
                           " sys.exit(lint_imports_command())"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _cycles(adjacency):
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in adjacency:
        if root in index:
            continue
        work = [(root, iter(adjacency[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(adjacency[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("fastadapt")
    adjacency = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    assert _cycles(adjacency) == []
    assert _cycles({"a": ["b"], "b": ["a"], "c": []}) == [["a", "b"]]       # the checker finds one


def test_import_fastadapt_and_a_cpu_step_import_no_cuda_and_no_mpi():
    code = ("import sys, numpy as np, fastadapt as fa\n"
            "w = np.zeros((8, 4)); o = fa.RMSprop([w], sparse_mode='exact')\n"
            "o.step([np.ones((8, 4))]); o.step([fa.RowGrad([1], np.ones((1, 4)))]); o.state_dict()\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('numba.cuda', 'mpi4py', 'fastadapt.apps',"
            " 'fastadapt.distributed', 'fastadapt.backends.cuda', 'fastadapt.grads.device')))\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
