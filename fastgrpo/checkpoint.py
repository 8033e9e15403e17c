"""Atomic, complete, self-checking checkpoints, and RNG state capture that loads under ``weights_only``.

One checkpoint is one folder ``<dir>/step_<8 digits>/``::

    policy/             HF save_pretrained of the policy (safetensors) + its tokenizer
    trainer_state.pt    plain dict: tensors and Python values only (torch.load(weights_only=True))
    meta.json           {"step", "format_version", "model_fingerprint", "complete": true,
                         "files": [...], "file_sizes": {...}, ...}   <- written LAST

How a save stays crash-safe (DESIGN.md section 6: resume bugs):

1. Everything is written into ``<dir>/.tmp-step_X-<random>/``; every file is fsynced; meta.json
   (the completeness marker, listing every file and its size) is written last.
2. The folder is renamed to ``step_X`` (``os.rename`` is atomic on one file system). If a
   ``step_X`` already exists (a repeated save), it is first renamed aside to
   ``.old-step_X-<random>`` and deleted only after the new one is in place. A crash between the
   two renames leaves the aside copy, which :meth:`CheckpointManager.latest` still finds and the
   next save puts back or removes.
3. Only then are old checkpoints pruned to ``keep_last`` (never the one just written). Pruned
   folders are renamed to ``.tmp-delete-...`` before deletion, so a half-deleted folder is never
   mistaken for a checkpoint.
4. Stale ``.tmp-*`` folders from crashed saves are removed at the start of the next save.

Only one process may save into a folder (rank 0 for replicated state). Backends whose state is
sharded across ranks (ZeRO, Megatron) must gather it, or pass each rank's shard through
``state`` of a per-rank manager; this module does not coordinate ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
META_FILE = "meta.json"
STATE_FILE = "trainer_state.pt"
POLICY_DIR = "policy"
SHARDS_DIR = "shards"  # per-rank sharded state (ZeRO partitions), written by every rank

_STEP_RE = re.compile(r"^step_(\d+)$")
_ASIDE_RE = re.compile(r"^\.old-step_(\d+)-[0-9a-f]+$")
_TMP_PREFIX = ".tmp-"
_ASIDE_PREFIX = ".old-"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, unreadable or belongs to another model."""


def step_dirname(step: int) -> str:
    return f"step_{int(step):08d}"


# --------------------------------------------------------------------------------------------
# Small file-system helpers
# --------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (directory fsync is not possible on every OS: best effort)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _list_files(root: Path) -> dict[str, int]:
    """Relative POSIX paths of every file under ``root`` (except meta.json) -> size in bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in (META_FILE, META_FILE + ".part"):
            out[rel] = p.stat().st_size
    return out


def _remove_tree(path: Path) -> None:
    """Delete a folder so that a crash midway never leaves something that looks like a checkpoint."""
    if not path.exists():
        return
    doomed = path
    if not path.name.startswith(_TMP_PREFIX):
        doomed = path.parent / f"{_TMP_PREFIX}delete-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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


# --------------------------------------------------------------------------------------------
# Model fingerprint
# --------------------------------------------------------------------------------------------


def model_fingerprint(model: Any = None, tokenizer: Any = None, **extra: Any) -> dict:
    """A JSON-able identity of a model's architecture (not its weights, which change in training).

    Shapes come from ``ds_shape`` when DeepSpeed ZeRO-3 has partitioned a parameter. ``extra``
    (e.g. ``reference="tiny"``, ``draft="eagle-1layer"``) is merged in as given.
    """
    fp: dict[str, Any] = {}
    if model is not None:
        cfg = getattr(model, "config", None)
        fp["model_class"] = type(model).__name__
        if cfg is not None:
            for key in (
                "model_type",
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
            ):
                if getattr(cfg, key, None) is not None:
                    fp[key] = getattr(cfg, key)
        lines = []
        total = 0
        for name, p in model.named_parameters():
            shape = tuple(getattr(p, "ds_shape", p.shape))
            total += int(getattr(p, "ds_numel", p.numel()))
            lines.append(f"{name}:{list(shape)}")
        fp["num_parameters"] = total
        fp["param_shapes_sha1"] = hashlib.sha1("\n".join(sorted(lines)).encode()).hexdigest()
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        fp["tokenizer_vocab_size"] = len(vocab)
        digest = hashlib.sha1()
        for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
            digest.update(f"{idx}\t{tok}\n".encode("utf-8", "surrogatepass"))
        fp["tokenizer_vocab_sha1"] = digest.hexdigest()
    fp.update(extra)
    return _json_normalize(fp)


def fingerprint_diff(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint value, expected value)}`` for every key that differs (missing: ``"<missing>"``)."""
    a, b = _json_normalize(dict(saved)), _json_normalize(dict(expected))
    out = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if va != vb:
            out[k] = (va, vb)
    return out


# --------------------------------------------------------------------------------------------
# Reading and validating one checkpoint
# --------------------------------------------------------------------------------------------


