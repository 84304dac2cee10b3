"""The committed type stubs of the generated API match the registry (tools/gen_stubs.py).

``fastadapt.Adam`` & co. and the functions of :mod:`fastadapt.functional` are generated at import
time, so type checkers read them from ``fastadapt/__init__.pyi`` and ``fastadapt/functional.pyi``.
Adding or changing an algorithm without regenerating those stubs fails here.
"""

import ast
import importlib.util
import inspect
from pathlib import Path

import pytest

import fastadapt
from fastadapt import functional
from fastadapt.algorithms import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "python tools/gen_stubs.py"


def _gen_stubs():
    spec = importlib.util.spec_from_file_location("_gen_stubs", ROOT / "tools" / "gen_stubs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _gen_stubs()


@pytest.mark.parametrize("rel", sorted(GEN.stubs()))
def test_committed_stub_is_current(rel):
    expected = GEN.stubs()[rel]
    path = ROOT / rel
    assert path.exists(), f"{rel} is missing; run: {REGENERATE}"
    assert path.read_text() == expected, f"{rel} is stale (the registry changed); run: {REGENERATE}"


def _stub_tree(rel):
    return ast.parse((ROOT / rel).read_text())


def _stub_names(tree):
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname for a in node.names if a.asname == a.name)   # explicit re-exports
    return names


def test_every_public_name_is_in_the_stub():
    tree = _stub_tree("fastadapt/__init__.pyi")
    missing = set(fastadapt.__all__) - _stub_names(tree)
    assert not missing, f"fastadapt/__init__.pyi lacks {sorted(missing)}; run: {REGENERATE}"
    assert "DeviceCSR" in _stub_names(tree)
    stub_all = next(ast.literal_eval(n.value) for n in tree.body
                    if isinstance(n, ast.Assign) and n.targets[0].id == "__all__")
    assert stub_all == list(fastadapt.__all__)


def test_every_functional_function_is_in_the_stub():
    tree = _stub_tree("fastadapt/functional.pyi")
    missing = set(functional.__all__) - _stub_names(tree)
    assert not missing, f"fastadapt/functional.pyi lacks {sorted(missing)}; run: {REGENERATE}"


def _stub_signature(fn):
    """(name, kind, default) of each parameter of a stub function definition."""
    a = fn.args
    out = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for arg, d in zip(positional, defaults):
        out.append((arg.arg, "POSITIONAL_OR_KEYWORD", ast.literal_eval(d) if d is not None else inspect._empty))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, "KEYWORD_ONLY", ast.literal_eval(d) if d is not None else inspect._empty))
    return out


def _runtime_signature(sig):
    return [(p.name, p.kind.name, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("alg", REGISTRY, ids=lambda a: a.name)
def test_class_stub_matches_the_runtime_signature(alg):
    cls = next(n for n in _stub_tree("fastadapt/__init__.pyi").body
               if isinstance(n, ast.ClassDef) and n.name == alg.name)
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    runtime = getattr(fastadapt, alg.name)
    assert _stub_signature(init) == _runtime_signature(inspect.signature(runtime.__init__))
    assert [ast.unparse(b) for b in cls.bases] == [runtime.__mro__[1].__name__]


@pytest.mark.parametrize("alg", [a for a in REGISTRY if a.functional], ids=lambda a: a.functional)
def test_function_stub_matches_the_runtime_signature(alg):
    fn = next(n for n in _stub_tree("fastadapt/functional.pyi").body
              if isinstance(n, ast.FunctionDef) and n.name == alg.functional)
    assert _stub_signature(fn) == _runtime_signature(inspect.signature(getattr(functional, alg.functional)))
    assert ast.unparse(fn.returns) == (f"_{alg.name}Carry" if alg.carry else "None")


def test_unknown_kind_names_the_fix():
    from fastadapt.algorithms import Hyper
    from fastadapt.algorithms._spec import nonneg
    with pytest.raises(ValueError, match="KINDS"):
        GEN.annotation(Hyper("x", 1, nonneg, kind="complex"))


def test_optimizer_stub_covers_the_runtime_class():
    """fastadapt/optim/base.pyi (hand-written) has every public method of Optimizer, same parameters."""
    from fastadapt.optim.base import Optimizer
    tree = _stub_tree("fastadapt/optim/base.pyi")
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Optimizer")
    stub_methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
    stub_attrs = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    public = [name for name, v in vars(Optimizer).items()
              if callable(v) and (not name.startswith("_") or name == "__init__")]
    for name in public:
        assert name in stub_methods, f"Optimizer.{name} is missing from fastadapt/optim/base.pyi"
        runtime = [(p.name, p.kind.name) for p in inspect.signature(getattr(Optimizer, name)).parameters.values()]
        assert [(n, k) for n, k, _ in _stub_signature(stub_methods[name])] == runtime, name
    w = __import__("numpy").zeros(3)
    opt = fastadapt.Adam([w])
    attrs = {k for k in vars(opt) if not k.startswith("_")} | {
        k for k, v in vars(Optimizer).items() if not k.startswith("_") and not callable(v)}
    assert attrs <= stub_attrs, f"fastadapt/optim/base.pyi lacks {sorted(attrs - stub_attrs)}"
