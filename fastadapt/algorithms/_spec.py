"""What an optimizer is: the declaration each module of :mod:`fastadapt.algorithms` makes.

An :class:`Algorithm` holds everything fastadapt needs to know about one optimizer, and
nothing is written twice:

* its **rule** -- the per-element update, a plain Python function over scalars
  ``rule(p, s1, s2, s3, i, g, k)`` that every backend compiles from this one source
  (numba CPU loops inline it, numba.cuda compiles it as a device function);
* its **per-step scalars** -- ``scalars(dtype, step, h, carry)`` returns a NamedTuple ``k``
  computed once per step in Python float64 and rounded to the parameter dtype (so a float32
  loop never promotes to float64);
* its **state slots** -- the names of the (up to three) state buffers in the rule's slot
  order, which of them the current hyper-parameters use, and their initial fill;
* its **hyper-parameters** (:class:`Hyper`) -- name, default, check and documentation, from
  which the public class's signature, validation and docstring and the functional layer's
  function are generated (:mod:`fastadapt.optim`, :mod:`fastadapt.functional`);
* how ``sparse_mode="exact"`` runs (:data:`LAZY`, :data:`FUSED` or a :class:`Decay`).

The rule's arguments
--------------------
``p``
    the flat parameter, updated in place at ``i``;
``s1, s2, s3``
    the flat state buffers (an unused slot receives an array the rule never reads);
``i``
    the flat index of the element;
``g``
    the gradient value at ``i`` (already summed over duplicates for sparse inputs);
``k``
    the NamedTuple of per-step scalars: flags as booleans, every number in the parameter
    dtype.

Rules call nothing but ``math`` functions and :func:`fma` (which every backend compiles to its
fused multiply-add), so that every backend can compile them as they are; ATen's ``lerp`` -- ``a + w*(b-a)`` if ``|w| < 0.5`` else ``b - (b-a)*(1-w)`` -- is
therefore written out where it is used.  The equations and their evaluation order are the
project's specification (docs, "Specification").
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np

__all__ = ["Algorithm", "Hyper", "Decay", "LAZY", "FUSED", "fma", "scalar_type", "rule_helper", "STATE_DTYPES", "STATE_ROUNDINGS", "STATE_OPTIONS", "check_state_options", "RULE_HELPERS", "scale_slots", "decay_factor", "short_repr", "MAX_STEP",
           "nonneg", "positive", "below_one", "unit_interval", "flag", "one_of", "betas", "check_number"]

#: exact mode: a zero gradient changes nothing, so the lazy loop is already exact (O(nnz))
LAZY = "lazy"
#: exact mode: one pass over the whole parameter, the rule with g = 0 on untouched entries
FUSED = "fused"

#: step counts stay below this (2**53: every count is exact as the float64 that bias corrections
#: use); checked where a count comes from outside (load_state_dict, the functional layer)
MAX_STEP = 2 ** 53

#: the type of ``rule``
Rule = Callable[..., None]


@dataclass(frozen=True)
class Decay:
    """Exact mode by closed-form catch-up.

    Declares that a step with a zero gradient leaves the parameter where it is and multiplies
    each state slot flagged in ``slots`` by ``base`` (RMSprop's averages by ``alpha``,
    Adadelta's by ``rho``).  The sparse machinery then keeps a per-row stamp, catches a row
    up by ``base ** gap`` (:func:`decay_factor`, :func:`scale_slots`) when it is next
    touched or its state is read, and never walks untouched rows.
    """

    base: float
    slots: Tuple[bool, bool, bool]


ExactPlan = Union[str, Decay]


#: functions that rules call besides ``math`` and :func:`fma` (see :func:`rule_helper`)
RULE_HELPERS: list = []


def rule_helper(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Declare ``fn`` a rule helper: update math shared by several rules, written once.

    A helper has a rule's signature ``(p, s1, s2, s3, i, g, k)`` and may return values; every
    backend compiles calls to it inline (numba CPU loops and CUDA device code alike; in Python --
    numba's CUDA simulator, the tests -- it is simply called).
    """
    RULE_HELPERS.append(fn)
    return fn


def fma(a: Any, b: Any, c: Any) -> Any:
    """``a * b + c`` with one rounding, to the type of ``c``: torch's CPU kernels compute
    ``g.add(p, alpha=weight_decay)`` this way, and where ``g`` and ``weight_decay * p`` nearly
    cancel, rounding the product first would differ from torch by far more than an ulp.

    This Python version (used by numba's CUDA simulator and as the definition) is exact:
    the product and the sum are taken in rational arithmetic and rounded once.  The backends
    compile calls to it into the hardware instruction (``llvm.fma`` on the CPU, ``fma`` on CUDA).
    """
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    return round_to(exact, type(c))


# =========================================================================== compressed state

#: the values of the ``state_dtype`` option: None (state in the parameter's dtype), or for
#: float32 parameters "float32" (the same), "bfloat16" or "int8" (8-bit blockwise)
STATE_DTYPES = (None, "float32", "bfloat16", "int8")
#: the values of the ``state_rounding`` option (how bfloat16 state is rounded)
STATE_ROUNDINGS = ("stochastic", "nearest")
#: the state options every optimizer has, with their defaults
STATE_OPTIONS = {"state_dtype": None, "state_rounding": "stochastic"}


def check_state_options(h: Mapping[str, Any]) -> None:
    """Check a group's ``state_dtype`` and ``state_rounding`` (absent: the defaults)."""
    dtype = h.get("state_dtype")
    if not (dtype is None or (type(dtype) is str and dtype in STATE_DTYPES)):
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {short_repr(dtype)}: None keeps the "
                         "state in the parameter's dtype; \"bfloat16\" (2 bytes) and \"int8\" (about 1 byte per "
                         "value) compress the state of float32 parameters")
    rounding = h.get("state_rounding", "stochastic")
    if not (type(rounding) is str and rounding in STATE_ROUNDINGS):
        raise ValueError(f"state_rounding must be one of {STATE_ROUNDINGS}, got {short_repr(rounding)}")


