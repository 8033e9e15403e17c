"""Metric names, parameters and values in the forms MLflow and every backend store accept (pure
functions; no MLflow import), and where the store is (``resolve_tracking_uri``)."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# MLflow's limits (mlflow.utils.validation); copied so importing this module stays cheap.
MAX_NAME_LENGTH = 250  # MAX_ENTITY_KEY_LENGTH
MAX_PARAM_VALUE_LENGTH = 6000  # MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE_LENGTH = 8000  # MAX_TAG_VAL_LENGTH
MAX_PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
MAX_METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_TRUNCATION_MARKER = "...[truncated {n} chars]"

_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")
_DOT_RUN = re.compile(r"[_.]*\.[_.]*")
_UNDERSCORE_RUN = re.compile(r"_{2,}")


# --------------------------------------------------------------------------------------------
# Names and parameters
# --------------------------------------------------------------------------------------------


def sanitize_metric_name(name: Any) -> str:
    """Map any name to one that MLflow accepts on every OS and backend store.

    Rules (deterministic; idempotent: ``f(f(x)) == f(x)``):

    1. ``/`` becomes ``.``: MLflow allows ``/`` but it makes file-store paths and some UIs and
       exporters treat names as nested; ``.`` keeps the hierarchy readable and the name flat.
    2. Every character other than ASCII letters, digits, ``_``, ``.`` and ``-`` becomes ``_``.
       That includes space and ``:`` (MLflow allows them, but ``:`` is rejected on Windows and
       both are awkward in exports) and non-ASCII letters.
    3. A run of separators that contains a ``.`` collapses to one ``.``; a run of ``_`` to one
       ``_``; leading and trailing ``.``/``_`` are stripped (so no name starts with ``..``, which
       MLflow rejects).
    4. Never empty (``"unnamed"``); longer than 250 characters: cut, plus a short hash of the
       original name so that distinct long names stay distinct.

    Examples: ``loss(pg)@k/1`` -> ``loss_pg_k.1``; ``reward/mean`` -> ``reward.mean``.
    """
    raw = str(name)
    s = raw.replace("/", ".")
    s = _BAD_CHARS.sub("_", s)
    s = _DOT_RUN.sub(".", s)
    s = _UNDERSCORE_RUN.sub("_", s)
    s = s.strip("._")
    if not s:
        s = "unnamed"
    if len(s) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(raw.encode("utf-8")).hexdigest()[:8]
        s = s[: MAX_NAME_LENGTH - 9].rstrip("._") + "_" + digest
    return s


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    # The marker names how many characters were cut, and its own length depends on that number.
    keep = limit - len(_TRUNCATION_MARKER.format(n=len(value)))
    while keep + 1 + len(_TRUNCATION_MARKER.format(n=len(value) - keep - 1)) <= limit:
        keep += 1
    return value[:keep] + _TRUNCATION_MARKER.format(n=len(value) - keep)


def _stringify(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return repr(value)  # "1.0", not "1": keeps the type visible
    return str(value)


def flatten_config(
    obj: Any, prefix: str = "", max_value_length: int = MAX_PARAM_VALUE_LENGTH
) -> dict[str, str]:
    """Flatten a config into ``{"algo.clip_eps_low": "0.1", ...}`` for MLflow params.

    Accepts dataclasses (instances), mappings, lists/tuples (elements keyed by index:
    ``reward.functions.0.name``), OmegaConf containers and plain values, nested in any way.
    Values are stringified (``None`` -> ``"None"``; an empty list/dict -> ``"[]"``/``"{}"`` so
    that the key is still recorded) and cut to MLflow's parameter value limit (6000 characters)
    with a ``...[truncated N chars]`` marker. Keys are not sanitized here (the tracker does it
    when logging) so the result mirrors the config's own names.
    """
    out: dict[str, str] = {}

    def key(k: Any) -> str:
        return f"{prefix}.{k}" if prefix else str(k)

    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf  # lazy: only when given an OmegaConf container

        obj = OmegaConf.to_container(obj, resolve=True)

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items: Iterable[tuple[Any, Any]] = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
        empty = "{}"
    elif isinstance(obj, Mapping):
        items = obj.items()
        empty = "{}"
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
        empty = "[]"
    else:
        return {prefix or "value": _truncate(_stringify(obj), max_value_length)}

    any_item = False
    for k, v in items:
        any_item = True
        out.update(flatten_config(v, key(k), max_value_length))
    if not any_item and prefix:
        out[prefix] = empty
    return out


def resolve_tracking_uri(cfg_uri: str | None = None) -> str:
    """``cfg_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs cwd>/mlflow.db``."""
    if cfg_uri:
        return cfg_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str((Path.cwd() / "mlflow.db").resolve())


def resolve_artifact_location(tracking_uri: str, cfg_location: str | None = None) -> str | None:
    """Artifact location for a newly created experiment (None: let the server decide).

    A plain path becomes an absolute ``file://`` URI; a value with a scheme (``s3://``,
    ``file://``, ``mlflow-artifacts:``) is used as it is. For sqlite stores without a configured
    location: ``<cwd>/mlartifacts``.
    """
    if cfg_location:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", cfg_location) and not re.match(
            r"^[A-Za-z]:[\\/]", cfg_location
        ):
            return cfg_location
        return Path(cfg_location).expanduser().resolve().as_uri()
    if tracking_uri.startswith("sqlite:"):
        return (Path.cwd() / "mlartifacts").resolve().as_uri()
    return None


def _to_float(value: Any) -> float | None:
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # a tensor with more than one element
            return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _jsonable(obj: Any) -> Any:
    """Make dataclasses, paths, tuples, numpy/torch scalars JSON-serializable."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, enum.Enum):
        return _jsonable(obj.value)
    f = _to_float(obj)
    if f is not None:
        return f
    return str(obj)
