"""The checkpoint manager: atomic save, discovery, resume resolution, pruning (see the package's
docstring for the layout and the rules)."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fastgrpo import __version__
from fastgrpo import distributed as dist_utils
from fastgrpo.checkpoint.identity import _json_normalize, check_weights_only_safe, fingerprint_diff
from fastgrpo.checkpoint.manifest import (
    FORMAT_VERSION,
    META_FILE,
    CheckpointError,
    checksum_files,
    fsync_path,
    fsync_tree,
    list_files,
    on_rank0,
    read_meta,
    verify_checkpoint,
)
from fastgrpo.checkpoint.manifest import STEP_RE as _STEP_RE

logger = logging.getLogger("fastgrpo.checkpoint")

STATE_FILE = "trainer_state.pt"
POLICY_DIR = "policy"
SHARDS_DIR = "shards"  # per-rank sharded state (ZeRO partitions), written by every rank

_ASIDE_RE = re.compile(r"^\.old-step_(\d+)-[0-9a-f]+$")
_TMP_PREFIX = ".tmp-"
_ASIDE_PREFIX = ".old-"


def step_dirname(step: int) -> str:
    return f"step_{int(step):08d}"


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _remove_tree(path: Path) -> None:
    """Delete a folder so that a crash midway never leaves something that looks like a checkpoint."""
    if not path.exists():
        return
    doomed = path
    if not path.name.startswith(_TMP_PREFIX):
        doomed = path.parent / f"{_TMP_PREFIX}delete-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Loading one checkpoint
# --------------------------------------------------------------------------------------------


@contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Any error raised inside becomes a :class:`CheckpointError` that names ``path`` (the file
    or folder being loaded), with the original error's type and message."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot load {path}: {type(e).__name__}: {e}") from e


def load_checkpoint(path: str | Path, expected_fingerprint: Mapping[str, Any] | None) -> dict:
    """Validate ``path`` (:func:`read_meta`: structure and sizes; contents are checked by
    :func:`verify_checkpoint`), check the model fingerprint, and return the trainer state (on CPU)."""
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
        raise CheckpointError(f"checkpoint {p}: cannot load {p / STATE_FILE} with weights_only=True: "
                              f"{type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {p}: {p / STATE_FILE} holds a {type(state).__name__}, not a dict")
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
        self._trusted: set[int] = set()  # steps this manager wrote or verified: may be replaced
        self._bad: dict[int, str] = {}  # steps that failed verification -> why: never deleted

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
        """Complete checkpoints (meta.json and sizes; contents not read), oldest first.
        Incomplete folders are skipped (with a warning)."""
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
        """The newest complete checkpoint (meta.json and sizes; contents not read), or None."""
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

    def resolve_resume(self, spec: str | None, collective: bool = False) -> Path | None:
        """``"none"`` (or empty) -> None; ``"auto"`` -> the newest checkpoint in this folder that
        verifies (None if the folder holds no checkpoint; :class:`CheckpointError` if it holds some
        and none verifies); anything else is a path that must verify. ``collective``: every rank
        calls this and verifies its share; all of them return the same answer."""
        if spec is None or str(spec).strip().lower() in ("", "none", "null", "false"):
            return None
        if str(spec).strip().lower() != "auto":
            p = Path(str(spec)).expanduser()
            verify_checkpoint(p, collective)
            self._note(p, None)
            return p
        lead = not collective or dist_utils.rank() == 0
        candidates = [d for _, d in reversed(self._candidates())]
        if collective:
            candidates = dist_utils.broadcast_object(candidates)
        skipped = []
        for d in candidates:
            try:
                verify_checkpoint(d, collective)
            except CheckpointError as e:
                if lead:
                    logger.warning("resume=auto: skipping %s (left in place)", e)
                skipped.append(str(e))
                self._note(d, str(e))
                continue
            self._note(d, None)
            if skipped and lead:
                logger.warning("resume=auto: resuming from %s, the newest checkpoint that verifies; %d newer "
                               "one(s) skipped", d, len(skipped))
            return d
        if skipped:
            raise CheckpointError(
                f"{self.dir} holds {len(skipped)} checkpoint(s) and none verifies, so resume=auto does not "
                "start over (nothing was changed; move them away to start a fresh run there): "
                + "; ".join(skipped))
        return None

    def _note(self, path: Path, problem: str | None) -> None:
        step = _step_of(path)
        if step < 0 or path.parent.resolve() != self.dir.resolve():
            return
        if problem is None:
            self._trusted.add(step)
            self._bad.pop(step, None)
        elif step not in self._trusted:
            self._bad[step] = problem

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
        part into the returned folder, every rank calls :meth:`commit` with ``all_ranks=True`` (or
        rank 0 calls :meth:`abort`).
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
        all_ranks: bool = False,
    ) -> Path:
        """Add ``state`` and meta.json (with the checksums) to ``tmp`` (from :meth:`begin`,
        everything else written), then rename it into place atomically and prune.

        ``all_ranks=True``: a collective, called by every rank once all of them wrote their part:
        rank 0 writes the state, every rank hashes its share of the files, rank 0 writes meta.json
        and renames; every rank returns the final folder or raises (``tmp`` is then removed)."""
        lead = not all_ranks or dist_utils.rank() == 0
        try:
            files = on_rank0(lambda: self._write_state(tmp, state), all_ranks, f"writing {tmp / STATE_FILE}")
            checksums = checksum_files(tmp, files, collective=all_ranks)
            return on_rank0(lambda: self._seal(tmp, int(step), fingerprint, files, checksums, extra_meta),
                            all_ranks, f"sealing {tmp}")
        except BaseException:
            if lead:
                self.abort(tmp)
            raise

    def _write_state(self, tmp: Path, state: Mapping[str, Any]) -> dict[str, int]:
        check_weights_only_safe(state)
        torch.save(dict(state), tmp / STATE_FILE)
        fsync_tree(tmp)
        return list_files(tmp)

    def _seal(self, tmp: Path, step: int, fingerprint: Mapping[str, Any], files: dict[str, int],
              checksums: dict, extra_meta: Mapping[str, Any] | None) -> Path:
        """meta.json (the completeness marker) into ``tmp``, then the rename into place, then prune."""
        name = step_dirname(step)
        final = self.dir / name
        t0 = time.perf_counter()
        meta = {
            "step": step,
            "format_version": FORMAT_VERSION,
            "model_fingerprint": _json_normalize(dict(fingerprint)),
            "complete": True,
            "files": sorted(files),
            "file_sizes": files,
            "checksums": checksums,
            "created_unix": time.time(),
            "fastgrpo_version": __version__,
        }
        if extra_meta:
            meta["extra"] = _json_normalize(dict(extra_meta))
        meta_tmp = tmp / (META_FILE + ".part")
        meta_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        fsync_path(meta_tmp)
        os.rename(meta_tmp, tmp / META_FILE)
        fsync_path(tmp)

        aside, keep_aside = None, False
        if final.exists():
            aside, keep_aside = self._move_aside(final, step)
        try:
            os.rename(tmp, final)
        except BaseException:
            if aside is not None and not final.exists():
                os.rename(aside, final)
            raise
        fsync_path(self.dir)
        if aside is not None and not keep_aside:
            shutil.rmtree(aside, ignore_errors=True)
        self._trusted.add(step)
        self._bad.pop(step, None)
        logger.info("saved checkpoint %s in %.1fs", final, time.perf_counter() - t0)
        self._prune(keep=final)
        return final

    def _move_aside(self, final: Path, step: int) -> tuple[Path, bool]:
        """Rename an existing ``step_X`` out of the way: to ``.old-...`` (deleted once the new one
        is in place) if this manager wrote or verified it, else to a kept ``step_X.corrupt-...`` /
        ``step_X.replaced-...``: a step folder that was not verified is never deleted."""
        hex_ = secrets.token_hex(4)
        if step in self._trusted:
            logger.warning("overwriting existing checkpoint %s", final)
            aside = self.dir / f"{_ASIDE_PREFIX}{final.name}-{hex_}"
            os.rename(final, aside)
            return aside, False
        why = self._bad.get(step)
        if why is None:
            try:
                read_meta(final)
                why = "it was not verified by this run"
            except CheckpointError as e:
                why = str(e)
        kind = "replaced" if why == "it was not verified by this run" else "corrupt"
        kept = self.dir / f"{final.name}.{kind}-{hex_}"
        os.rename(final, kept)
        logger.warning("checkpoint %s already exists and %s: renamed to %s (kept, never deleted by fastgrpo; "
                       "not a checkpoint for resume any more)", final, why, kept)
        return kept, True

    def _prune(self, keep: Path) -> None:
        complete = [d for d in self.checkpoints(warn=False) if _step_of(d) not in self._bad]
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


def resolve_resume(spec: str | None, dir: str | Path, collective: bool = False) -> Path | None:
    """:meth:`CheckpointManager.resolve_resume` of a manager of ``dir``."""
    return CheckpointManager(dir).resolve_resume(spec, collective)
