"""Every RNG a training step draws from, captured into and restored from a checkpoint's state
(in a form ``torch.load(weights_only=True)`` accepts)."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def capture_rng_state(extra_generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """Every RNG a training step draws from, in a form ``torch.load(weights_only=True)`` accepts.

    Python ``random`` (state tuple -> list of ints), numpy's global legacy RNG (keys -> int64
    tensor), torch CPU, torch CUDA (all devices, if CUDA is available) and named
    ``torch.Generator`` objects (e.g. the data sampler's, the rollout sampler's).
    """
    version, internal, gauss_next = random.getstate()
    bitgen, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    out: dict[str, Any] = {
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(bitgen),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
        "generators": {str(k): g.get_state() for k, g in (extra_generators or {}).items()},
    }
    return out


def restore_rng_state(
    d: Mapping[str, Any], extra_generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Inverse of :func:`capture_rng_state`. Named generators missing from ``d`` are left alone (warning)."""
    py = d.get("python")
    if py is not None:
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    npd = d.get("numpy")
    if npd is not None:
        keys = npd["keys"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state(
            (
                npd["bit_generator"],
                keys.astype(np.uint32),
                int(npd["pos"]),
                int(npd["has_gauss"]),
                float(npd["cached_gaussian"]),
            )
        )
    if d.get("torch") is not None:
        torch.set_rng_state(d["torch"].cpu())
    cuda = d.get("cuda")
    if cuda:
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            if len(cuda) != n:
                logger.warning(
                    "checkpoint has CUDA RNG states for %d devices, this process sees %d", len(cuda), n
                )
            for i, s in enumerate(cuda[:n]):
                torch.cuda.set_rng_state(s.cpu(), device=i)
        else:
            logger.info("checkpoint has CUDA RNG states but CUDA is not available: not restored")
    saved = d.get("generators") or {}
    for name, g in (extra_generators or {}).items():
        if name in saved:
            g.set_state(saved[name].cpu())
        else:
            logger.warning("no saved RNG state for generator %r: left as it is", name)
