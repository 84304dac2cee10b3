# The typed interface of fastadapt/optim/base.py (whose code stays free of annotations: it is the
# per-step hot path).  A .pyi next to a .py is what type checkers read instead of it, so this stub
# covers the whole module: tests/test_stubs.py checks that every public method and attribute of
# the runtime Optimizer is here with the same parameters.

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import numpy as np
from numpy.typing import NDArray

from ..algorithms import Algorithm
from ..algorithms._spec import MAX_STEP as MAX_STEP
from ..grads.device import DeviceCSR
from ..grads.bag import BagGrad
from ..grads.sparse import RowGrad

__all__ = ["Optimizer", "NONFINITE", "MAX_STEP"]

#: a parameter or a state buffer: a float numpy array, or a CUDA array (CuPy, torch, numba)
_Array: TypeAlias = NDArray[np.floating[Any]] | Any
#: what an optimizer is built from: arrays, or param-group dicts
_Params: TypeAlias = Iterable[_Array] | Iterable[dict[str, Any]]
#: one gradient of Optimizer.step: dense array, scipy CSR matrix, RowGrad, BagGrad, DeviceCSR, or None
_Grad: TypeAlias = _Array | RowGrad | BagGrad | DeviceCSR | None
_SparseMode: TypeAlias = Literal["lazy", "exact"]
_NonFinite: TypeAlias = Literal["propagate", "skip", "raise"]
_StateDtype: TypeAlias = Literal["float32", "bfloat16", "int8"] | None
_StateRounding: TypeAlias = Literal["stochastic", "nearest"]

NONFINITE: tuple[str, str, str]

class Optimizer:
    """Base class of fastadapt's optimizers (torch.optim's structure, numpy state)."""

    algorithm: Algorithm
    rule: Callable[..., None] | None
    slots: tuple[str | None, str | None, str | None]
    accepts_dense: bool
    defaults: dict[str, Any]
    nonfinite: _NonFinite
    skipped_steps: int
    param_groups: list[dict[str, Any]]
    state: list[dict[str, Any]]

    def __init__(self, params: _Params, defaults: Mapping[str, Any], *,
                 nonfinite: _NonFinite = "propagate") -> None: ...
    def add_param_group(self, param_group: dict[str, Any]) -> None: ...
    def step(self, grads: Sequence[_Grad]) -> bool: ...
    def state_dict(self, dtype: Literal["float32"] | None = None) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None: ...
    def state_of(self, p: _Array) -> dict[str, Any]: ...
    # hooks the prepared gradients, fastadapt.optim.many and fastadapt.distributed call
    @staticmethod
    def _check_overlaps(spans: Iterable[tuple[Any, ...]]) -> None: ...
    def _validate_group(self, group: Mapping[str, Any]) -> None: ...
    def _ensure_state(self, group: dict[str, Any], p: Any, state: dict[str, Any]) -> Any: ...
    def _buffer_names(self, group: Mapping[str, Any]) -> Any: ...
    def _scalars(self, group: Mapping[str, Any], state: dict[str, Any], dtype: Any) -> Any: ...
    def _slot_arrays(self, group: Mapping[str, Any], p: Any, state: dict[str, Any], flat: Any) -> Any: ...
    def _read_state(self, j: int) -> None: ...
