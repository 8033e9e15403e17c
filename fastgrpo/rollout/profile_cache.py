"""The C_peak cache: one JSON per key (DESIGN.md 3), written atomically.

The key (:func:`cache_key`) is what the knee depends on: the model's shapes, dtype, device name,
torch version and parallel layout; :func:`model_info` (the model's name and attention kernel) is
recorded next to it for people, not matched. :mod:`fastgrpo.rollout.profile` measures the knee and
reads and writes this cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("fastgrpo.rollout.profile")

CACHE_FORMAT = 1
DEFAULT_CACHE_DIR = ".cache/fastgrpo/c_peak"


def device_name(device: str | torch.device) -> str:
    """A human-readable name of the hardware (the GPU model; the CPU model and thread count)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu:{cpu} ({torch.get_num_threads()} threads)"


def cache_key(
    model: Any,
    *,
    dtype: str | None = None,
    device: str | None = None,
    layout: str = "single",
) -> dict[str, Any]:
    """What the knee depends on: the shapes (not the weights, not the name: a fine-tune of a
    model shares its knee), dtype, device, torch version and parallel layout. The CLI and the
    trainer compute the same key for the same model on the same hardware."""
    from fastgrpo.models.loading import model_fingerprint

    p = next(model.parameters())
    config = getattr(model, "config", None)
    shape = dict(model_fingerprint(model))
    heads = shape.get("num_attention_heads")
    hidden = shape.get("hidden_size")
    shape["intermediate_size"] = getattr(config, "intermediate_size", None)
    shape["head_dim"] = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    return {
        "shape": shape,
        "dtype": dtype or str(p.dtype).removeprefix("torch."),
        "device": device or device_name(p.device),
        "torch": torch.__version__,
        "layout": layout,
    }


def model_info(model: Any, model_name: str | None = None) -> dict[str, Any]:
    """Recorded next to the key for people, not matched: the model's name and attention kernel."""
    config = getattr(model, "config", None)
    name = model_name or getattr(config, "name_or_path", "") or getattr(config, "model_type", "model")
    if os.path.isdir(str(name)):
        name = os.path.realpath(name)
    return {"model": str(name), "attn_implementation": str(getattr(config, "_attn_implementation", None))}


def cache_path(cache_dir: str | os.PathLike, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"c_peak-{digest}.json"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class CPeakProfile:
    c_peak: int
    key: dict[str, Any]
    path: Path
    png: Path | None
    cached: bool  # read from the cache (no measurement this time)
    saturated: bool
    peak_throughput_tok_s: float
    points: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # this caller's model name and attention


def _read_cache(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable C_peak cache %s (%s)", path, e)
        return None
    c = data.get("c_peak")
    if data.get("format") != CACHE_FORMAT or data.get("key") != key or not isinstance(c, int) or c < 1:
        logger.warning("ignoring C_peak cache %s: other format or key", path)
        return None
    return data
