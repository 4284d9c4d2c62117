"""Small side-effect helpers shared by every stage: atomic files, hashing, devices, seeding.

torch is imported on first use, so processes that only write files (the demo generator's workers) start quickly."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: the folder's entry survives a power loss as well as the file's bytes."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def write_temp(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Write a file's bytes with ``write(f)`` into a dot-prefixed temp file beside ``path`` and fsync it; the
    caller publishes it with :func:`publish` (or removes it). Split in two so a caller can commit something
    else (a checksum sidecar) between writing the bytes and making them visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def publish(tmp: str | Path, path: str | Path) -> Path:
    """Give the temp file normal permissions (mkstemp makes it 0600) and rename it into place, durably."""
    path = Path(path)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """The project's one durable writer: temp file in the same folder + fsync + rename (+ fsync of the folder),
    so a reader (or a crash) never sees a half-written file, and the file gets the umask's permissions."""
    return publish(write_temp(path, write), path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save through :func:`atomic_write`: a kill while saving never corrupts ``path``."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


@contextlib.contextmanager
def deferred_interrupts():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block has finished, so a write that
    commits several files together is completed, never cut between them; the interrupt is then raised as
    usual. Outside the main thread (where Python cannot install handlers) the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if not caught or previous is signal.SIG_IGN:
        return
    if callable(previous):  # Python's own handler raises KeyboardInterrupt; a caller's runs as it would have
        previous(signal.SIGINT, None)
        return
    raise KeyboardInterrupt


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks by ``hashlib.file_digest`` (never whole into memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Hash of a state dict's names, dtypes, shapes and bytes, independent of how it was saved."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}={t!r}".encode())
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def blake2b_hex(data: bytes, digest_size: int = 16) -> str:
    return hashlib.blake2b(data, digest_size=digest_size).hexdigest()


def resolve_device(spec: str = "auto") -> torch.device:
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG's state as tensors and plain Python values, so a checkpoint holding it loads with
    ``torch.load(weights_only=True)`` and no allow-list."""
    import torch

    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` (older checkpoints' raw tuples: ``engine.checkpoint.CHECKPOINT.migrate``)."""
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    npy = state["numpy"]
    np.random.set_state((npy["name"], np.asarray(npy["key"].numpy(), dtype=np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
