"""One prompt-data example, shared by the file readers (datasets.py) and the synthetic task
(synthetic.py) so that neither imports the other's module for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    prompt: str
    # Ground-truth final answer (what the accuracy reward verifies against).
    answer: str
    # Full reference response when known (GSM8K, synthetic); used by the SFT warm-up.
    solution: str | None = None
    # Where it came from ("train.jsonl:17", "x.parquet row 3"), for error messages only.
    source: str | None = field(default=None, compare=False, repr=False)
    # The file row's other top-level fields (for reward functions); empty for synthetic rows.
    columns: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
