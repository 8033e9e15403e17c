"""The embedded default's task: templated multi-step arithmetic word problems.

Every problem is a short story about one person and one kind of object::

    prompt:   "Ann has 3 apples . She gets 5 more . She gives away 2 . How many apples does Ann have ?"
    solution: "3 + 5 = 8 . 8 - 2 = 6 . #### 6"

The language is templated and space-separated with a vocabulary of a few dozen words
(:data:`SYNTHETIC_WORDS`), so a ~3M-parameter model learns it with a few minutes of CPU SFT.
Operands are in ``1..max_operand``; every intermediate value stays in ``0..max_value`` (the
operation is chosen so the value never leaves that range).

The number of operations is ``min_steps`` plus a geometric tail: after the minimum, one more step
is added with probability ``continue_prob``, repeatedly, capped at ``max_steps``. The long tail of
response lengths is what makes batch concurrency fall during a rollout, which the
concurrency-aware speculative decoder exploits.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from fastgrpo.config import SyntheticTaskConfig
from fastgrpo.data.example import Example

# (name, pronoun)
NAMES: tuple[tuple[str, str], ...] = (
    ("Ann", "She"),
    ("Tom", "He"),
    ("Mia", "She"),
    ("Ben", "He"),
    ("Lily", "She"),
    ("Sam", "He"),
)
OBJECTS: tuple[str, ...] = ("apples", "pens", "coins", "books", "cards", "marbles", "cookies", "stickers")
# Phrases around the operand: "<Pronoun> <before> N <after> ."
ADD_PHRASES: tuple[tuple[str, str], ...] = (
    ("gets", "more"),
    ("buys", "more"),
    ("finds", "more"),
    ("wins", "more"),
)
SUB_PHRASES: tuple[tuple[str, str], ...] = (
    ("gives away", ""),
    ("loses", ""),
    ("sells", ""),
    ("uses", ""),
)
_FIXED_WORDS = ("has", "How", "many", "does", "have")


def _collect_words() -> tuple[str, ...]:
    words: list[str] = []
    for name, pronoun in NAMES:
        words += [name, pronoun]
    words += list(OBJECTS)
    for before, after in ADD_PHRASES + SUB_PHRASES:
        words += before.split() + after.split()
    words += list(_FIXED_WORDS)
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return tuple(seen)


#: Every word (letters only) the synthetic task can produce. Digits and punctuation
#: (``+ - = . ? ####``) are added by the tokenizer builder itself.
SYNTHETIC_WORDS: tuple[str, ...] = _collect_words()


def validate_synthetic_config(cfg: SyntheticTaskConfig) -> None:
    """Raise ValueError naming the bad field."""
    if cfg.min_steps < 0:
        raise ValueError(f"data.synthetic.min_steps must be >= 0, got {cfg.min_steps}")
    if cfg.max_steps < cfg.min_steps:
        raise ValueError(f"data.synthetic.max_steps ({cfg.max_steps}) must be >= min_steps ({cfg.min_steps})")
    if not 0.0 <= cfg.continue_prob < 1.0:
        raise ValueError(f"data.synthetic.continue_prob must be in [0, 1), got {cfg.continue_prob}")
    if cfg.max_operand < 1:
        raise ValueError(f"data.synthetic.max_operand must be >= 1, got {cfg.max_operand}")
    if cfg.max_value < 1:
        raise ValueError(f"data.synthetic.max_value must be >= 1, got {cfg.max_value}")
    if cfg.num_train < 1 or cfg.num_test < 1:
        raise ValueError(
            f"data.synthetic.num_train and num_test must be >= 1, got {cfg.num_train}, {cfg.num_test}"
        )


def _num_steps(cfg: SyntheticTaskConfig, rng: random.Random) -> int:
    n = cfg.min_steps
    while n < cfg.max_steps and rng.random() < cfg.continue_prob:
        n += 1
    return n


def _one_example(cfg: SyntheticTaskConfig, rng: random.Random) -> Example:
    name, pronoun = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    value = rng.randint(1, min(cfg.max_operand, cfg.max_value))
    sentences = [f"{name} has {value} {obj} ."]
    equations: list[str] = []
    for _ in range(_num_steps(cfg, rng)):
        ops = []
        if value + 1 <= cfg.max_value:
            ops.append("+")
        if value >= 1:
            ops.append("-")
        op = rng.choice(ops)
        if op == "+":
            operand = rng.randint(1, min(cfg.max_operand, cfg.max_value - value))
            before, after = rng.choice(ADD_PHRASES)
            new_value = value + operand
        else:
            operand = rng.randint(1, min(cfg.max_operand, value))
            before, after = rng.choice(SUB_PHRASES)
            new_value = value - operand
        words = [pronoun, before, str(operand)] + ([after] if after else []) + ["."]
        sentences.append(" ".join(words))
        equations.append(f"{value} {op} {operand} = {new_value} .")
        value = new_value
    sentences.append(f"How many {obj} does {name} have ?")
    solution = " ".join(equations + [f"#### {value}"])
    return Example(prompt=" ".join(sentences), answer=str(value), solution=solution)


def _iter_examples(cfg: SyntheticTaskConfig, seed: int) -> Iterator[Example]:
    validate_synthetic_config(cfg)
    rng = random.Random(f"fastgrpo-synthetic-{int(seed)}")
    while True:
        yield _one_example(cfg, rng)


def generate_examples(cfg: SyntheticTaskConfig, n: int, seed: int) -> list[Example]:
    """``n`` problems, a pure function of ``(cfg, n, seed)`` (a prefix of a longer draw)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    it = _iter_examples(cfg, seed)
    return [next(it) for _ in range(n)]


# The test split draws from its own seed stream.
_TEST_SEED_OFFSET = 1_000_003


def synthetic_splits(cfg: SyntheticTaskConfig) -> tuple[list[Example], list[Example]]:
    """(train, test): ``num_train`` problems from ``seed`` and ``num_test`` from a disjoint seed.

    Short problems can repeat by chance; test problems whose prompt also occurs in train are
    skipped (and replaced by further draws), so the held-out set is really held out.
    """
    validate_synthetic_config(cfg)
    train = generate_examples(cfg, cfg.num_train, cfg.seed)
    seen = {ex.prompt for ex in train}
    test: list[Example] = []
    draws = 0
    limit = 1000 * cfg.num_test + 10_000
    for ex in _iter_examples(cfg, cfg.seed + _TEST_SEED_OFFSET):
        draws += 1
        if draws > limit:
            raise ValueError(
                f"data.synthetic: could not draw {cfg.num_test} test problems disjoint from the "
                f"{cfg.num_train} training problems (problem space too small: raise max_steps, "
                "max_operand or max_value, or lower num_train)"
            )
        if ex.prompt in seen:
            continue
        seen.add(ex.prompt)
        test.append(ex)
        if len(test) == cfg.num_test:
            break
    return train, test