_SCALAR_TYPES: dict = {}


def scalar_type(dtype: Any) -> Any:
    """The type a ``scalars`` function rounds its numbers to for arrays of ``dtype``: ``float`` for
    float64 (the same IEEE double as ``np.float64``, and numba types both as float64, but built
    several times faster), ``np.float32`` for float32."""
    t = _SCALAR_TYPES.get(dtype)
    if t is None:
        t = np.dtype(dtype).type
        if t is np.float64:
            t = float
        _SCALAR_TYPES[dtype] = t
    return t


def round_to(x: Fraction, dtype: Any) -> Any:
    """The rational ``x`` rounded once (to nearest, ties to even) to float type ``dtype``."""
    if dtype is float or np.dtype(dtype) == np.float64:
        return dtype(float(x))                      # Fraction -> float64 is correctly rounded
    t = np.dtype(dtype).type
    near = t(float(x))                              # within an ulp of the answer (double rounding)
    candidates = [near, np.nextafter(near, t(np.inf)), np.nextafter(near, t(-np.inf))]
    finite = [v for v in candidates if np.isfinite(v)]
    if not finite:
        return near
    best = min(finite, key=lambda v: (abs(Fraction(float(v)) - x), int(v.view(np.uint32)) & 1))
    return best


def scale_slots(s1: Any, s2: Any, s3: Any, i: int, k: Any) -> None:
    """What ``gap`` zero-gradient steps of a :class:`Decay` algorithm do at ``i``.

    ``k = (use1, use2, use3, factor)``: each flagged slot is multiplied by ``factor``
    (``base ** gap`` rounded to the array dtype).  Compiled by every backend, like a rule.
    """
    use1, use2, use3, factor = k
    if use1:
        s1[i] = s1[i] * factor
    if use2:
        s2[i] = s2[i] * factor
    if use3:
        s3[i] = s3[i] * factor


def decay_factor(base: float, gap: int) -> float:
    """``base ** gap`` in float64: the factor of :func:`scale_slots` after ``gap`` steps."""
    return base ** (gap * 1.0)


# =========================================================================== hyper-parameters

def short_repr(value: Any) -> str:
    """``repr(value)``, with integers of more than 20 digits written as ``10**k``-ish."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(int(value)) >= 10 ** 20:
        return f"{'-' if value < 0 else ''}~10**{len(str(abs(int(value)))) - 1}"
    return repr(value)


def check_number(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None,
                 low_inclusive: bool = True, high_inclusive: bool = False) -> None:
    """Raise unless ``value`` is a real number (not a bool, not NaN) within the bounds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        x = float(value)
    except OverflowError:
        raise ValueError(f"invalid {name}: {short_repr(value)} does not fit in a float64; "
                         f"pass a number below 1.8e308") from None
    if math.isnan(x):
        raise ValueError(f"{name} must not be NaN")
    if low is not None and (x < low or (x == low and not low_inclusive)):
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"invalid {name}: {value!r}; it must be {op} {low}")
    if high is not None and (x > high or (x == high and not high_inclusive)):
        op = "<=" if high_inclusive else "<"
        raise ValueError(f"invalid {name}: {value!r}; it must be {op} {high}")


def nonneg(name: str, value: Any) -> None:
    """A real number >= 0."""
    check_number(name, value, 0.0)


