"""The benchmark and pretraining entry points run and write what the README documents (no
timing is asserted: these machines are shared)."""

from __future__ import annotations

import torch
from conftest import make_tiny_qwen2, torch_threads

from fastgrpo.bench.rollout import MODES, compare_modes, plot_speedup
from fastgrpo.draft import EagleDraft, load_draft_weights
from fastgrpo.rollout import SamplingParams

FIELDS = {"tokens_per_s", "tokens_per_s_runs", "speedup_vs_ar", "mean_accepted_len", "mean_tree_size", "mean_k",
          "mean_depth", "ar_step_frac", "draft_ms_per_spec_step", "verify_ms_per_spec_step", "speedup_vs_ar_row"}


def test_compare_modes_schema_and_plot(tmp_path):
    torch.manual_seed(0)
    model = make_tiny_qwen2(vocab=16)
    draft = EagleDraft(model)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    res = compare_modes(model, draft, prompts, SamplingParams(1.0, 0.95, 0, 12), c_peak=16, repeats=2,
                        with_hf=True)
    assert set(res) == {*MODES, "hf_generate"} and res["hf_generate"]["tokens_per_s"] > 0
    assert "verify_predicted_over_measured" in res["cost_model"]
    for m in MODES:
        assert FIELDS <= set(res[m]) and len(res[m]["tokens_per_s_runs"]) == 2
    assert res["ar"]["speedup_vs_ar"] == 1.0 and res["ar"]["mean_accepted_len"] == 1.0
    assert res["static"]["ar_step_frac"] == 0.0 and res["static"]["mean_tree_size"] > 2  # a fixed tree every step
    assert res["static"]["spec_steps"] == res["static"]["steps"] > 0 and res["ar"]["spec_steps"] == 0
    assert all(res[m]["outside_steps_ms"] > 0 for m in MODES)  # a prefill at least
    rates = res["cost_model"]["arm_rates"]
    assert rates["arms"][0] == "ar" and {len(v) for v in rates["by_log2_rows"].values()} == {len(rates["arms"])}
    assert "1" in rates["by_log2_rows"] and rates["by_log2_rows"]["1"][0] > 0  # 3 rows: bucket 1, AR measured
    result = {"c_peak": 16, "modes": {m: {"by_batch_size": {"3": res[m]}} for m in res}}
    png = plot_speedup(result, tmp_path / "speedup.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pretrain_draft_cli_writes_a_loadable_draft(tmp_path, monkeypatch):
    from fastgrpo.cli.pretrain_draft import main
    from fastgrpo.config import ModelConfig
    from fastgrpo.models import load_policy

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "draft.pt"
    assert main(["--model", "tiny", "--steps", "2", "--batch", "4", "--max-new-tokens", "8",
                 "--device", "cpu", "--out", str(out)]) == 0
    model, _ = load_policy(ModelConfig(path="tiny"), "cpu")
    draft = EagleDraft(model)
    load_draft_weights(draft, out)
    saved = torch.load(out, weights_only=True)
    assert saved["meta"] == {"kind": "eagle", "hidden_size": 256, "vocab_size": model.config.vocab_size}
    assert all(torch.equal(v, saved["draft"][k]) for k, v in draft.state_dict().items())


def test_e2e_modes_interleaved_take_the_same_updates(tmp_path, monkeypatch):
    """fastgrpo-bench e2e: every mode samples the same tokens for the same seeds (one uniform per
    response position), so interleaved runs see the same rewards step by step; the JSON has the
    fields the README lists and the Amdahl bound."""
    from fastgrpo.bench.training import bench_e2e, plot_e2e

    monkeypatch.chdir(tmp_path)
    with torch_threads(1):
        res = bench_e2e("tiny", None, tmp_path, steps=2, c_peak=16, modes=("ar", "cost_model+suffix"), skip=1,
                        say=lambda *a: None)
    ar, sfx = res["modes"]["ar"], res["modes"]["cost_model+suffix"]
    assert ar["reward"] == sfx["reward"]
    assert ar["speedup_vs_ar"] == 1.0 and sfx["speedup_vs_ar"] > 0 and res["e2e_bound"] > 1.0
    assert 0 < ar["generation_share"] < 1 and sfx["draft_update_share"] >= 0
    assert plot_e2e(res, tmp_path / "e2e.png").read_bytes()[:4] == b"\x89PNG"
