"""Public optimizer classes, generated from the algorithms' declarations.

:func:`optimizer_class` turns an :class:`~fastadapt.algorithms.Algorithm` into a subclass
of :class:`~fastadapt.optim.base.Optimizer` whose constructor has torch's signature (the
algorithm's hyper-parameters in order, keyword-only where torch's are, then fastadapt's
``sparse_mode`` and ``nonfinite``), whose validation is the algorithm's checks, and whose
docstring lists every parameter.  Nothing about an optimizer is written here.
"""

import inspect
from typing import Any, Type

from ..algorithms import Algorithm
from .base import Optimizer

__all__ = ["optimizer_class"]

_P = inspect.Parameter


def _fmt(value: Any) -> str:
    return repr(value) if not isinstance(value, float) else f"{value:g}"


def _docstring(alg: Algorithm) -> str:
    lines = [inspect.cleandoc(alg.summary), "", "Parameters", "----------",
             "params : iterable of arrays or of dicts",
             "    The arrays to optimise (C-contiguous, writeable float32/float64 numpy arrays, or",
             "    CUDA arrays), or param groups: dicts with a ``\"params\"`` list and any",
             "    hyper-parameter overriding the defaults for that group."]
    for h in alg.hypers:
        lines.append(f"{h.name} : {h.kind}, default {_fmt(h.default)}")
        if h.doc:
            lines.append(f"    {h.doc[0].upper()}{h.doc[1:]}.")
    if alg.sparse_mode:
        lines += ['sparse_mode : {"lazy", "exact"}, default "lazy"',
                  "    How a sparse gradient (scipy CSR, :class:`fastadapt.RowGrad`) is applied: only the",
                  "    touched entries change (lazy), or exactly the dense step on the densified",
                  "    gradient (see the docs, \"Sparse gradients\")."]
    lines += ['state_dtype : {None, "float32", "bfloat16", "int8"}, default None',
              "    How the state buffers are stored: None, in the parameter's dtype; for float32",
              '    parameters of at least ``config.STATE_COMPRESS_MIN`` elements, ``"bfloat16"`` (2 bytes',
              '    per value) or ``"int8"`` (8-bit blockwise: 1 byte per value plus a float32 scale per',
              "    block).  The update is the same; the state is decoded before it and encoded after",
              '    (see the docs, "Memory").  Sparse gradients work with both; with ``"int8"`` they need',
              "    rows of 32 elements or more (a 1-D parameter, or narrower rows, has blocks that span",
              '    rows: its sparse gradients are refused; use ``"bfloat16"`` for it).',
              'state_rounding : {"stochastic", "nearest"}, default "stochastic"',
              "    How bfloat16 state is rounded: stochastically (unbiased; reproducible, the random bits",
              "    are a hash of the parameter, the step and the element) or to nearest (updates below",
              "    half a bfloat16 ulp are then lost)."]
    lines += ['nonfinite : {"propagate", "skip", "raise"}, default "propagate"',
              "    A step whose gradients hold NaN or infinity is applied (torch's behaviour), skipped",
              "    (nothing changes and :meth:`step` returns False) or refused (FloatingPointError)."]
    state = ", ".join(f"``{s}``" for s in alg.slots if s is not None)
    lines += ["", "Notes", "-----",
              f"State per parameter: ``step`` (int){', ' if state else ''}{state}"
              + "".join(f", ``{n}``" for n, _ in alg.carry)
              + "; see :meth:`state_dict`.  The update rule is written out in the docs,",
              f'"Specification", section "{alg.name}".']
    if not alg.accepts_dense:
        lines.append("Dense gradients are refused (as torch does).")
    return "\n".join(lines)


def optimizer_class(alg: Algorithm, base: Type[Optimizer] = Optimizer) -> Type[Optimizer]:
    """The public optimizer class of algorithm ``alg``.

    Parameters
    ----------
    alg : Algorithm
    base : type
        The class to subclass: :class:`Optimizer`, or the class of ``alg.parent``
        (AdamW subclasses Adam, as in torch).

    Returns
    -------
    type
        ``alg.name``, with ``algorithm = alg``.
    """
    params = [_P("self", _P.POSITIONAL_OR_KEYWORD), _P("params", _P.POSITIONAL_OR_KEYWORD)]
    for h in alg.hypers:
        kind = _P.KEYWORD_ONLY if h.keyword_only else _P.POSITIONAL_OR_KEYWORD
        params.append(_P(h.name, kind, default=h.default))
    if alg.sparse_mode:
        params.append(_P("sparse_mode", _P.KEYWORD_ONLY, default="lazy"))
    params.append(_P("state_dtype", _P.KEYWORD_ONLY, default=None))
    params.append(_P("state_rounding", _P.KEYWORD_ONLY, default="stochastic"))
    params.append(_P("nonfinite", _P.KEYWORD_ONLY, default="propagate"))
    signature = inspect.Signature(params)
    hyper_names = ([h.name for h in alg.hypers] + (["sparse_mode"] if alg.sparse_mode else [])
                   + ["state_dtype", "state_rounding"])

    def __init__(self: Optimizer, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{alg.name}(): {exc}") from None
        bound.apply_defaults()
        a = bound.arguments
        defaults = {name: a[name] for name in hyper_names}
        if isinstance(defaults.get("betas"), list):
            defaults["betas"] = tuple(defaults["betas"])
        defaults.update(alg.fixed)
        Optimizer.__init__(self, a["params"], defaults, nonfinite=a["nonfinite"])

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__doc__ = f"Build a {alg.name} optimizer (see the class docstring)."
    namespace = {
        "__init__": __init__,
        "__doc__": _docstring(alg),
        "__module__": "fastadapt",
        "__qualname__": alg.name,
        "algorithm": alg,
        "rule": staticmethod(alg.rule),
        "slots": alg.slots,
        "accepts_dense": alg.accepts_dense,
    }
    cls: Type[Optimizer] = type(alg.name, (base,), namespace)
    return cls


