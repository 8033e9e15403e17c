"""Prompt data sets: reading GSM8K / DAPO-Math / SimpleRL-Abel style files and the synthetic task.

``load_examples`` turns a ``.jsonl`` or ``.parquet`` file into :class:`Example` s;
:class:`PromptDataset` renders and tokenizes the prompts once; ``build_datasets`` builds the
train and held-out test sets from a :class:`~fastgrpo.config.DataConfig`.

Every problem with the input is a :class:`DataError` whose message names the file and the line
(1-based, jsonl) or row (0-based, parquet) and the field.

Each :class:`PromptItem` carries ``columns``, the row as reward functions see it (TRL-style
batched rewards get them as keyword lists, verl-style ones ``data_source`` / ``extra_info``):
the file row's top-level fields except the prompt field, then ``prompt`` (the user text, before
the template), ``answer`` (the final answer verified against; a gsm8k file's own ``answer``
field is the full solution, kept as ``solution``), ``solution`` when known and ``data_source``
(the row's own, else ``data.kind``). Synthetic rows have just those four.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastgrpo.config import DataConfig
from fastgrpo.data.example import Example
from fastgrpo.data.synthetic import synthetic_splits

DATA_KINDS = ("synthetic", "gsm8k", "prompt_answer")
FILE_KINDS = ("gsm8k", "prompt_answer")
LONG_PROMPT_POLICIES = ("skip", "error")
SUPPORTED_EXTENSIONS = (".jsonl", ".parquet")


class DataError(ValueError):
    """Bad input data or data configuration; the message names the file, line/row and field."""


@dataclass
class PromptItem:
    index: int  # position of the example in the list the dataset was built from (stable id)
    prompt_ids: list[int]
    prompt_text: str
    answer: str
    solution: str | None
    # The row as reward functions see it (see the module docstring).
    columns: dict[str, Any] = field(default_factory=dict)


def reward_columns(ex: Example, kind: str) -> dict[str, Any]:
    """The row of ``ex`` as reward functions see it (see the module docstring)."""
    columns = {**ex.columns, "prompt": ex.prompt, "answer": ex.answer}
    if ex.solution is not None:
        columns["solution"] = ex.solution
    columns.setdefault("data_source", kind)
    return columns


# ----------------------------------------------------------------------------- file reading

_MISSING = object()
_CALC_ANNOTATION = re.compile(r"<<[^<>]*>>")


def _get_field(row: Any, dotted: str) -> Any:
    """``row["a"]["b"]`` for ``"a.b"``; list elements by integer index; _MISSING when absent."""
    cur = row
    for part in dotted.split("."):
        if isinstance(cur, dict):
            if part not in cur:
                return _MISSING
            cur = cur[part]
        elif isinstance(cur, (list, tuple)) and part.lstrip("-").isdigit():
            i = int(part)
            if not -len(cur) <= i < len(cur):
                return _MISSING
            cur = cur[i]
        else:
            return _MISSING
    return cur


def _prompt_text(value: Any, where: str, field_name: str) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple)):
        # A chat (DAPO-Math): [{"role": "user", "content": "..."}]; take the (last) user turn.
        users = [
            m.get("content")
            for m in value
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
        ]
        if not users:
            raise DataError(
                f"{where}: field {field_name!r} is a list but holds no chat message with "
                "role 'user' and a string 'content'"
            )
        text = users[-1]
    elif isinstance(value, dict) and isinstance(value.get("content"), str):
        text = value["content"]
    else:
        raise DataError(
            f"{where}: field {field_name!r} must be a string or a list of chat messages, "
            f"got {type(value).__name__}"
        )
    if not text.strip():
        raise DataError(f"{where}: field {field_name!r} is empty")
    return text


def parse_gsm8k_solution(text: str) -> tuple[str, str]:
    """(final answer, solution without ``<<...>>`` calculator annotations); ValueError without ``####``."""
    if "####" not in text:
        raise ValueError("no '#### <answer>' marker")
    answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    if answer.endswith("."):
        answer = answer[:-1].rstrip()
    if not answer:
        raise ValueError("nothing after '####'")
    solution = _CALC_ANNOTATION.sub("", text).strip()
    return answer, solution


