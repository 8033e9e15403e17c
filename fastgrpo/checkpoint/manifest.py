"""What makes a checkpoint folder complete and intact: its meta.json and the manifest in it.

meta.json is written last (the completeness marker) and lists every file of the checkpoint with
its size (``files``, ``file_sizes``) and its content checksum::

    "checksums": {"algo": "sha256", "piece_bytes": 1073741824,
                  "files": {"policy/model.safetensors": ["<sha256 of bytes 0..1GiB>", ...], ...}}

A file is hashed in pieces of ``piece_bytes`` (one digest per piece), so that one large file (a
50 GB safetensors shard) is split over several ranks and threads. The pieces are spread over the
ranks by size (longest first, to the least loaded rank); the same assignment is used at save
(:func:`checksum_files`: every rank hashes its share after all of them wrote their files, rank 0
writes the merged manifest inside the temporary folder, before the atomic rename) and at resume
(:func:`verify_checkpoint`: every rank checks its share, the results are gathered, and every rank
reaches the same verdict). One process alone hashes everything, with a few threads.

:func:`read_meta` checks structure and sizes only (cheap: used to list and prune);
:func:`verify_checkpoint` also checks every piece's checksum (used to choose what to resume from).
A checkpoint written before checksums existed (no ``checksums`` in meta.json) is accepted by
:func:`verify_checkpoint` with a warning that only its sizes were checked.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from fastgrpo import distributed as dist_utils

logger = logging.getLogger("fastgrpo.checkpoint")

FORMAT_VERSION = 1  # "checksums" is an optional key: older fastgrpo versions read new checkpoints
SUPPORTED_FORMAT_VERSIONS = (1,)
META_FILE = "meta.json"
HASH_ALGO = "sha256"  # with SHA-NI (x86 since Ice Lake / Zen, ARMv8 crypto) faster than blake2b
PIECE_BYTES = 1 << 30
_READ_BYTES = 8 << 20

STEP_RE = re.compile(r"^step_(\d+)$")

T = TypeVar("T")
Piece = tuple[str, int, int, int]  # (relative path, piece index, offset, length)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, unreadable or belongs to another model."""


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
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


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def list_files(root: Path) -> dict[str, int]:
    """Relative POSIX paths of every file under ``root`` (except meta.json) -> size in bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in (META_FILE, META_FILE + ".part"):
            out[rel] = p.stat().st_size
    return out


# --------------------------------------------------------------------------------------------
# Pieces, their assignment to ranks, hashing
# --------------------------------------------------------------------------------------------


def pieces_of(sizes: Mapping[str, int], piece_bytes: int = PIECE_BYTES) -> list[Piece]:
    out = []
    for rel in sorted(sizes):
        size = int(sizes[rel])
        n = max(1, -(-size // piece_bytes))
        out += [(rel, i, i * piece_bytes, min(piece_bytes, size - i * piece_bytes)) for i in range(n)]
    return out


def share(pieces: list[Piece], rank: int, world: int) -> list[Piece]:
    """The pieces rank ``rank`` hashes: longest first, each to the least loaded rank (deterministic)."""
    if world <= 1:
        return list(pieces)
    heap = [(0, r) for r in range(world)]
    mine = []
    for piece in sorted(pieces, key=lambda p: (-p[3], p[0], p[1])):
        load, r = heapq.heappop(heap)
        if r == rank:
            mine.append(piece)
        heapq.heappush(heap, (load + max(piece[3], 1), r))
    return mine


def _threads(n_pieces: int) -> int:
    """Hashing threads for this process (hashlib releases the GIL): the cores of this rank's share."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cores // local, n_pieces))


def _hash_piece(root: Path, piece: Piece, algo: str) -> str:
    rel, _, offset, length = piece
    h = hashlib.new(algo)
    buf = bytearray(min(_READ_BYTES, max(length, 1)))
    view = memoryview(buf)
    with open(root / rel, "rb", buffering=0) as f:
        f.seek(offset)
        left = length
        while left > 0:
            n = f.readinto(view[: min(left, len(buf))])
            if not n:
                raise CheckpointError(f"{root / rel} ended {left} bytes early while being hashed")
            h.update(view[:n])
            left -= n
    return h.hexdigest()


