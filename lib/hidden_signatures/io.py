"""Atomic, code-free artifact I/O: JSON, safetensors, config hashes and the cache root.

Every artifact is written to a temporary file in the same directory and renamed into
place, so an interrupted run never leaves a half-written file that a later run trusts.
Tensors only travel through safetensors; nothing here unpickles.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CACHE_ENV = "HIDDEN_SIGNATURES_CACHE"


class ArtifactError(RuntimeError):
    """A file on disk is missing, truncated or not what it claims to be."""


def cache_root() -> Path:
    """The cache directory: $HIDDEN_SIGNATURES_CACHE or ~/.cache/hidden-signatures."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hidden-signatures"
    return Path(root).expanduser()


@contextmanager
def file_lock(target: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `.<name>.lock` beside `target` (released on exit, or by the OS on a kill).

    Two processes building the same cached artifact: the second waits, then finds it done.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _clean(obj: Any, digits: int | None) -> Any:
    """Make `obj` JSON-ready: tensors to lists, non-finite floats to None, optional rounding."""
    if isinstance(obj, torch.Tensor):
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _clean(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, digits) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        return float(f"{obj:.{digits}g}") if digits else obj
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_json(obj: Any, digits: int | None = None) -> str:
    """Deterministic JSON text (sorted keys, fixed indent), floats to `digits` significant digits."""
    return json.dumps(_clean(obj, digits), indent=2, sort_keys=True) + "\n"


def write_json(path: str | os.PathLike, obj: Any, digits: int | None = None) -> None:
    """Write deterministic JSON atomically."""
    write_text(path, to_json(obj, digits))


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, naming the file when it is missing or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or foreign file raises ArtifactError."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: corrupt or not a safetensors file ({exc})") from None


def config_hash(obj: Any, length: int = 12) -> str:
    """A short stable hash of a JSON-able object, for cache keys."""
    text = json.dumps(_clean(obj, None), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer's state dict into (tensors for safetensors, JSON-able rest); no pickle."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      meta: dict) -> None:
    """Inverse of optimizer_tensors: load the flattened state back into `optimizer`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    _check_state_shapes(optimizer, state)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    _match_param_layouts(optimizer)


def _check_state_shapes(optimizer: torch.optim.Optimizer, state: dict[int, dict]) -> None:
    """Refuse, before loading any of it, state shaped unlike its parameter (saved for another layout
    or model): a fused optimizer would walk the two as flat memory of different sizes."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, values in state.items():
        for key, value in values.items():
            if torch.is_tensor(value) and value.dim() > 0 and (
                    pid >= len(params) or value.shape != params[pid].shape):
                shape = tuple(params[pid].shape) if pid < len(params) else "none"
                raise ArtifactError(f"optimizer state {pid}.{key} has shape {tuple(value.shape)}, its "
                                    f"parameter {shape}: saved for another layout or model")


def _match_param_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each restored state tensor its parameter's strides (safetensors loads them row-major).

    Fused optimizers walk a parameter, its gradient and its state as flat memory: a state tensor
    laid out unlike its parameter would be updated element-for-wrong-element."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
