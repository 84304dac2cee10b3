"""fastadapt's optimizers as ``torch.optim.Optimizer`` subclasses: ``import fastadapt.torch``.

::

    import torch, fastadapt.torch
    model = torch.nn.Linear(10, 1)
    opt = fastadapt.torch.Adam(model.parameters(), lr=1e-3)
    loss = model(x).pow(2).mean(); loss.backward()
    opt.step(); opt.zero_grad()

One class per algorithm of :data:`fastadapt.algorithms.REGISTRY`, with the same name and arguments
as the numpy class (``fastadapt.Adam``), plus torch's own ``foreach`` / ``fused`` / ``capturable`` /
``differentiable`` where torch's class of that name has them.

How it works: the optimizer keeps torch's own ``param_groups`` (so ``torch.optim.lr_scheduler``,
``add_param_group``, ``clip_grad_norm_`` and ``zero_grad`` work unchanged) and an *inner* fastadapt
optimizer over zero-copy views of the same parameters (``t.detach().numpy()`` for CPU tensors, the
tensor itself -- through ``__cuda_array_interface__`` -- for CUDA ones).  At every :meth:`step`, the
groups' hyper-parameters are copied into the inner groups (only those that changed) and each
parameter's ``.grad`` is handed over without a copy: dense gradients as views, sparse COO gradients
(``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``; coalesced or not) as
:class:`fastadapt.RowGrad` (rows and values, never densified; duplicates are summed in the step).

:meth:`state_dict` has torch.optim's layout (tensors, ``step`` as torch keeps it, torch's group keys)
and :meth:`load_state_dict` takes torch.optim's state_dicts: checkpoints are interchangeable with
``torch.optim.<Name>`` in both directions.

This module imports torch; ``import fastadapt`` never imports it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Dict, Iterator, List, Type

import numpy as np
import torch

from .algorithms import REGISTRY, Algorithm
from .grads.sparse import RowGrad
from .optim import CLASSES

__all__ = ["Optimizer", *(a.name for a in REGISTRY)]

#: the options of torch.optim's classes that select an implementation, not the math
TORCH_ONLY = ("foreach", "fused", "capturable", "differentiable")
#: fastadapt's options that torch's classes do not have (omitted from state_dict() at their defaults)
EXTRAS = ("sparse_mode", "state_dtype", "state_rounding")

_MISSING = object()
_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}
_STRIDED = torch.strided


def _torch_group_defaults(alg: Algorithm) -> Dict[str, Any]:
    """The param group torch.optim's class of ``alg``'s name makes by default (no 'params'); {} when
    torch has no such class."""
    cls = getattr(torch.optim, alg.name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        return {}
    group = dict(cls([torch.zeros(1, requires_grad=True)]).param_groups[0])
    del group["params"]
    return group


def _scalar_dtype(fused: Any = None) -> torch.dtype:
    """torch's dtype of ``state["step"]`` (torch.optim.optimizer._get_scalar_dtype)."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _hyper(key: str, value: Any) -> Any:
    """A torch group's value as the inner (numpy) group holds it."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if key == "betas" and isinstance(value, (list, tuple)):
        value = tuple(v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for v in value)
    return value


class _State(Mapping):
    """``opt.state``: parameter tensor -> its state, read from the inner optimizer.

    Buffers are tensors sharing memory with the live state (compressed state: decoded copies);
    ``step`` is a Python int.  Read-only: use :meth:`Optimizer.load_state_dict` to set state."""

    def __init__(self, opt: "Optimizer") -> None:
        self._opt = opt

    def _index(self, p: Any) -> int:
        j = self._opt._index.get(id(p))
        if j is None or self._opt._tensors[j] is not p:
            raise KeyError("this tensor is not a parameter of the optimizer")
        return j

    def __getitem__(self, p: Any) -> Dict[str, Any]:
        opt = self._opt
        j = self._index(p)
        inner = opt._inner
        inner._read_state(j)
        out = {}
        for k, v in inner.state[j].items():
            if k.startswith("_"):
                continue
            if isinstance(v, np.ndarray):
                out[k] = torch.from_numpy(v)
            elif getattr(type(v), "compressed_state", False):
                out[k] = torch.from_numpy(np.asarray(v))
            elif hasattr(v, "__cuda_array_interface__"):
                out[k] = torch.as_tensor(v, device=p.device)
            else:
                out[k] = v
        return out

    def __iter__(self) -> Iterator[Any]:
        opt = self._opt
        return iter([t for j, t in enumerate(opt._tensors) if opt._inner is not None and opt._inner.state[j]])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, p: object) -> bool:
        try:
            j = self._index(p)
        except KeyError:
            return False
        return bool(self._opt._inner.state[j])


class Optimizer(torch.optim.Optimizer):
    """Base of the classes of :mod:`fastadapt.torch`: a ``torch.optim.Optimizer`` whose step is
    fastadapt's (see the module docstring).  Not instantiated itself."""

    #: the algorithm of the class
    algorithm: Algorithm
    #: the numpy class (``fastadapt.<Name>``) the inner optimizer is made of
    inner_class: Type[Any]
    #: torch.optim's default group of the class of the same name ({} without one)
    torch_defaults: Dict[str, Any] = {}

    def __init__(self, params: Any, defaults: Dict[str, Any], *, nonfinite: str = "propagate") -> None:
        self._inner: Any = None
        self._nonfinite = nonfinite
        self._tensors: List[torch.Tensor] = []
        self._ptrs: List[int] = []
        self._index: Dict[int, int] = {}
        self._sizes: List[int] = []
        self._memo: List[Dict[str, Any]] = []
        self._fa_keys = tuple(self.algorithm.defaults)
        if isinstance(params, np.ndarray):
            raise TypeError(f"fastadapt.torch.{self.algorithm.name} optimises torch tensors (model.parameters()); "
                            f"for numpy arrays use fastadapt.{self.algorithm.name}")
        super().__init__(params, defaults)
        self.state = _State(self)

    # ------------------------------------------------------------------ groups

    def _check_torch_options(self, group: Dict[str, Any], gi: int) -> None:
        for key in TORCH_ONLY:
            if key not in self.torch_defaults:
                continue
            value = group.get(key)
            if key == "fused" and value in (None, False, True):
                continue                           # fastadapt's step is always one fused pass
            if value in (None, False):
                continue
            why = {"foreach": "fastadapt's step is one compiled pass over all parameters; there is no "
                              "per-tensor or foreach variant to choose",
                   "capturable": "fastadapt's step runs on the host (CUDA graph capture is not supported)",
                   "differentiable": "fastadapt's step is not recorded by autograd",
                   "fused": "fastadapt's step is always fused"}[key]
            raise ValueError(f"fastadapt.torch.{self.algorithm.name}: {key}={value!r} (param group {gi}) is not "
                             f"supported: {why}; leave {key} at None/False")

    def _view(self, p: torch.Tensor, where: str) -> Any:
        """The array the inner optimizer updates for parameter ``p`` (shares its memory)."""
        if p.dtype in (torch.float16, torch.bfloat16):
            raise TypeError(f"{where} is {p.dtype}: fastadapt updates float32 and float64 parameters only; keep "
                            "float32 master weights (e.g. torch.autocast for the forward pass) and optimise those")
        if p.dtype not in _FLOATS:
            raise TypeError(f"{where} is {p.dtype}: fastadapt updates float32 and float64 parameters only")
        if p.layout != torch.strided:
            raise TypeError(f"{where} has layout {p.layout}: fastadapt updates dense (strided) parameters")
        if not p.is_contiguous():
            raise ValueError(f"{where} (shape {tuple(p.shape)}) is not contiguous: fastadapt updates parameters in "
                             "place through a flat view; make it contiguous before building the optimizer")
        if p.device.type == "cpu":
            return p.detach().numpy()
        if p.device.type == "cuda":
            return p.detach()                      # __cuda_array_interface__: fastadapt's CUDA backend
        raise ValueError(f"{where} is on device {p.device}: fastadapt runs on the CPU and on CUDA GPUs")

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group (torch's semantics); checked by fastadapt too, before anything changes."""
        n_groups = len(self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            gi = n_groups
            self._check_torch_options(group, gi)
            views = [self._view(p, f"parameter {len(self._tensors) + k} (param group {gi}, shape "
                                   f"{tuple(p.shape)})") for k, p in enumerate(group["params"])]
            memo = {k: group.get(k, _MISSING) for k in self._fa_keys}
            inner_group = {k: _hyper(k, v) for k, v in memo.items() if v is not _MISSING}
            inner_group["params"] = views
            if self._inner is None:
                self._inner = self.inner_class([inner_group], nonfinite=self._nonfinite)
            else:
                self._inner.add_param_group(inner_group)
        except Exception:
            self.param_groups.pop()
            raise
        self._memo.append(memo)
        self._sizes.append(len(group["params"]))
        for p in group["params"]:
            self._index[id(p)] = len(self._tensors)
            self._tensors.append(p)
            self._ptrs.append(p.data_ptr())

    def _sync(self) -> None:
        """Copy the hyper-parameters that changed in torch's groups into the inner groups."""
        for tg, ig, memo in zip(self.param_groups, self._inner.param_groups, self._memo):
            for k, old in memo.items():
                v = tg.get(k, _MISSING)
                if v is not old or type(v) is torch.Tensor:     # (a tensor lr may change in place)
                    if v is _MISSING:
                        raise KeyError(f"param group has no {k!r} any more (it was deleted by hand)")
                    memo[k] = v
                    ig[k] = _hyper(k, v)

    # ------------------------------------------------------------------ step

    def _grad(self, p: torch.Tensor, j: int) -> Any:
        g = p.grad
        if g is None:
            return None
        if (g.layout is _STRIDED and g.dtype is p.dtype and g.is_cpu and p.is_cpu and g.shape == p.shape
                and g.is_contiguous()):                          # the usual case, checked cheaply
            return g.detach().numpy() if g.requires_grad else g.numpy()
        where = f"the gradient of parameter {j} (shape {tuple(p.shape)})"
        if g.dtype != p.dtype:
            raise TypeError(f"{where} is {g.dtype}, the parameter {p.dtype}; they must match")
        if tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"{where} has shape {tuple(g.shape)}; it must have the parameter's")
        if g.device != p.device:
            raise ValueError(f"{where} is on {g.device}, the parameter on {p.device}")
        if g.layout == torch.strided:
            if not g.is_contiguous():
                raise ValueError(f"{where} is not contiguous; fastadapt reads gradients in place (pass "
                                 "p.grad = p.grad.contiguous())")
            g = g.detach()
            return g.numpy() if g.device.type == "cpu" else g
        if g.layout == torch.sparse_coo:
            idx, vals = g._indices(), g._values().detach()
            if g.sparse_dim() == 1:                 # nn.Embedding / EmbeddingBag: whole rows
                if not vals.is_contiguous():
                    vals = vals.contiguous()
                if g.device.type == "cpu":
                    return RowGrad(idx[0].numpy(), vals.numpy())
                return RowGrad(idx[0].contiguous(), vals)
            if g.sparse_dim() == 2 and g.dim() == 2 and g.device.type == "cpu":
                import scipy.sparse as sp          # element-wise COO of a matrix: CSR (duplicates summed)
                return sp.csr_matrix((vals.numpy(), (idx[0].numpy(), idx[1].numpy())), shape=tuple(g.shape))
            raise ValueError(f"{where} is a sparse COO tensor with sparse_dim={g.sparse_dim()}: fastadapt takes "
                             "row-sparse gradients (sparse_dim=1, as nn.Embedding(sparse=True) makes) or, for a "
                             "matrix on the CPU, element-sparse ones (sparse_dim=2)")
        raise TypeError(f"{where} has layout {g.layout}: fastadapt takes strided or sparse COO gradients")

    def _grads(self) -> List[Any]:
        grads = []
        tensors, ptrs = self._tensors, self._ptrs
        if len(self.param_groups) != len(self._sizes):
            raise ValueError(f"param_groups has {len(self.param_groups)} groups, the optimizer was built with "
                             f"{len(self._sizes)}: add groups with add_param_group")
        j = 0
        for gi, (group, n) in enumerate(zip(self.param_groups, self._sizes)):
            params = group["params"]
            if len(params) != n:
                raise ValueError(f"param group {gi}'s 'params' was resized after construction (it had {n} "
                                 "parameters); add parameters with add_param_group")
            for p in params:
                if p is not tensors[j]:
                    raise ValueError(f"parameter {j} is not the tensor this optimizer was built with (it was "
                                     "replaced in param_groups); build a new optimizer")
                if p.data_ptr() != ptrs[j]:
                    raise ValueError(f"parameter {j}'s storage was replaced (p.data = ... or set_()) after the "
                                     "optimizer was built: it would update the old memory; update the parameter "
                                     "in place (p.data.copy_(...)) or build a new optimizer")
                grads.append(self._grad(p, j))
                j += 1
        return grads

    def step(self, closure: Any = None) -> Any:
        """One step over every parameter with a ``.grad`` (those whose ``.grad`` is None are skipped).

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss (called with gradients enabled, first).

        Returns
        -------
        The closure's loss, or None.

        Raises
        ------
        ValueError, TypeError
            A gradient of the wrong dtype, shape, layout or memory layout, or a bad hyper-parameter:
            nothing is changed.  FloatingPointError with ``nonfinite="raise"``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self._grads()
        self._sync()
        self._inner.step(grads)
        return loss

    # ------------------------------------------------------------------ state_dict

    def _step_value(self, step: int, group: Dict[str, Any]) -> Any:
        name = self.algorithm.name
        if name == "SparseAdam":
            return int(step)                       # torch's SparseAdam keeps an int
        return torch.tensor(float(step), dtype=_scalar_dtype(group.get("fused")))

    def state_dict(self) -> Dict[str, Any]:
        """The state in torch.optim's layout: ``{"state": {index: {"step": 0-d tensor (as torch keeps
        it), buffer: tensor}}, "param_groups": [torch's keys..., "params": [index, ...]]}``.

        ``torch.optim.<Name>.load_state_dict`` accepts it.  Compressed state (``state_dtype``) is
        decoded to float32; fastadapt's options (``sparse_mode``, ``state_dtype``, ``state_rounding``)
        appear in the groups only when they are not at their defaults.  Tensors are copies."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        inner_sd = self._inner.state_dict(dtype="float32")
        carried = {n for n, _ in self.algorithm.carry}
        group_of = []
        for group in self.param_groups:
            group_of += [group] * len(group["params"])
        state: Dict[int, Dict[str, Any]] = {}
        for j, st in inner_sd["state"].items():
            p, group = self._tensors[j], group_of[j]
            out: Dict[str, Any] = {}
            for k, v in st.items():
                if k == "step":
                    if self.algorithm.name != "SGD":              # torch's SGD keeps no count
                        out[k] = self._step_value(v, group)
                elif k in carried:
                    out[k] = torch.tensor(float(v), dtype=p.dtype)
                else:
                    t = torch.from_numpy(np.ascontiguousarray(v))
                    out[k] = t if p.device.type == "cpu" else t.to(p.device)
            if out:
                state[j] = out
        groups = []
        j = 0
        defaults = self.algorithm.defaults
        for group in self.param_groups:
            g = {k: v for k, v in group.items() if k != "params"}
            for k in EXTRAS:
                if k in g and g[k] == defaults.get(k, _MISSING):
                    del g[k]
            g["params"] = list(range(j, j + len(group["params"])))
            j += len(group["params"])
            groups.append(g)
        out = {"state": state, "param_groups": groups}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state_dict of this class or of ``torch.optim.<Name>`` (or a numpy ``fastadapt.<Name>``).

        Everything is checked (by the inner optimizer) before anything changes.  Tensors are copied
        (cast to the parameter's dtype, as torch does); torch's implementation options
        (``foreach``, ``fused``, ...) keep this optimizer's values."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        try:
            saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        except (TypeError, KeyError):
            raise ValueError("not a state_dict: it needs 'state' and 'param_groups'") from None
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has "
                             f"{len(self.param_groups)}")
        merged, inner_groups, position = [], [], {}
        for gi, (saved, mine) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved.get("params", ())) != len(mine["params"]):
                raise ValueError(f"loaded state dict's param group {gi} has {len(saved.get('params', ()))} "
                                 f"parameters, this optimizer's {len(mine['params'])}")
            m = {k: v for k, v in mine.items() if k != "params"}
            m.update({k: v for k, v in saved.items() if k not in ("params", "param_names") and k not in TORCH_ONLY})
            merged.append(m)
            ig = {k: _hyper(k, m[k]) for k in self._fa_keys if k in m}
            ig["params"] = list(saved["params"])
            inner_groups.append(ig)
            for idx, p in zip(saved["params"], mine["params"]):
                position[idx] = p
        carried = {n for n, _ in self.algorithm.carry}
        inner_state = {}
        for idx, st in saved_state.items():
            p = position.get(idx)
            if p is None or not isinstance(st, Mapping):
                inner_state[idx] = st              # the inner optimizer names what is wrong
                continue
            np_dtype = _FLOATS[p.dtype]
            new: Dict[str, Any] = {}
            for k, v in st.items():
                if v is None:
                    continue
                if k == "step":
                    s = float(v.item()) if isinstance(v, torch.Tensor) else v
                    if isinstance(s, float):
                        if not s.is_integer():
                            raise ValueError(f"state of parameter {idx}: 'step' must be a whole number, got {s}")
                        s = int(s)
                    new[k] = s
                elif k in carried:
                    new[k] = float(v.item()) if isinstance(v, torch.Tensor) else v
                elif isinstance(v, torch.Tensor):
                    arr = v.detach().cpu().numpy()
                    new[k] = arr.astype(np_dtype, copy=False) if arr.dtype.kind == "f" else arr
                else:
                    new[k] = v
            if "step" not in new and any(isinstance(v, np.ndarray) for v in new.values()):
                new["step"] = 1                    # torch's SGD keeps no count: its buffer exists, so >= 1
            if new:
                inner_state[idx] = new
        self._inner.load_state_dict({"state": inner_state, "param_groups": inner_groups})
        for tg, m in zip(self.param_groups, merged):
            params = tg["params"]
            tg.clear()
            tg.update(m)
            tg["params"] = params
        for memo, tg in zip(self._memo, self.param_groups):
            for k in memo:
                memo[k] = tg.get(k, _MISSING)       # the inner groups hold these values already
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    @property
    def inner(self) -> Any:
        """The numpy optimizer (``fastadapt.<Name>``) doing the steps, over views of the parameters."""
        return self._inner

    @property
    def skipped_steps(self) -> int:
        """How many steps ``nonfinite="skip"`` skipped."""
        return int(self._inner.skipped_steps)


