"""fastgrpo.data: synthetic task, file readers, prompt data sets, the resumable loader."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import replace

import pytest

from fastgrpo.config import DataConfig, SyntheticTaskConfig
from fastgrpo.data import (
    SYNTHETIC_WORDS,
    DataError,
    Example,
    PromptDataset,
    PromptLoader,
    build_datasets,
    generate_examples,
    load_examples,
    synthetic_splits,
)
from fastgrpo.models import build_word_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(SYNTHETIC_WORDS)


# ----------------------------------------------------------------------------- synthetic

EQ = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)$")


def check_solution(ex: Example, cfg: SyntheticTaskConfig) -> int:
    """Re-evaluate the solution's arithmetic; return the number of steps."""
    *steps, final = ex.solution.split(" . ")
    assert final == f"#### {ex.answer}"
    start = int(re.search(r"has (\d+) ", ex.prompt).group(1))
    assert 1 <= start <= cfg.max_operand
    value = start
    for step in steps:
        m = EQ.match(step)
        assert m, step
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        assert a == value
        assert 1 <= b <= cfg.max_operand
        assert c == (a + b if op == "+" else a - b)
        assert 0 <= c <= cfg.max_value
        value = c
    assert str(value) == ex.answer
    # The story mentions the operands in order.
    operands = [int(x) for x in re.findall(r"\d+", ex.prompt)]
    assert operands == [start] + [int(EQ.match(s).group(3)) for s in steps]
    return len(steps)


def test_synthetic_deterministic_by_seed():
    cfg = SyntheticTaskConfig()
    a = generate_examples(cfg, 50, seed=7)
    b = generate_examples(cfg, 50, seed=7)
    c = generate_examples(cfg, 50, seed=8)
    assert a == b
    assert a != c
    assert generate_examples(cfg, 20, seed=7) == a[:20]


def test_synthetic_example_format():
    ex = generate_examples(SyntheticTaskConfig(), 1, seed=0)[0]
    assert ex.prompt.endswith("?") and " How many " in ex.prompt
    assert ex.solution.endswith(f"#### {ex.answer}")
    assert ex.answer.isdigit()


def test_synthetic_answers_correct_and_in_range():
    cfg = SyntheticTaskConfig(max_operand=9, max_value=30)  # small range: forces both + and -
    exs = generate_examples(cfg, 2000, seed=3)
    ops = " ".join(ex.solution for ex in exs)
    assert " + " in ops and " - " in ops
    for ex in exs:
        check_solution(ex, cfg)


def test_synthetic_long_tail_of_steps():
    cfg = SyntheticTaskConfig(min_steps=1, max_steps=8, continue_prob=0.55)
    steps = [check_solution(ex, cfg) for ex in generate_examples(cfg, 3000, seed=11)]
    assert min(steps) == 1
    assert max(steps) == 8  # the cap is reached (p ~ 1.5% per problem)
    assert all(1 <= s <= 8 for s in steps)
    mean = statistics.mean(steps)
    # E = 1 + sum_{k=1..7} 0.55^k ~= 2.20
    assert 1.9 < mean < 2.5
    assert steps.count(1) > steps.count(2) > steps.count(4) > steps.count(8) > 0


def test_synthetic_words_cover_all_text():
    exs = generate_examples(SyntheticTaskConfig(), 3000, seed=5)
    words = set()
    for ex in exs:
        words.update(w for w in (ex.prompt + " " + ex.solution).split() if w.isalpha())
    assert words <= set(SYNTHETIC_WORDS)
    assert len(SYNTHETIC_WORDS) < 60


def test_synthetic_splits_disjoint():
    cfg = SyntheticTaskConfig(num_train=1500, num_test=150, max_steps=3, continue_prob=0.3)
    train, test = synthetic_splits(cfg)
    assert len(train) == 1500 and len(test) == 150
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert len({e.prompt for e in test}) == 150
    train2, test2 = synthetic_splits(cfg)
    assert train == train2 and test == test2
    # The train split is the plain seeded draw.
    assert train == generate_examples(cfg, 1500, cfg.seed)