def hash_pieces(root: Path, pieces: list[Piece], algo: str = HASH_ALGO) -> dict[tuple[str, int], str]:
    """``{(rel, index): hex digest}`` of ``pieces`` of files under ``root``."""
    if not pieces:
        return {}
    with ThreadPoolExecutor(_threads(len(pieces))) as pool:
        digests = pool.map(lambda p: _hash_piece(root, p, algo), pieces)
        return {(p[0], p[1]): d for p, d in zip(pieces, digests)}


def _gather_or_raise(result: Any, error: str | None, collective: bool) -> list[Any]:
    """Every rank's ``result``; if any rank reported an ``error``, CheckpointError on every rank."""
    if not collective or dist_utils.world_size() == 1:
        if error:
            raise CheckpointError(error)
        return [result]
    gathered = dist_utils.all_gather_objects((result, error))
    errors = list(dict.fromkeys(e for _, e in gathered if e))
    if errors:
        raise CheckpointError("; ".join(errors))
    return [r for r, _ in gathered]


def on_rank0(fn: Callable[[], T], collective: bool, what: str) -> T:
    """``fn()`` run by rank 0 only, its result on every rank. If it fails, rank 0 raises the
    original error and the other ranks a CheckpointError saying so (nobody waits forever)."""
    if not collective or dist_utils.world_size() == 1:
        return fn()
    result, failure = None, None
    if dist_utils.rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 (re-raised below, after the others were told)
            failure = e
    message = f"{type(failure).__name__}: {failure}" if failure is not None else None
    result, error = dist_utils.broadcast_object((result, message))
    if failure is not None:
        raise failure
    if error:
        raise CheckpointError(f"rank 0 failed while {what}: {error}")
    return result


def checksum_files(root: Path, sizes: Mapping[str, int], collective: bool = False) -> dict:
    """The ``checksums`` record of meta.json for the files ``sizes`` under ``root``. Collective if
    ``collective`` (each rank hashes its share; every rank gets the merged record)."""
    rank, world = (dist_utils.rank(), dist_utils.world_size()) if collective else (0, 1)
    t0 = time.perf_counter()
    pieces = pieces_of(sizes, PIECE_BYTES)
    mine = share(pieces, rank, world)
    digests, error = {}, None
    try:
        digests = hash_pieces(root, mine)
    except (OSError, CheckpointError) as e:
        error = f"rank {rank} could not hash its share of {root}: {e}"
    merged: dict[tuple[str, int], str] = {}
    for part in _gather_or_raise(digests, error, collective):
        merged.update(part)
    files: dict[str, list[str]] = {rel: [] for rel in sorted(sizes)}
    for rel, i, _, _ in pieces:
        files[rel].append(merged[(rel, i)])
    _log_rate("hashed", root, sum(p[3] for p in mine), time.perf_counter() - t0, world)
    return {"algo": HASH_ALGO, "piece_bytes": PIECE_BYTES, "files": files}


def _log_rate(verb: str, root: Path, nbytes: int, seconds: float, world: int) -> None:
    logger.info("%s %.1f MB of %s in %.2fs (%.0f MB/s on this rank, %d rank(s))", verb, nbytes / 1e6, root,
                seconds, nbytes / 1e6 / max(seconds, 1e-9), world)


# --------------------------------------------------------------------------------------------
# Reading and verifying one checkpoint
# --------------------------------------------------------------------------------------------


