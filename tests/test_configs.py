"""Every shipped Hydra config composes onto the typed schema (a typo in a key fails here, not on
a cluster), and the paper's experiment files say what they claim."""

from __future__ import annotations

import pytest
from conftest import CONFIG_DIR, compose_raw

from fastgrpo.cli.train import to_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
GROUPS = {g: sorted(p.stem for p in (CONFIG_DIR / g).glob("*.yaml"))
          for g in ("model", "data", "rollout", "algo", "backend")}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    cfg = to_config(compose_raw(f"{group}={option}"))
    assert cfg is not None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    to_config(compose_raw(f"experiment={experiment}"))


@pytest.mark.parametrize("model,path", [("qwen2.5-7b", "/models/Qwen2.5-7B-Instruct"),
                                        ("llama3.1-8b", None)])
@pytest.mark.parametrize("data", ["gsm8k", "simplerl_abel", "dapo_math"])
def test_paper_settings_zero3_on_8_gpus(model, path, data):
    cfg = to_config(compose_raw(f"experiment=paper_{model}", f"data={data}"))
    assert cfg.backend.name == "deepspeed" and cfg.backend.deepspeed.zero_stage == 3
    assert cfg.rollout.mode == "fastgrpo" and cfg.draft.online
    assert cfg.data.kind == {"gsm8k": "gsm8k"}.get(data, "prompt_answer")
    assert data.split("_")[0] in (cfg.data.train_path or "").lower().replace("-", "_")
    assert cfg.algo.prompts_per_step % 8 == 0  # shards evenly over 8 data-parallel ranks
    if path:
        assert cfg.model.path == path


def test_deepspeed_options_are_typed():
    with pytest.raises(Exception, match="zero_stagee"):
        to_config(compose_raw("backend=deepspeed", "backend.deepspeed.zero_stagee=2"))
    cfg = to_config(compose_raw("backend=deepspeed", "backend.deepspeed.zero_stage=2"))
    assert cfg.backend.deepspeed.zero_stage == 2