def _make(alg: Algorithm, base: type) -> type:
    inner_cls = CLASSES[alg.name]
    torch_defaults = _torch_group_defaults(alg)
    torch_only = {k: v for k, v in torch_defaults.items() if k in TORCH_ONLY}
    sig = inspect.signature(inner_cls.__init__)
    params = list(sig.parameters.values())
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in torch_only.items()]
    signature = sig.replace(parameters=params)
    inner_names = [n for n in sig.parameters if n not in ("self", "params", "nonfinite")]

    def __init__(self: Optimizer, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"fastadapt.torch.{alg.name}(): {exc}") from None
        bound.apply_defaults()
        a = bound.arguments
        defaults = {n: a[n] for n in inner_names}
        defaults.update(alg.fixed)
        defaults.update({k: a[k] for k in torch_only})
        self._check_torch_options(defaults, 0)
        Optimizer.__init__(self, a["params"], defaults, nonfinite=a["nonfinite"])

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    extra = ""
    if torch_only:
        extra = ("\n\ntorch's implementation options " + ", ".join(f"``{k}``" for k in torch_only)
                 + " are accepted at None/False and refused otherwise"
                 + (", except ``fused=True``, accepted: fastadapt's step is always fused (one compiled pass)"
                    if "fused" in torch_only else "") + ".")
    doc = (f"fastadapt.{alg.name} as a ``torch.optim.Optimizer``: same arguments, torch's step/zero_grad/"
           f"state_dict/param_groups.{extra}\n\n" + (inner_cls.__doc__ or ""))
    namespace = {"__init__": __init__, "__doc__": doc, "__module__": __name__, "__qualname__": alg.name,
                 "algorithm": alg, "inner_class": inner_cls, "torch_defaults": torch_defaults}
    return type(alg.name, (base,), namespace)


_CLASSES: Dict[str, type] = {}
for _alg in REGISTRY:
    _CLASSES[_alg.name] = _make(_alg, _CLASSES[_alg.parent] if _alg.parent else Optimizer)
del _alg
globals().update(_CLASSES)