def test_synthetic_config_validation():
    with pytest.raises(ValueError, match="max_steps"):
        generate_examples(SyntheticTaskConfig(min_steps=3, max_steps=2), 1, 0)
    with pytest.raises(ValueError, match="continue_prob"):
        generate_examples(SyntheticTaskConfig(continue_prob=1.0), 1, 0)


# ----------------------------------------------------------------------------- file readers

GSM_ROWS = [
    {
        "question": "Natalia sold clips to 48 friends. How many?",
        "answer": "She sold 48/2 = <<48/2=24>>24 in May.\nTotal 48+24 = <<48+24=72>>72.\n#### 72",
    },
    {"question": "Big number?", "answer": "It is <<1000*2=2000>>2000 and 1,500 more.\n#### 3,500"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_gsm8k_parsing(tmp_path, fmt):
    writer = write_jsonl if fmt == "jsonl" else write_parquet
    path = writer(tmp_path / f"gsm.{fmt}", GSM_ROWS)
    exs = load_examples(path, "gsm8k", "question", "answer")
    assert [e.answer for e in exs] == ["72", "3500"]
    assert exs[0].prompt == GSM_ROWS[0]["question"]
    assert exs[0].solution == "She sold 48/2 = 24 in May.\nTotal 48+24 = 72.\n#### 72"
    assert "<<" not in exs[1].solution and exs[1].solution.endswith("#### 3,500")


DAPO_ROWS = [
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Compute 2+2."},
        ],
        "reward_model": {"ground_truth": "4", "style": "rule"},
    },
    {
        "prompt": [{"role": "user", "content": "Compute 3*3."}],
        "reward_model": {"ground_truth": "9", "style": "rule"},
    },
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_dapo_chat_prompts_and_nested_fields(tmp_path, fmt):
    writer = write_jsonl if fmt == "jsonl" else write_parquet
    path = writer(tmp_path / f"dapo.{fmt}", DAPO_ROWS)
    exs = load_examples(path, "prompt_answer", "prompt", "reward_model.ground_truth")
    assert [(e.prompt, e.answer, e.solution) for e in exs] == [
        ("Compute 2+2.", "4", None),
        ("Compute 3*3.", "9", None),
    ]


def test_prompt_answer_numeric_answer(tmp_path):
    path = write_jsonl(tmp_path / "abel.jsonl", [{"q": "x?", "a": 12}, {"q": "y?", "a": "1/2"}])
    assert [e.answer for e in load_examples(path, "prompt_answer", "q", "a")] == ["12", "1/2"]


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_examples(str(tmp_path / "nope.jsonl"), "gsm8k", "question", "answer")
    bad = tmp_path / "data.csv"
    bad.write_text("question,answer\n")
    with pytest.raises(DataError, match=r"data\.csv.*'\.csv'"):
        load_examples(str(bad), "gsm8k", "question", "answer")


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GSM_ROWS[0]) + "\n\n" + '{"question": "x", \n')
    with pytest.raises(DataError) as e:
        load_examples(str(path), "gsm8k", "question", "answer")
    assert "broken.jsonl:3" in str(e.value) and "invalid JSON" in str(e.value)