def _row_to_example(row: Any, where: str, kind: str, prompt_field: str, answer_field: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt_value = _get_field(row, prompt_field)
    if prompt_value is _MISSING or prompt_value is None:
        raise DataError(f"{where}: missing field {prompt_field!r} (prompt_field)")
    answer_value = _get_field(row, answer_field)
    if answer_value is _MISSING or answer_value is None:
        raise DataError(f"{where}: missing field {answer_field!r} (answer_field)")
    prompt = _prompt_text(prompt_value, where, prompt_field)
    prompt_top = prompt_field.split(".", 1)[0]
    columns = {k: v for k, v in row.items() if k != prompt_top}
    if kind == "gsm8k":
        if not isinstance(answer_value, str):
            raise DataError(
                f"{where}: field {answer_field!r} must be a GSM8K solution string ending in "
                f"'#### <answer>', got {type(answer_value).__name__}"
            )
        try:
            answer, solution = parse_gsm8k_solution(answer_value)
        except ValueError as e:
            raise DataError(f"{where}: field {answer_field!r}: {e} (kind gsm8k)") from None
        return Example(prompt=prompt, answer=answer, solution=solution, source=where, columns=columns)
    # prompt_answer
    if isinstance(answer_value, bool) or not isinstance(answer_value, (str, int, float)):
        raise DataError(
            f"{where}: field {answer_field!r} must be a string or a number, got {type(answer_value).__name__}"
        )
    answer = str(answer_value).strip()
    if not answer:
        raise DataError(f"{where}: field {answer_field!r} is empty")
    return Example(prompt=prompt, answer=answer, solution=None, source=where, columns=columns)


def load_examples(path: str, kind: str, prompt_field: str, answer_field: str) -> list[Example]:
    """Read a ``.jsonl`` or ``.parquet`` file of problems.

    ``kind="gsm8k"``: the answer field is a solution ending in ``#### N``; ``answer`` becomes N
    (commas removed) and ``solution`` the text without ``<<...>>`` annotations.
    ``kind="prompt_answer"``: the answer field is the final answer itself.
    Fields may be dotted paths into nested objects (``reward_model.ground_truth``); a prompt may be
    a list of chat messages (the user turn's content is taken).
    """
    if kind not in FILE_KINDS:
        raise DataError(f"unknown data kind {kind!r} for a file (expected one of {FILE_KINDS})")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, expected a .jsonl or .parquet file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        examples = _load_jsonl(path, kind, prompt_field, answer_field)
    elif ext == ".parquet":
        examples = _load_parquet(path, kind, prompt_field, answer_field)
    else:
        raise DataError(
            f"{path}: unsupported file extension {ext or '(none)'!r} "
            f"(supported: {', '.join(SUPPORTED_EXTENSIONS)})"
        )
    if not examples:
        raise DataError(f"{path}: empty data set (no rows)")
    return examples


def _load_jsonl(path: str, kind: str, prompt_field: str, answer_field: str) -> list[Example]:
    examples = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            examples.append(_row_to_example(row, where, kind, prompt_field, answer_field))
    return examples


def _load_parquet(path: str, kind: str, prompt_field: str, answer_field: str) -> list[Example]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError, pa.ArrowException) as e:  # a broken or non-parquet file
        raise DataError(f"{path}: cannot read parquet file: {e}") from None
    names = pf.schema_arrow.names
    for label, name in (("prompt_field", prompt_field), ("answer_field", answer_field)):
        if name.split(".", 1)[0] not in names:
            raise DataError(f"{path} row 0: missing field {name!r} ({label}); columns are {names}")
    try:
        rows = pf.read().to_pylist()  # every column: the other ones reach reward functions
    except (OSError, ValueError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read parquet file: {e}") from None
    return [
        _row_to_example(row, f"{path} row {i}", kind, prompt_field, answer_field)
        for i, row in enumerate(rows)
    ]


# ----------------------------------------------------------------------------- prompt data set


def render_prompt(prompt: str, tokenizer: Any, cfg: DataConfig) -> tuple[str, bool]:
    """(text, templated): the prompt as the policy sees it.

    With ``use_chat_template`` and a tokenizer that has a chat template: system prompt (optional)
    + user turn (prompt + suffix) + generation prompt. Otherwise: plain text.
    """
    content = prompt + (cfg.prompt_suffix or "")
    if cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = []
        if cfg.system_prompt:
            messages.append({"role": "system", "content": cfg.system_prompt})
        messages.append({"role": "user", "content": content})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text, True
    if cfg.system_prompt:
        content = cfg.system_prompt + "\n\n" + content
    return content, False


class PromptDataset:
    """Rendered and tokenized prompts; over-long ones skipped (counted) or rejected."""

    def __init__(self, examples: Sequence[Example], tokenizer: Any, cfg: DataConfig):
        if cfg.long_prompt_policy not in LONG_PROMPT_POLICIES:
            raise DataError(
                f"data.long_prompt_policy must be one of {LONG_PROMPT_POLICIES}, "
                f"got {cfg.long_prompt_policy!r}"
            )
        if cfg.max_prompt_tokens < 1:
            raise DataError(f"data.max_prompt_tokens must be >= 1, got {cfg.max_prompt_tokens}")
        self.max_prompt_tokens = cfg.max_prompt_tokens
        self.num_skipped = 0
        self.skipped_indices: list[int] = []
        self.items: list[PromptItem] = []
        if not examples:
            raise DataError("empty data set: no examples to build prompts from")

        rendered = [render_prompt(ex.prompt, tokenizer, cfg) for ex in examples]
        texts = [text for text, _ in rendered]
        templated = rendered[0][1]
        # A chat template carries its own special tokens (BOS etc.); plain text gets the
        # tokenizer's usual ones.
        ids_list = tokenizer(texts, add_special_tokens=not templated)["input_ids"]
        for i, (ex, text, ids) in enumerate(zip(examples, texts, ids_list)):
            ids = list(ids)
            if len(ids) > cfg.max_prompt_tokens:
                if cfg.long_prompt_policy == "error":
                    where = ex.source or f"example {i}"
                    raise DataError(
                        f"{where}: prompt has {len(ids)} tokens, more than "
                        f"data.max_prompt_tokens={cfg.max_prompt_tokens} "
                        "(raise it, or set data.long_prompt_policy=skip)"
                    )
                self.num_skipped += 1
                self.skipped_indices.append(i)
                continue
            self.items.append(PromptItem(index=i, prompt_ids=ids, prompt_text=text, answer=ex.answer,
                                         solution=ex.solution, columns=reward_columns(ex, cfg.kind)))
        if not self.items:
            raise DataError(
                f"empty data set: all {len(examples)} prompts are longer than "
                f"data.max_prompt_tokens={cfg.max_prompt_tokens}"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> PromptItem:
        return self.items[i]

    def __iter__(self):
        return iter(self.items)

    @property
    def max_len(self) -> int:
        return max(len(it.prompt_ids) for it in self.items)


def _split_holdout(examples: list[Example], test_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    if test_size >= len(examples):
        raise DataError(
            f"data.test_size={test_size} leaves no training examples out of {len(examples)} "
            "(lower test_size or give data.test_path)"
        )
    order = list(range(len(examples)))
    random.Random(f"fastgrpo-holdout-{int(seed)}").shuffle(order)
    held = set(order[:test_size])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    test = [examples[i] for i in sorted(held)]
    return train, test


def build_datasets(cfg: DataConfig, tokenizer: Any) -> tuple[PromptDataset, PromptDataset]:
    """(train, test) prompt data sets for ``cfg.kind``; test holds at most ``cfg.test_size`` prompts."""
    if cfg.kind not in DATA_KINDS:
        raise DataError(f"data.kind must be one of {DATA_KINDS}, got {cfg.kind!r}")
    if cfg.test_size < 1:
        raise DataError(f"data.test_size must be >= 1, got {cfg.test_size}")
    if cfg.kind == "synthetic":
        try:
            train_ex, test_ex = synthetic_splits(cfg.synthetic)
        except ValueError as e:
            raise DataError(str(e)) from None
    else:
        if not cfg.train_path:
            raise DataError(f"data.kind={cfg.kind} needs data.train_path (a .jsonl or .parquet file)")
        train_ex = load_examples(cfg.train_path, cfg.kind, cfg.prompt_field, cfg.answer_field)
        if cfg.test_path:
            test_ex = load_examples(cfg.test_path, cfg.kind, cfg.prompt_field, cfg.answer_field)
        else:
            train_ex, test_ex = _split_holdout(train_ex, cfg.test_size, cfg.shuffle_seed)
    test_ex = test_ex[: cfg.test_size]
    return PromptDataset(train_ex, tokenizer, cfg), PromptDataset(test_ex, tokenizer, cfg)
