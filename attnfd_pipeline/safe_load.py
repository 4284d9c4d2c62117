"""Reading torch files without running anything they contain.

Every ``.pt`` the pipeline reads (checkpoints, teacher bundles, imported teachers) goes through
:func:`load_torch_file`: the file's bytes are read once, hashed (and compared with a recorded SHA-256
when there is one) *before* anything is deserialised, then unpickled from those same bytes with
``torch.load(..., weights_only=True)``. The weights-only unpickler builds tensors, containers and plain
scalars only; a pickle that names any other Python callable (``os.system``, a class with a malicious
``__reduce__`` …) is refused with :class:`UnsafeFileError` before that callable is looked up.

The one allow-list: NumPy arrays and scalars of numeric dtypes. Checkpoints written before RNG states
were stored as tensors hold ``np.random.get_state()`` arrays, and the reference code's checkpoints
hold ``best_pred`` as a NumPy float; rebuilding a numeric array or scalar from its bytes runs no code
of the file's choosing. Object arrays are not allowed.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from attnfd_pipeline.errors import UserError

__all__ = ["SECURITY_DOC", "UnsafeFileError", "load_torch_file", "numpy_safe_globals", "read_sha256", "read_sha256s", "sidecar_path",
           "to_plain", "write_sha256"]

SECURITY_DOC = "docs/security.md"
_NUMERIC_DTYPES = ("BoolDType", "Int8DType", "UInt8DType", "Int16DType", "UInt16DType", "Int32DType",
                   "UInt32DType", "Int64DType", "UInt64DType", "LongDType", "ULongDType", "LongLongDType",
                   "ULongLongDType", "Float16DType", "Float32DType", "Float64DType")


class UnsafeFileError(UserError):
    """A file holds Python objects other than tensors and plain data: it was not deserialised."""


def numpy_safe_globals() -> list:
    """The NumPy constructors a weights-only load may use: numeric arrays and scalars, under NumPy 2's
    module names and the ``numpy.core`` names that NumPy 1 wrote into older pickles."""
    try:
        from numpy._core import multiarray as ma
    except ImportError:  # pragma: no cover - NumPy 1
        from numpy.core import multiarray as ma
    dtypes = [getattr(np.dtypes, n) for n in _NUMERIC_DTYPES if hasattr(np.dtypes, n)]
    return [ma._reconstruct, ma.scalar, np.ndarray, np.dtype, *dtypes,
            (ma._reconstruct, "numpy.core.multiarray._reconstruct"), (ma.scalar, "numpy.core.multiarray.scalar"),
            (ma._reconstruct, "numpy._core.multiarray._reconstruct"), (ma.scalar, "numpy._core.multiarray.scalar")]


def _unsafe_message(path: Path, what: str, err: BaseException) -> str:
    text = " ".join(str(err).split())
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        detail = f"it names the Python callable {named.group(1)}"
    else:  # e.g. "Can only build Tensor, … but got <class …>": torch's own sentence, without its advice
        detail = text.split("WeightsUnpickler error:", 1)[-1].split(" Check the documentation")[0].strip()[:300]
    return (f"{path}: refused to load this {what}: it holds Python objects that are not tensors or plain data "
            f"({detail}); attnfd loads every file with torch.load(weights_only=True) and never runs code from "
            f"a file. If you wrote this file yourself with another tool or an older attnfd, see "
            f"{SECURITY_DOC} (\"Converting an old or foreign file\") to re-save it as plain data")


def load_torch_file(path: str | Path, *, what: str = "file", expected_sha256: str | tuple[str, ...] | None = None,
                    sha_source: str | None = None) -> tuple[Any, str]:
    """``(object, sha256 of the file's bytes)``. ``expected_sha256``: refuse (``ValueError``) before
    deserialising when the bytes hash to something else (``sha_source`` names where it was recorded; a tuple:
    any of these hashes).
    A pickle that needs anything beyond tensors, plain data and numeric NumPy values raises
    :class:`UnsafeFileError`; a truncated or corrupt file raises ``ValueError``; both name ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    accepted = (expected_sha256,) if isinstance(expected_sha256, str) else expected_sha256
    if accepted is not None and sha not in accepted:
        where = f" recorded in {sha_source}" if sha_source else ""
        raise UserError(f"{path}: SHA-256 of the file is {sha[:16]}…, not the {accepted[0][:16]}…{where}: "
                         f"the {what} was modified, corrupted or replaced after it was written; nothing was loaded")
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e) or "Unsupported" in str(e):
            raise UnsafeFileError(_unsafe_message(path, what, e)) from None
        raise UserError(f"{path}: not a readable {what} (truncated or corrupt: {e})") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, wrong magic number, EOF … depend on torch internals
        raise UserError(f"{path}: not a readable {what} (truncated or corrupt: {' '.join(str(e).split())[:300]})") from None
    return obj, sha