def positive(name: str, value: Any) -> None:
    """A real number > 0."""
    check_number(name, value, 0.0, low_inclusive=False)


def below_one(name: str, value: Any) -> None:
    """A real number in [0, 1)."""
    check_number(name, value, 0.0, 1.0)


def unit_interval(name: str, value: Any) -> None:
    """A real number in [0, 1]."""
    check_number(name, value, 0.0, 1.0, high_inclusive=True)


def flag(name: str, value: Any) -> None:
    """A boolean: ``True``/``False`` or a numpy bool (not an array, not 0/1)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def one_of(*choices: str) -> Callable[[str, Any], None]:
    """A check: one of the strings ``choices``."""
    def check(name: str, value: Any) -> None:
        if not (type(value) is str and value in choices):
            raise ValueError(f"{name} must be one of {choices}, got {short_repr(value)}")
    return check


def betas(name: str, value: Any) -> None:
    """A pair ``(beta1, beta2)``, each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    for j, b in enumerate(value):
        check_number(f"beta{j + 1} ({name}[{j}])", b, 0.0, 1.0)


@dataclass(frozen=True)
class Hyper:
    """One hyper-parameter of an algorithm (a param-group entry).

    Attributes
    ----------
    name : str
        torch's name.
    default : object
        torch's default.
    check : callable
        ``check(name, value)`` raises TypeError/ValueError naming the argument.
    doc : str
        One line for the docstring: ``"float, default 1e-3"`` is generated; this is the
        explanation that follows it (may be empty).
    kind : str
        The type shown in the docstring (``"float"``, ``"bool"``, ``"(float, float)"``).
    keyword_only : bool
        Keyword-only in the class signature (torch's ``*,`` marker).
    functional : bool
        Whether the :mod:`fastadapt.functional` function takes it (not when it only sets up
        state, as Adagrad's ``initial_accumulator_value``).
    """

    name: str
    default: Any
    check: Callable[[str, Any], None]
    doc: str = ""
    kind: str = "float"
    keyword_only: bool = False
    functional: bool = True


def _all_slots(h: Mapping[str, Any]) -> Optional[Tuple[str, ...]]:
    return None


def _zero_fill(h: Mapping[str, Any], name: str) -> float:
    return 0.0


def _always_fused(h: Mapping[str, Any]) -> ExactPlan:
    return FUSED