def read_meta(path: str | Path) -> dict:
    """Validate that ``path`` is a complete checkpoint and return its meta.json.

    Raises :class:`CheckpointError` naming the problem: no such folder, no meta.json (a save that
    did not finish), unreadable meta.json, ``complete`` not true, unknown format version, or a
    listed file that is missing or has the wrong size (truncated copy).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} is not a folder")
    meta_path = p / META_FILE
    if not meta_path.is_file():
        subs = sorted(d.name for d in p.iterdir() if d.is_dir() and _STEP_RE.match(d.name))
        if subs:
            raise CheckpointError(
                f"{p} is a checkpoint directory, not a checkpoint: pass one of its step folders "
                f"(newest: {p / subs[-1]}) or resume=auto"
            )
        raise CheckpointError(
            f"checkpoint {p} is incomplete: {META_FILE} is missing (the save did not finish)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {p} is incomplete: {META_FILE} is unreadable ({e})") from e
    if not isinstance(meta, dict) or meta.get("complete") is not True:
        raise CheckpointError(f"checkpoint {p} is incomplete: {META_FILE} does not say complete=true")
    version = meta.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(
            f"checkpoint {p} has format_version {version!r}; this fastgrpo reads {SUPPORTED_FORMAT_VERSIONS}"
        )
    sizes = meta.get("file_sizes") or {}
    for rel in meta.get("files", []):
        f = p / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {p} is incomplete: missing file {rel}")
        if rel in sizes and f.stat().st_size != sizes[rel]:
            raise CheckpointError(
                f"checkpoint {p} is incomplete: file {rel} has {f.stat().st_size} bytes, "
                f"{sizes[rel]} were written (truncated or modified copy)"
            )
    return meta


def load_checkpoint(path: str | Path, expected_fingerprint: Mapping[str, Any] | None) -> dict:
    """Validate ``path``, check the model fingerprint, and return the trainer state (on CPU)."""
    p = Path(path)
    meta = read_meta(p)
    if expected_fingerprint is not None:
        diff = fingerprint_diff(meta.get("model_fingerprint") or {}, expected_fingerprint)
        if diff:
            detail = "; ".join(f"{k}: checkpoint={a!r}, current={b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"checkpoint {p} is from another model: {detail}")
    try:
        state = torch.load(p / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {p}: cannot load {STATE_FILE} with weights_only=True: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {p}: {STATE_FILE} holds a {type(state).__name__}, not a dict")
    return state


# --------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves, finds, validates, loads and prunes checkpoints in one folder.

    ``keep_last``: how many complete checkpoints to keep (the newest by step, plus always the one
    just written); ``keep_last <= 0`` keeps all.
    """

    def __init__(self, dir: str | Path, keep_last: int = 2):
        self.dir = Path(dir)
        self.keep_last = int(keep_last)

    # ---- discovery -------------------------------------------------------------------------

    def _candidates(self) -> list[tuple[int, Path]]:
        """(step, folder) for every step_* folder, plus aside copies whose step_* is missing."""
        if not self.dir.is_dir():
            return []
        finals: dict[int, Path] = {}
        asides: dict[int, Path] = {}
        for d in self.dir.iterdir():
            if not d.is_dir():
                continue
            m = _STEP_RE.match(d.name)
            if m:
                finals[int(m.group(1))] = d
                continue
            m = _ASIDE_RE.match(d.name)
            if m:
                asides.setdefault(int(m.group(1)), d)
        for step, d in asides.items():
            finals.setdefault(step, d)
        return sorted(finals.items())

    def checkpoints(self, warn: bool = True) -> list[Path]:
        """Complete checkpoints, oldest first. Incomplete folders are skipped (with a warning)."""
        out = []
        for _, d in self._candidates():
            try:
                read_meta(d)
            except CheckpointError as e:
                if warn:
                    logger.warning("ignoring %s", e)
                continue
            out.append(d)
        return out

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        for _, d in reversed(self._candidates()):
            try:
                read_meta(d)
                return d
            except CheckpointError as e:
                logger.warning("ignoring %s", e)
        return None

    # ---- load ------------------------------------------------------------------------------

    def load(self, path: str | Path, expected_fingerprint: Mapping[str, Any] | None) -> dict:
        """Trainer state of a complete checkpoint whose fingerprint equals ``expected_fingerprint``.

        ``expected_fingerprint=None`` skips the identity check (tools that only inspect).
        """
        return load_checkpoint(path, expected_fingerprint)

    def resolve_resume(self, spec: str | None) -> Path | None:
        return resolve_resume(spec, self.dir)

    # ---- save ------------------------------------------------------------------------------

    def _cleanup_leftovers(self) -> None:
        """Remove stale .tmp-* folders; put back or drop .old-* asides from an interrupted save."""
        for d in list(self.dir.iterdir()):
            if not d.is_dir():
                continue
            if d.name.startswith(_TMP_PREFIX):
                logger.warning("removing stale folder from an interrupted save or prune: %s", d)
                shutil.rmtree(d, ignore_errors=True)
                continue
            m = _ASIDE_RE.match(d.name)
            if m:
                final = self.dir / step_dirname(int(m.group(1)))
                if not final.exists():
                    try:
                        read_meta(d)
                        os.rename(d, final)
                        logger.warning("restored %s from an interrupted save", final)
                        continue
                    except CheckpointError:
                        pass
                _remove_tree(d)

    def save(
        self,
        step: int,
        write_policy: Callable[[Path], None],
        state: Mapping[str, Any],
        fingerprint: Mapping[str, Any],
        extra_meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically and prune; returns the final folder.

        ``write_policy(path)`` must write the HF model and tokenizer into ``path`` (it exists,
        empty). ``state`` must be loadable with ``weights_only=True`` (checked before anything is
        written). ``fingerprint`` is stored in meta.json and checked by :meth:`load`. If anything
        fails, the temporary folder is removed, the exception propagates and the existing
        checkpoints are untouched.

        Sharded backends split this in three: rank 0 calls :meth:`begin`, every rank writes its
        part into the returned folder, rank 0 calls :meth:`commit` (or :meth:`abort`).
        """
        tmp = self.begin(step, state)
        try:
            write_policy(tmp / POLICY_DIR)
        except BaseException:
            self.abort(tmp)
            raise
        return self.commit(tmp, step, state, fingerprint, extra_meta)

    def begin(self, step: int, state: Mapping[str, Any] | None = None) -> Path:
        """A fresh temporary folder for checkpoint ``step`` (with an empty ``policy/``)."""
        if int(step) < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if state is not None:
            check_weights_only_safe(state)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._cleanup_leftovers()
        tmp = self.dir / f"{_TMP_PREFIX}{step_dirname(int(step))}-{secrets.token_hex(4)}"
        tmp.mkdir()
        (tmp / POLICY_DIR).mkdir()
        return tmp

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def commit(
        self,
        tmp: Path,
        step: int,
        state: Mapping[str, Any],
        fingerprint: Mapping[str, Any],
        extra_meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Add ``state`` and meta.json to ``tmp`` (from :meth:`begin`, everything else written),
        then rename it into place atomically and prune."""
        step = int(step)
        fingerprint = _json_normalize(dict(fingerprint))
        name = step_dirname(step)
        final = self.dir / name
        t0 = time.perf_counter()
        try:
            check_weights_only_safe(state)
            torch.save(dict(state), tmp / STATE_FILE)
            _fsync_tree(tmp)
            files = _list_files(tmp)
            meta = {
                "step": step,
                "format_version": FORMAT_VERSION,
                "model_fingerprint": fingerprint,
                "complete": True,
                "files": sorted(files),
                "file_sizes": files,
                "created_unix": time.time(),
                "fastgrpo_version": _fastgrpo_version(),
            }
            if extra_meta:
                meta["extra"] = _json_normalize(dict(extra_meta))
            meta_tmp = tmp / (META_FILE + ".part")
            meta_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            _fsync_path(meta_tmp)
            os.rename(meta_tmp, tmp / META_FILE)
            _fsync_path(tmp)
        except BaseException:
            self.abort(tmp)
            raise

        aside = None
        if final.exists():
            logger.warning("overwriting existing checkpoint %s", final)
            aside = self.dir / f"{_ASIDE_PREFIX}{name}-{secrets.token_hex(4)}"
            os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except BaseException:
            if aside is not None and not final.exists():
                os.rename(aside, final)
            self.abort(tmp)
            raise
        _fsync_path(self.dir)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        logger.info("saved checkpoint %s in %.1fs", final, time.perf_counter() - t0)
        self._prune(keep=final)
        return final

    def _prune(self, keep: Path) -> None:
        complete = self.checkpoints(warn=False)
        newer = [d for d in complete if _step_of(d) > _step_of(keep)]
        if newer:
            logger.warning(
                "checkpoint %s was written but newer ones exist (%s): resume=auto will pick the newest",
                keep.name,
                ", ".join(d.name for d in newer),
            )
        if self.keep_last <= 0:
            return
        for d in complete[: max(len(complete) - self.keep_last, 0)]:
            if d != keep:
                logger.info("pruning old checkpoint %s", d)
                _remove_tree(d)


def _step_of(path: Path) -> int:
    m = _STEP_RE.match(path.name) or _ASIDE_RE.match(path.name)
    return int(m.group(1)) if m else -1


def resolve_resume(spec: str | None, dir: str | Path) -> Path | None:
    """``"none"`` (or empty) -> None; ``"auto"`` -> newest complete checkpoint in ``dir`` (or None);
    anything else is a path that must be a complete checkpoint (:class:`CheckpointError` if not)."""
    if spec is None or str(spec).strip().lower() in ("", "none", "null", "false"):
        return None
    if str(spec).strip().lower() == "auto":
        return CheckpointManager(dir).latest()
    p = Path(str(spec)).expanduser()
    read_meta(p)
    return p


def _fastgrpo_version() -> str:
    try:
        from fastgrpo import __version__

        return __version__
    except Exception:  # noqa: BLE001  # pragma: no cover
        return "unknown"
