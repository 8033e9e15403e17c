"""Who a checkpoint belongs to (comparing the model fingerprint it was saved with, which
``fastgrpo.models.model_fingerprint`` computes, to the current one) and what its state may hold
(values that ``torch.load(weights_only=True)`` accepts)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from fastgrpo.checkpoint.manifest import CheckpointError


def _json_normalize(obj: Any) -> Any:
    """What a value looks like after a JSON round trip (tuples -> lists, keys -> str)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


# --------------------------------------------------------------------------------------------
# weights_only safety
# --------------------------------------------------------------------------------------------

_SAFE_LEAVES = (int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device, torch.Size)


def check_weights_only_safe(obj: Any, where: str = "state") -> None:
    """Raise :class:`CheckpointError` naming the first value ``torch.load(weights_only=True)`` would refuse.

    Allowed: tensors, ints, floats, bools, str, bytes, None, dtypes, devices, sizes, and
    dicts/lists/tuples/sets of those. Not allowed (examples): numpy arrays and numpy scalars
    (use ``torch.as_tensor`` / ``.item()``), arbitrary objects, functions, ``range``.
    """
    if isinstance(obj, torch.Tensor):
        return
    # numpy scalars subclass float/int (np.float64) yet are refused by weights_only: test first.
    if isinstance(obj, _SAFE_LEAVES) and type(obj).__module__ != "numpy":
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise CheckpointError(
                    f"{where} has a key of type {type(k).__name__} ({k!r}): not loadable "
                    "with torch.load(weights_only=True)"
                )
            check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            check_weights_only_safe(v, f"{where}[{i}]")
        return
    hint = " (numpy: convert with torch.as_tensor(...) or .item())" if type(obj).__module__ == "numpy" else ""
    raise CheckpointError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which torch.load(weights_only=True) "
        f"refuses{hint}; store tensors and plain Python values only"
    )


def fingerprint_diff(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint value, expected value)}`` for every key that differs (missing: ``"<missing>"``)."""
    a, b = _json_normalize(dict(saved)), _json_normalize(dict(expected))
    out = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if va != vb:
            out[k] = (va, vb)
    return out
