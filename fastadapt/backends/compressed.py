"""Compressed state buffers: what a state slot holds under ``state_dtype="bfloat16"`` or ``"int8"``.

A :class:`CompressedBuffer` stands where a float32 state array would: ``opt.state[j]["exp_avg"]``.
It holds the codes (``uint16`` bfloat16 bits, or ``uint8`` codes of the dynamic map) in the
parameter's shape, and for int8 one float32 absmax per block.  ``np.asarray(buf)`` (or
:meth:`CompressedBuffer.decode`) gives the float32 values; the loops decode and encode blocks
in place (:mod:`fastadapt.backends.cpu_codec`).

Block layout (int8)
    A parameter is seen as rows (``shape[0]`` rows of ``prod(shape[1:])`` elements; a 1-D
    parameter is one row).  Rows of 32 to 256 elements are one block each; longer rows are cut
    into blocks of 256 when their length is a multiple of 256, else are one block each; 1-D
    parameters and rows shorter than 32 elements use blocks of 256 consecutive elements (which
    then span rows).  So for tables with rows of 32 elements or more, every block lies in one
    row, and a sparse step that updates some rows never changes the decoded state of another.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from .codec import BLOCK, bf16_decode, bf16_encode, q8_blocks, q8_decode, q8_encode

__all__ = ["CompressedBuffer", "int8_block", "KINDS"]

#: the compressed kinds and their code dtypes
KINDS = {"bfloat16": np.dtype(np.uint16), "int8": np.dtype(np.uint8)}

#: rows shorter than this are packed into blocks of BLOCK elements that span rows
MIN_ROW_BLOCK = 32


def int8_block(shape: Tuple[int, ...]) -> int:
    """The int8 block length of a parameter of ``shape`` (see the module docstring)."""
    if len(shape) < 2:
        return BLOCK
    row = int(np.prod(shape[1:], dtype=np.int64))
    if row < MIN_ROW_BLOCK:
        return BLOCK
    if row <= BLOCK or row % BLOCK:
        return row
    return BLOCK


def row_aligned(shape: Tuple[int, ...], block: int) -> bool:
    """Whether every block of a parameter of ``shape`` lies within one row (sparse steps need it)."""
    if len(shape) < 2:
        return False
    row = int(np.prod(shape[1:], dtype=np.int64))
    return row % block == 0


class CompressedBuffer:
    """One compressed state buffer of a float32 parameter.

    Attributes
    ----------
    kind : {"bfloat16", "int8"}
    codes : ndarray
        ``uint16`` (bfloat16 bits) or ``uint8`` (dynamic-map codes), the parameter's shape.
    absmax : ndarray of float32
        int8: one scale per block (``ceil(size / block)``); bfloat16: one unused element.
    signed : bool
        int8: the signed dynamic map (values may be negative) or the unsigned one.
    block : int
        int8: elements per block; bfloat16: 1.
    seed : int
        Key of stochastic rounding (the parameter's position in its optimizer).
    """

    __slots__ = ("kind", "codes", "absmax", "signed", "block", "seed", "flat_codes", "flat_absmax")

    #: what the optimizers test for (a device implementation sets it too)
    compressed_state = True

    def __init__(self, kind: str, codes: np.ndarray, absmax: np.ndarray, signed: bool, block: int,
                 seed: int = 0) -> None:
        self.kind = kind
        self.codes = codes
        self.absmax = absmax
        self.signed = bool(signed)
        self.block = int(block)
        self.seed = int(seed)
        self.flat_codes = codes.reshape(-1)
        self.flat_absmax = absmax.reshape(-1)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def full(cls, shape: Tuple[int, ...], value: float, kind: str, signed: bool, seed: int = 0) -> "CompressedBuffer":
        """A buffer of ``shape`` whose every value decodes to ``value`` rounded (to nearest): what
        :meth:`encode` gives for ``np.full(shape, value)``, without that float32 temporary."""
        one = np.full(1, value, np.float32)
        if kind == "bfloat16":
            code = bf16_encode(one, nearest=True)[0]
            return cls(kind, np.full(shape, code, np.uint16), np.zeros(1, np.float32), signed, 1, seed)
        if kind == "int8":
            block = int8_block(tuple(shape))
            signed = signed or value < 0
            code, absmax = q8_encode(one, signed=signed, block=1)      # every block is [value, value, ...]
            n = int(np.prod(shape, dtype=np.int64))
            return cls(kind, np.full(shape, code[0], np.uint8), np.full(q8_blocks(n, block), absmax[0], np.float32),
                       signed, block, seed)
        raise ValueError(f"unknown compressed state kind {kind!r}")

    @classmethod
    def encode(cls, x: Any, kind: str, signed: bool, seed: int = 0) -> "CompressedBuffer":
        """Compress float values ``x`` (rounded to nearest: conversions are deterministic)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if kind == "bfloat16":
            return cls(kind, bf16_encode(x, nearest=True), np.zeros(1, np.float32), signed, 1, seed)
        if kind == "int8":
            block = int8_block(x.shape)
            if not signed and x.size and np.any(x < 0):
                signed = True                        # (values below 0 need the signed map)
            codes, absmax = q8_encode(x.reshape(-1), signed=signed, block=block)
            return cls(kind, codes.reshape(x.shape), absmax, signed, block, seed)
        raise ValueError(f"unknown compressed state kind {kind!r}")

    # -- reading ----------------------------------------------------------------------------

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def size(self) -> int:
        return int(self.codes.size)

    #: the dtype of the decoded values
    dtype = np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, plus the scales for int8."""
        return int(self.codes.nbytes + (self.absmax.nbytes if self.kind == "int8" else 0))

    def decode(self) -> np.ndarray:
        """The float32 values (a new array of the parameter's shape)."""
        if self.kind == "bfloat16":
            return bf16_decode(self.codes)
        return q8_decode(self.flat_codes, self.flat_absmax, signed=self.signed, block=self.block).reshape(self.shape)

    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> np.ndarray:
        out = self.decode()
        return out if dtype is None else out.astype(dtype)

    def copy(self) -> "CompressedBuffer":
        return CompressedBuffer(self.kind, self.codes.copy(), self.absmax.copy(), self.signed, self.block, self.seed)

    def __repr__(self) -> str:
        return (f"CompressedBuffer({self.kind}, shape={self.shape}, {self.nbytes} bytes"
                + (f", block={self.block}, {'signed' if self.signed else 'unsigned'}" if self.kind == "int8" else "")
                + ")")

    # -- state_dict -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The compact form a state_dict holds: copies of the codes (and scales), plain values."""
        out = {"state_dtype": self.kind, "codes": self.codes.copy()}
        if self.kind == "int8":
            out.update(absmax=self.absmax.copy(), signed=self.signed, block=self.block)
        return out

    @classmethod
    def from_dict(cls, d: Any, shape: Tuple[int, ...], seed: int, where: str) -> "CompressedBuffer":
        """Check a :meth:`to_dict` entry against a parameter of ``shape``; raise ValueError naming
        what is wrong (nothing is kept from ``d``: the arrays are copied)."""
        kind = d.get("state_dtype")
        if kind not in KINDS:
            raise ValueError(f"{where}: a compressed entry needs 'state_dtype' 'bfloat16' or 'int8', got {kind!r}")
        want = {"bfloat16": {"state_dtype", "codes"},
                "int8": {"state_dtype", "codes", "absmax", "signed", "block"}}[kind]
        if set(d) != want:
            raise ValueError(f"{where}: a {kind} entry has the keys {sorted(want)}, got {sorted(d)}")
        codes = np.asarray(d["codes"])
        if codes.dtype != KINDS[kind] or codes.shape != tuple(shape):
            raise ValueError(f"{where}: {kind} codes must be {KINDS[kind]} of shape {tuple(shape)}, got "
                             f"{codes.dtype} {codes.shape}")
        if kind == "bfloat16":
            return cls(kind, np.array(codes, copy=True, order="C"), np.zeros(1, np.float32), True, 1, seed)
        block, signed = d["block"], d["signed"]
        if block != int8_block(tuple(shape)) or type(signed) not in (bool, np.bool_):
            raise ValueError(f"{where}: int8 block must be {int8_block(tuple(shape))} for shape {tuple(shape)} and "
                             f"signed a bool, got block={block!r}, signed={signed!r}")
        absmax = np.asarray(d["absmax"])
        nblocks = q8_blocks(int(np.prod(shape, dtype=np.int64)), block)
        if absmax.dtype != np.float32 or absmax.shape != (nblocks,):
            raise ValueError(f"{where}: int8 absmax must be float32 of shape ({nblocks},), got "
                             f"{absmax.dtype} {absmax.shape}")
        return cls(kind, np.array(codes, copy=True, order="C"), np.array(absmax, copy=True), bool(signed),
                   int(block), seed)