def _no_check(h: Mapping[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class Algorithm:
    """The declaration of one optimizer (see the module docstring).

    Attributes
    ----------
    name : str
        The public class name (torch's: ``"Adam"``).
    summary : str
        The class docstring's opening paragraphs.
    rule : callable
        ``rule(p, s1, s2, s3, i, g, k)``.
    scalars : callable
        ``scalars(dtype, step, h, carry) -> NamedTuple``: ``step`` is the parameter's count
        after this step (1 on the first), ``h`` the param group, ``carry`` the parameter's
        carried scalars after this step (empty unless :attr:`carry` is declared).
    slots : (str or None, str or None, str or None)
        State buffer names in the rule's slot order.
    hypers : tuple of Hyper
        In torch's signature order.
    buffers : callable
        ``buffers(h)`` -> the slot names the group's options use (None: every named slot).
    fill : callable
        ``fill(h, name)`` -> the initial value of buffer ``name``.
    exact : callable
        ``exact(h)`` -> :data:`LAZY`, :data:`FUSED` or a :class:`Decay`: how
        ``sparse_mode="exact"`` runs for these hyper-parameters.
    validate : callable
        ``validate(h)``: checks across hyper-parameters (each one is checked on its own first).
    eager_state : bool
        State created when a parameter is added (torch's Adagrad) instead of at its first step.
    accepts_dense : bool
        False for SparseAdam (dense gradients refused, as torch does).
    sparse_mode : bool
        Whether the ``sparse_mode`` option exists (SparseAdam is always lazy).
    fixed : mapping
        Group entries a variant pins (AdamW: ``decoupled_weight_decay=True``).
    carry : tuple of (str, float)
        Per-parameter scalars kept in the state besides the step (NAdam's ``mu_product``),
        with their initial values; :attr:`advance` updates them once per step.
    advance : callable or None
        ``advance(step, h, carry) -> dict``: the carried scalars after this step.
    functional : str
        The name of the :mod:`fastadapt.functional` function (``""``: none).
    functional_args : mapping
        Buffer name -> argument name of the functional function, where they differ
        (torch's functional Adagrad calls ``sum`` ``state_sum``).
    parent : str or None
        The algorithm this one is a variant of (the generated class subclasses its class).
    signed : (bool, bool, bool)
        Whether each slot's values may be negative.  ``state_dtype="int8"`` stores a slot
        that never is (second moments, Adagrad's sum) with the unsigned dynamic map, which has
        twice the resolution of the signed one.
    rows : bool
        A *row rule* (row-wise Adagrad): ``rule(p, s1, s2, s3, r, g, width, k)`` updates row
        ``r`` of the parameter's row view: ``p`` and ``g`` are that row and its gradient (1-D
        views of ``n`` elements), ``width`` is ``n`` as a number of the parameter's dtype, and
        each state slot holds one value per row (``s1[r]``), so the state of an
        ``(nrows, ncols)`` table is ``(nrows,)``.  The row view is the sparse one: ``(shape[0], prod(shape[1:]))``, and a
        1-D parameter's elements are its rows.  Exact sparse mode is :data:`LAZY` or
        :data:`FUSED` (no :class:`Decay`), and the state is never compressed (it is already
        ``ncols`` times smaller than the parameter).
    """

    name: str
    summary: str
    rule: Rule
    scalars: Callable[..., NamedTuple]
    slots: Tuple[Optional[str], Optional[str], Optional[str]]
    hypers: Tuple[Hyper, ...]
    buffers: Callable[[Mapping[str, Any]], Optional[Tuple[str, ...]]] = _all_slots
    fill: Callable[[Mapping[str, Any], str], float] = _zero_fill
    exact: Callable[[Mapping[str, Any]], ExactPlan] = _always_fused
    validate: Callable[[Mapping[str, Any]], None] = _no_check
    eager_state: bool = False
    accepts_dense: bool = True
    sparse_mode: bool = True
    fixed: Mapping[str, Any] = field(default_factory=dict)
    carry: Tuple[Tuple[str, float], ...] = ()
    advance: Optional[Callable[..., dict]] = None
    functional: str = ""
    functional_args: Mapping[str, str] = field(default_factory=dict)
    parent: Optional[str] = None
    signed: Tuple[bool, bool, bool] = (True, True, True)
    rows: bool = False

    def __post_init__(self) -> None:
        if len(self.slots) != 3:
            raise ValueError(f"{self.name}: slots must name the rule's three slots (None for unused)")

    def state_shape(self, shape: Tuple[int, ...]) -> Tuple[int, ...]:
        """The shape of each state buffer of a parameter of ``shape``: ``shape`` itself, or for a
        row rule one value per row, ``(shape[0],)`` (a 0-d parameter is one row: ``()``)."""
        shape = tuple(shape)
        return shape[:1] if self.rows else shape

    # -- derived ---------------------------------------------------------------

    @property
    def defaults(self) -> dict:
        """The param-group defaults: every hyper-parameter, ``sparse_mode`` and the pinned entries."""
        d = {h.name: h.default for h in self.hypers}
        d.update(self.fixed)
        if self.sparse_mode:
            d["sparse_mode"] = "lazy"
        d.update(STATE_OPTIONS)
        return d

    def used_buffers(self, h: Mapping[str, Any]) -> Tuple[str, ...]:
        """The buffer names group ``h`` uses, in slot order."""
        named = tuple(s for s in self.slots if s is not None)
        chosen = self.buffers(h)
        return named if chosen is None else tuple(s for s in named if s in chosen)

    def check_group(self, h: Mapping[str, Any]) -> None:
        """Validate every hyper-parameter of group ``h`` (raises naming the argument)."""
        for hp in self.hypers:
            hp.check(hp.name, h[hp.name])
        for name, value in self.fixed.items():
            got = h.get(name, value)
            if not (type(got) is type(value) and got == value):
                hint = f"; use {self.parent} for {name}={got!r}" if self.parent else ""
                raise ValueError(f"{self.name} always has {name}={value!r}, got {got!r}{hint}")
        if self.sparse_mode:
            mode = h.get("sparse_mode", "lazy")
            if mode not in ("lazy", "exact"):
                raise ValueError(f"sparse_mode must be one of ('lazy', 'exact'), got {mode!r}")
        check_state_options(h)
        if self.rows and h.get("state_dtype") not in (None, "float32"):
            raise ValueError(f"{self.name} keeps one state value per row, already 1/ncols of the table; "
                             f"state_dtype={h.get('state_dtype')!r} is not available for it: use state_dtype=None")
        self.validate(h)
        if self.rows and isinstance(self.exact(h), Decay):     # (a declaration error, caught before any write)
            raise TypeError(f"{self.name}: a row rule's exact plan must be LAZY or FUSED, not a Decay")

    def variant(self, **changes: Any) -> "Algorithm":
        """A copy with ``changes`` (AdamW is Adam with other defaults and a pinned entry)."""
        return dataclasses.replace(self, **changes)