def test_missing_field_names_file_line_and_field(tmp_path):
    rows = [GSM_ROWS[0], GSM_ROWS[1], {"question": "no answer here"}]
    path = write_jsonl(tmp_path / "miss.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_examples(path, "gsm8k", "question", "answer")
    assert "miss.jsonl:3" in str(e.value) and "'answer'" in str(e.value)

    path = write_jsonl(tmp_path / "nested.jsonl", [DAPO_ROWS[0], {"prompt": "p", "reward_model": {}}])
    with pytest.raises(DataError) as e:
        load_examples(path, "prompt_answer", "prompt", "reward_model.ground_truth")
    assert "nested.jsonl:2" in str(e.value) and "'reward_model.ground_truth'" in str(e.value)


def test_parquet_missing_column_and_row(tmp_path):
    path = write_parquet(tmp_path / "cols.parquet", [{"question": "q", "other": "x"}])
    with pytest.raises(DataError) as e:
        load_examples(path, "gsm8k", "question", "answer")
    assert "cols.parquet" in str(e.value) and "row 0" in str(e.value) and "'answer'" in str(e.value)
    rows = [{"question": "q", "answer": "#### 1"}, {"question": "q2", "answer": None}]
    path = write_parquet(tmp_path / "rows.parquet", rows)
    with pytest.raises(DataError) as e:
        load_examples(path, "gsm8k", "question", "answer")
    assert "rows.parquet row 1" in str(e.value) and "'answer'" in str(e.value)


def test_gsm8k_without_marker(tmp_path):
    path = write_jsonl(tmp_path / "nomark.jsonl", [{"question": "q", "answer": "just 5"}])
    with pytest.raises(DataError, match=r"nomark\.jsonl:1.*####"):
        load_examples(path, "gsm8k", "question", "answer")


def test_chat_prompt_without_user(tmp_path):
    path = write_jsonl(tmp_path / "nouser.jsonl", [{"p": [{"role": "system", "content": "x"}], "a": "1"}])
    with pytest.raises(DataError, match=r"nouser\.jsonl:1.*'p'.*user"):
        load_examples(path, "prompt_answer", "p", "a")


def test_empty_data_set(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty"):
        load_examples(str(path), "gsm8k", "question", "answer")


# ----------------------------------------------------------------------------- prompt data sets


def test_prompt_dataset_chat_template(tok):
    exs = [Example("Ann has 3 apples . How many apples does Ann have ?", "3", "#### 3")]
    ds = PromptDataset(exs, tok, DataConfig(system_prompt="Be brief .", prompt_suffix=" Think ."))
    item = ds[0]
    assert item.prompt_text == (
        "<|im_start|>system\nBe brief .<|im_end|>\n<|im_start|>user\n"
        "Ann has 3 apples . How many apples does Ann have ? Think .<|im_end|>\n<|im_start|>assistant\n"
    )
    assert item.prompt_ids == tok(item.prompt_text, add_special_tokens=False)["input_ids"]
    assert item.prompt_ids[-2:] == tok.convert_tokens_to_ids(["<|im_start|>", "assistant"])
    assert (item.index, item.answer, item.solution) == (0, "3", "#### 3")
    plain = PromptDataset(exs, tok, DataConfig(use_chat_template=False))[0]
    assert plain.prompt_text == exs[0].prompt


def test_long_prompt_skip_vs_error(tok):
    exs = [
        Example("Ann has 3 apples . How many apples does Ann have ?", "3"),
        Example(" ".join(["Ann has 3 apples ."] * 40), "3", source="big.jsonl:2"),
        Example("Tom has 2 pens . How many pens does Tom have ?", "2"),
    ]
    ds = PromptDataset(exs, tok, DataConfig(max_prompt_tokens=64))
    assert len(ds) == 2 and ds.num_skipped == 1
    assert [it.index for it in ds] == [0, 2]
    assert [it.answer for it in ds] == ["3", "2"]
    with pytest.raises(DataError, match=r"big\.jsonl:2.*max_prompt_tokens=64"):
        PromptDataset(exs, tok, DataConfig(max_prompt_tokens=64, long_prompt_policy="error"))
    with pytest.raises(DataError, match="empty"):
        PromptDataset(exs[1:2], tok, DataConfig(max_prompt_tokens=64))


def test_build_datasets_synthetic(tok):
    cfg = DataConfig(test_size=50, synthetic=SyntheticTaskConfig(num_train=300, num_test=80))
    train, test = build_datasets(cfg, tok)
    assert len(train) == 300 and len(test) == 50
    assert not {it.prompt_text for it in train} & {it.prompt_text for it in test}
    unk = tok.unk_token_id
    assert all(unk not in it.prompt_ids for it in train)
    assert all(len(it.prompt_ids) <= cfg.max_prompt_tokens for it in train)
    assert train[0].solution.endswith("#### " + train[0].answer)


def test_build_datasets_file_split_and_test_path(tmp_path, tok):
    rows = [{"question": f"Ann has {i} apples ?", "answer": f"#### {i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(kind="gsm8k", train_path=path, test_size=5, shuffle_seed=3)
    train, test = build_datasets(cfg, tok)
    assert len(train) == 25 and len(test) == 5
    answers = sorted(int(it.answer) for it in list(train) + list(test))
    assert answers == list(range(30))
    _, test2 = build_datasets(cfg, tok)
    assert [it.answer for it in test2] == [it.answer for it in test]
    _, test3 = build_datasets(replace(cfg, shuffle_seed=4), tok)
    assert [it.answer for it in test3] != [it.answer for it in test]

    tpath = write_jsonl(tmp_path / "test.jsonl", rows[:12])
    train, test = build_datasets(replace(cfg, test_path=tpath), tok)
    assert len(train) == 30 and [it.answer for it in test] == ["0", "1", "2", "3", "4"]

    with pytest.raises(DataError, match="train_path"):
        build_datasets(DataConfig(kind="gsm8k"), tok)
    with pytest.raises(DataError, match="test_size"):
        build_datasets(replace(cfg, test_size=30), tok)


# ----------------------------------------------------------------------------- loader


def drain(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_loader_epochs_are_permutations_and_cross_boundaries():
    data = list(range(10))
    loader = PromptLoader(data, batch_size=4, seed=1)
    batches = drain(loader, 5)  # 20 items = exactly two epochs
    flat = [x for b in batches for x in b]
    assert all(len(b) == 4 for b in batches)
    assert sorted(flat[:10]) == data and sorted(flat[10:]) == data
    assert flat[:10] != flat[10:]  # each epoch has its own permutation
    assert batches[2] == flat[8:12]  # this batch spans the epoch boundary
    assert loader.state_dict() == {"epoch": 2, "position": 0, "seed": 1, "dataset_size": 10}


def test_loader_deterministic_by_seed():
    a = drain(PromptLoader(list(range(17)), 5, seed=3), 8)
    b = drain(PromptLoader(list(range(17)), 5, seed=3), 8)
    c = drain(PromptLoader(list(range(17)), 5, seed=4), 8)
    assert a == b and a != c


def test_loader_batch_larger_than_data():
    loader = PromptLoader([0, 1, 2], batch_size=7, seed=0)
    b = loader.next_batch()
    assert len(b) == 7 and sorted(b[:3]) == [0, 1, 2] and sorted(b[3:6]) == [0, 1, 2]


@pytest.mark.parametrize("steps_before", [0, 1, 2, 3, 5, 7])
def test_loader_resume_identical(steps_before):
    # 12 items, batch 4: steps 3 and 6 end exactly at an epoch boundary.
    data = list(range(12))
    ref = PromptLoader(data, 4, seed=9)
    expected = drain(ref, steps_before + 6)[steps_before:]

    first = PromptLoader(data, 4, seed=9)
    drain(first, steps_before)
    state = json.loads(json.dumps(first.state_dict()))  # plain ints survive serialisation
    assert all(type(v) is int for v in state.values())

    resumed = PromptLoader(data, 4, seed=123)  # the saved seed wins
    resumed.load_state_dict(state)
    got = drain(resumed, 6)
    assert got == expected
    assert all(len(b) == 4 for b in got)


def test_loader_resume_at_unnormalised_epoch_end():
    data = list(range(6))
    ref = PromptLoader(data, 3, seed=0)
    expected = drain(ref, 4)[2:]
    resumed = PromptLoader(data, 3, seed=0)
    resumed.load_state_dict({"epoch": 0, "position": 6, "seed": 0})
    assert drain(resumed, 2) == expected


def test_loader_rejects_changed_dataset():
    state = PromptLoader(list(range(5)), 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="5 prompts"):
        PromptLoader(list(range(6)), 2, seed=0).load_state_dict(state)
