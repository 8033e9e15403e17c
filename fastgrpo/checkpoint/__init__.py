"""Atomic, complete, self-checking checkpoints whose state loads under ``weights_only``.

One checkpoint is one folder ``<dir>/step_<8 digits>/``::

    policy/             HF save_pretrained of the policy (safetensors) + its tokenizer
    shards/             per-rank sharded state (ZeRO partitions, Megatron optimizer shards)
    trainer_state.pt    plain dict: tensors and Python values only (torch.load(weights_only=True))
    meta.json           {"step", "format_version", "model_fingerprint", "complete": true,
                         "files": [...], "file_sizes": {...}, "checksums": {...}, ...}  <- written LAST

``checksums`` is the manifest: a sha256 per file (per 1 GiB piece), see
:mod:`fastgrpo.checkpoint.manifest`.

How a save stays crash-safe (DESIGN.md section 6: resume bugs):

1. Everything is written into ``<dir>/.tmp-step_X-<random>/``; every file is fsynced and hashed
   (each rank its share of the pieces); meta.json (the completeness marker, listing every file,
   its size and checksums) is written last.
2. The folder is renamed to ``step_X`` (``os.rename`` is atomic on one file system). If a
   ``step_X`` already exists and this manager wrote or verified it (a repeated save), it is first
   renamed aside to ``.old-step_X-<random>`` and deleted only after the new one is in place. A
   crash between the two renames leaves the aside copy, which :meth:`CheckpointManager.latest`
   still finds and the next save puts back or removes. A ``step_X`` this manager did not verify
   (corrupt, incomplete, or from another segment) is never deleted: it is renamed to
   ``step_X.corrupt-<random>`` or ``step_X.replaced-<random>`` (kept; not a checkpoint any more).
3. Only then are old checkpoints pruned to ``keep_last`` (never the one just written, never one
   that failed verification). Pruned folders are renamed to ``.tmp-delete-...`` before deletion,
   so a half-deleted folder is never mistaken for a checkpoint.
4. Stale ``.tmp-*`` folders from crashed saves are removed at the start of the next save.

Resume (:meth:`CheckpointManager.resolve_resume`): ``auto`` verifies checkpoints newest first
(sizes and checksums), skips those that fail with a warning naming the file, and takes the first
that verifies. A folder holding checkpoints none of which verifies is a :class:`CheckpointError`,
never a fresh start. Nothing is renamed or deleted by resolving.

Ranks: rank 0 owns the folder (:meth:`~CheckpointManager.begin`, the rename); every rank writes
its part into the temporary folder; :meth:`~CheckpointManager.commit` and
:meth:`~CheckpointManager.resolve_resume` with ``all_ranks``/``collective`` are collectives in which
every rank hashes or verifies its share. Without them one process does everything.

Modules: ``manager`` (CheckpointManager, resume resolution, loading), ``manifest`` (meta.json,
checksums, verification), ``identity`` (fingerprint comparison, weights_only rules). RNG capture is in
:mod:`fastgrpo.rng_state`.
"""

from fastgrpo.checkpoint.identity import check_weights_only_safe, fingerprint_diff
from fastgrpo.checkpoint.manager import (
    POLICY_DIR,
    SHARDS_DIR,
    STATE_FILE,
    CheckpointManager,
    load_checkpoint,
    reading,
    resolve_resume,
    step_dirname,
)
from fastgrpo.checkpoint.manifest import (
    FORMAT_VERSION,
    META_FILE,
    SUPPORTED_FORMAT_VERSIONS,
    CheckpointError,
    read_meta,
    verify_checkpoint,
)

__all__ = [
    "FORMAT_VERSION", "META_FILE", "POLICY_DIR", "SHARDS_DIR", "STATE_FILE", "SUPPORTED_FORMAT_VERSIONS",
    "CheckpointError", "CheckpointManager", "check_weights_only_safe", "fingerprint_diff", "load_checkpoint",
    "read_meta", "reading", "resolve_resume", "step_dirname", "verify_checkpoint",
]