def read_meta(path: str | Path) -> dict:
    """Validate that ``path`` is a complete checkpoint and return its meta.json.

    Raises :class:`CheckpointError` naming the problem: no such folder, no meta.json (a save that
    did not finish), unreadable meta.json, ``complete`` not true, unknown format version, or a
    listed file that is missing or has the wrong size (truncated copy). Contents are not read:
    see :func:`verify_checkpoint`.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} is not a folder")
    meta_path = p / META_FILE
    if not meta_path.is_file():
        subs = sorted(d.name for d in p.iterdir() if d.is_dir() and STEP_RE.match(d.name))
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
        raise CheckpointError(f"checkpoint {p} is incomplete: {meta_path} is unreadable ({e})") from e
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
            raise CheckpointError(f"checkpoint {p} is incomplete: missing file {rel} ({f})")
        if rel in sizes and f.stat().st_size != sizes[rel]:
            raise CheckpointError(
                f"checkpoint {p} is incomplete: file {rel} has {f.stat().st_size} bytes, "
                f"{sizes[rel]} were written (truncated or modified copy: {f})"
            )
    return meta


def _checked_pieces(p: Path, meta: dict) -> tuple[list[Piece], dict[str, list[str]]]:
    """The pieces the manifest covers (every listed file, with its written size)."""
    ck = meta["checksums"]
    files, sizes = meta.get("files", []), meta.get("file_sizes") or {}
    if not isinstance(ck, dict) or ck.get("algo") not in hashlib.algorithms_available \
            or not isinstance(ck.get("piece_bytes"), int) or ck["piece_bytes"] <= 0 \
            or not isinstance(ck.get("files"), dict):
        raise CheckpointError(f"checkpoint {p} has a malformed manifest (\"checksums\" in {p / META_FILE})")
    uncovered = [rel for rel in files if rel not in ck["files"] or rel not in sizes]
    if uncovered:
        raise CheckpointError(f"checkpoint {p}: the manifest has no checksum for {uncovered[0]} "
                              f"({len(uncovered)} file(s) uncovered)")
    pieces = pieces_of({rel: sizes[rel] for rel in files}, ck["piece_bytes"])
    count = Counter(q[0] for q in pieces)
    for rel in files:
        if not isinstance(ck["files"][rel], list) or len(ck["files"][rel]) != count[rel]:
            raise CheckpointError(f"checkpoint {p}: the manifest entry for {rel} does not match its size")
    return pieces, ck["files"]


def _verify_share(p: Path, meta: dict, rank: int, world: int) -> None:
    if meta.get("checksums") is None:
        if rank == 0:
            logger.warning("checkpoint %s has no checksums (written by an older fastgrpo): only its file "
                           "sizes were checked, not their contents", p)
        return
    pieces, want = _checked_pieces(p, meta)
    mine = share(pieces, rank, world)
    algo = meta["checksums"]["algo"]
    t0 = time.perf_counter()
    got = hash_pieces(p, mine, algo)
    for rel, i, offset, length in mine:
        expected = want[rel][i]
        if got[(rel, i)] != expected:
            raise CheckpointError(
                f"checkpoint {p} is corrupt: {p / rel} does not match its checksum (bytes {offset}-"
                f"{offset + length - 1}: {algo} {got[(rel, i)][:12]}..., the manifest says "
                f"{expected[:12]}...; size unchanged)")
    _log_rate("verified", p, sum(q[3] for q in mine), time.perf_counter() - t0, world)
    if rank == 0:
        extra = sorted(set(list_files(p)) - set(meta.get("files", [])))
        if extra:
            logger.warning("checkpoint %s: %d file(s) not in its manifest, not verified: %s", p, len(extra),
                           ", ".join(extra[:5]))


def verify_checkpoint(path: str | Path, collective: bool = False) -> dict:
    """:func:`read_meta`, then every file's checksum (each rank its share if ``collective``: every
    rank must call it, and every rank returns the meta or raises the same CheckpointError)."""
    p = Path(path)
    rank, world = (dist_utils.rank(), dist_utils.world_size()) if collective else (0, 1)
    meta, error = None, None
    try:
        meta = read_meta(p)
        _verify_share(p, meta, rank, world)
    except CheckpointError as e:
        error = str(e)
    except OSError as e:
        error = f"checkpoint {p} is unreadable: {e}"
    _gather_or_raise(None, error, collective)
    return meta