def to_plain(obj: Any) -> Any:
    """``obj`` with NumPy arrays turned into tensors and NumPy scalars into Python numbers (recursively
    through dicts, lists and tuples), so that it loads under ``weights_only=True`` with no allow-list."""
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        try:
            return torch.from_numpy(np.ascontiguousarray(obj))
        except TypeError:  # a dtype torch has no tensor for
            return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_sha256(path: str | Path, sha: str, *also: str) -> Path:
    """``<file>.sha256`` in ``sha256sum`` format (``sha256sum -c`` checks it by hand). ``also``: further
    hashes the file may have while a new version is being committed (``engine.checkpoint.save_hashed``)."""
    from attnfd_pipeline.utils import atomic_write_text

    name = Path(path).name
    return atomic_write_text(sidecar_path(path), "".join(f"{h}  {name}\n" for h in dict.fromkeys((sha, *also))))


def read_sha256s(path: str | Path) -> tuple[str, ...] | None:
    """Every SHA-256 recorded in ``<file>.sha256`` — one, or two while a save is being committed (the new
    file's and the one it replaces) — None when there is none (a file written before hashes were recorded);
    a sidecar that is not a SHA-256 list raises ``ValueError`` naming it."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    lines = [line.split() for line in side.read_text(errors="replace").splitlines() if line.strip()]
    hashes = tuple(words[0] for words in lines if words)
    if not hashes or any(len(h) != 64 or any(c not in "0123456789abcdef" for c in h) for h in hashes):
        raise UserError(f"{side}: not a SHA-256 sidecar (expected '<64 hex digits>  {Path(path).name}')")
    return hashes


def read_sha256(path: str | Path) -> str | None:
    """The SHA-256 of the file's current version recorded in ``<file>.sha256`` (None without a sidecar)."""
    hashes = read_sha256s(path)
    return hashes[0] if hashes else None


def state_mismatch(own: dict[str, Any], state: dict[str, Any], *, skip=lambda key: False,
                   shown: int = 5, name=lambda key: key) -> list[str]:
    """What keeps ``state`` from loading into a module whose state dict is ``own``: one phrase per kind
    (``"2 missing keys: a, b"``, ``"1 unexpected keys: c"``, ``"1 mis-shaped keys: d (file (5,), expected
    (3,))"``), the first ``shown`` keys of each; empty when it fits. Keys for which ``skip`` is true are not
    compared (optional heads, BatchNorm counters). ``name`` shows a key as the reader should look for it
    (e.g. in the layout of the file it came from)."""
    missing = [name(k) for k in own if k not in state and not skip(k)]
    unexpected = [name(k) for k in state if k not in own and not skip(k)]
    shapes = [f"{name(k)} (file {tuple(state[k].shape)}, expected {tuple(own[k].shape)})" for k in own
              if k in state and not skip(k) and hasattr(state[k], "shape")
              and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for kind, keys in (("mis-shaped keys", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
        if keys:
            more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
            problems.append(f"{len(keys)} {kind}: {', '.join(keys[:shown])}{more}")
    return problems
