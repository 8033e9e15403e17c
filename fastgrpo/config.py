"""Typed configuration: one dataclass per concern.

Hydra composes the YAML files under ``configs/`` on top of these schemas (registered in
``fastgrpo.cli.train``), so an unknown key or a wrong type fails at start-up and names the key.
Library code receives these dataclasses (``OmegaConf.to_object``), never raw dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class LoraConfig:
    """``model.lora``: train a LoRA adapter (peft) instead of every weight (torch and deepspeed
    backends). The KL reference is the same model with the adapter switched off."""

    enabled: bool = False
    r: int = 16  # rank of the update B @ A
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapter's input while training (rollouts run without it)
    # Module names to adapt; null: the family's default (q/k/v/o and gate/up/down projections
    # for Qwen2/Qwen3/Llama/Mistral; fastgrpo.models.lora.DEFAULT_TARGET_MODULES).
    target_modules: Optional[list[str]] = None
    # save_hf also writes the merged model (W + alpha/r * B @ A) to <folder>/merged, an ordinary
    # HF folder; the adapter folder itself is always written.
    save_merged: bool = False


@dataclass
class ModelConfig:
    # A preset name ("tiny", "small": built from a config, own tokenizer) or a local HF folder.
    path: str = "tiny"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    # auto: flash_attention_2 on CUDA when flash-attn is installed (training, plain decoding),
    # sdpa otherwise. Tree verification always uses sdpa/eager (it needs an arbitrary mask).
    attn_implementation: str = "auto"
    # Where presets cache their tokenizer/initial weights; relative to the working folder.
    preset_cache_dir: str = ".cache/fastgrpo/presets"
    seed: int = 0  # initialisation seed for presets
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SyntheticTaskConfig:
    num_train: int = 4000
    num_test: int = 200
    seed: int = 1234
    min_steps: int = 1
    max_steps: int = 8
    # Probability of adding one more step: a geometric tail gives the long tail of response
    # lengths that makes concurrency fall during a rollout.
    continue_prob: float = 0.55
    max_operand: int = 9
    max_value: int = 99


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | gsm8k | prompt_answer (DAPO-Math, SimpleRL-Abel style)
    train_path: Optional[str] = None  # .jsonl or .parquet
    test_path: Optional[str] = None
    prompt_field: str = "question"
    answer_field: str = "answer"
    # gsm8k: the answer field holds a solution ending in "#### N"; prompt_answer: the final answer.
    use_chat_template: bool = True
    system_prompt: Optional[str] = None
    prompt_suffix: str = ""  # e.g. " Let's think step by step and output the final answer after ####."
    max_prompt_tokens: int = 128
    long_prompt_policy: str = "skip"  # skip (count and log) | error
    test_size: int = 200  # held-out prompts used for evaluation (from test_path or the split)
    shuffle_seed: int = 0
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)


@dataclass
class RolloutConfig:
    mode: str = "ar"  # ar | static | fastgrpo  (speculative modes: see fastgrpo/rollout)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    eval_temperature: float = 0.0  # greedy held-out evaluation
    # Speculative modes. The concurrency-aware budget (DESIGN.md 3):
    #   N = min(C_peak // B, n_max); K = min(N - 1, k_max); L = clamp(log2(N / alpha), l_min, l_max)
    c_peak: Optional[int] = None  # tokens per target forward at the knee; None = cached profile or measure once
    c_peak_cache_dir: str = ".cache/fastgrpo/c_peak"
    n_max: int = 160
    k_max: int = 8
    l_min: int = 3
    l_max: int = 5
    alpha: float = 0.75
    # How mode fastgrpo sizes its trees: cost_model (per step, the tree size with the most expected
    # tokens per second from online latency and acceptance models; AR when nothing beats AR) or
    # formula (the paper's N = C_peak // B above, the ablation).
    policy: str = "cost_model"
    t_max: int = 32  # cost_model: most tokens verified per row per step (the root included)
    probe_every: int = 32  # cost_model: per concurrency bucket, replay the least recently tried draft shape this often
    # How the concurrency signal is aggregated over data-parallel ranks: local | mean | max | sum.
    concurrency_aggregate: str = "local"
    # The `static` baseline: a fixed EAGLE-2 tree whatever the concurrency.
    static_tokens: int = 60
    static_topk: int = 10
    static_depth: int = 6


@dataclass
class DraftConfig:
    """The draft model of the speculative modes and its online learning (DESIGN.md 3)."""

    # eagle: a head on the target's hidden states; lm: an independent small causal LM sharing the
    # target's tokenizer (init_path = a local HF folder, e.g. Qwen2.5-0.5B; else a half-width
    # 2-layer Qwen2 built from the target's config), distilled online.
    kind: str = "eagle"
    online: bool = True  # update the draft after every policy update, from the rollout's features
    lr: float = 1e-4
    weight_decay: float = 0.0
    token_budget: int = 4096  # padded tokens per draft micro-batch
    init_path: Optional[str] = None  # a pretrained draft (.pt/.safetensors, or an HF folder for lm)
    # Rollouts per online update (0 = every rollout, as the paper): an evenly spaced subset. GRPO's
    # G samples of a prompt share most of their text, so a fraction teaches the draft nearly as much.
    max_sequences: int = 0
    # Online updates after every N-th GRPO step (1 = every step, as the paper). The rollouts of
    # the steps between carry no features (no copies) and the draft's cost falls N-fold; the
    # draft lags the policy by at most N - 1 updates.
    update_every: int = 1


@dataclass
class AlgoConfig:
    group_size: int = 8  # G samples per prompt
    prompts_per_step: int = 4
    clip_eps_low: float = 0.1
    clip_eps_high: float = 0.1  # > clip_eps_low gives DAPO clip-higher
    kl_beta: float = 0.04  # 0 builds no reference model
    kl_estimator: str = "k3"  # k1 | k2 | k3
    loss_agg: str = "token_mean"  # token_mean | seq_mean | dr_grpo
    std_normalize: bool = True
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal
    updates_per_batch: int = 1  # optimizer steps per rollout batch (1 = strictly on-policy)
    micro_batch_size: int = 8  # sequences per forward/backward (gradient accumulation)
    # Order the update's rows by length so each micro-batch pads to a similar width (HF Trainer's
    # group_by_length): the same loss and gradient up to float order, a fifth less compute on the
    # embedded default's long-tailed lengths.
    group_by_length: bool = True
    # verl's options. Dual-clip PPO: for A < 0 the token loss is capped at -A * clip_ratio_c
    # (> 1; verl's default 3); null = off. kl_clamp clamps the k3 estimate to [-kl_clamp, kl_clamp]
    # (verl's low_var_kl uses 10); null = off, so results are unchanged unless asked for.
    clip_ratio_c: Optional[float] = None
    kl_clamp: Optional[float] = None


@dataclass
class RewardFnConfig:
    name: str = "accuracy"  # a registered name or "module:function"
    weight: float = 1.0


@dataclass
class RewardConfig:
    functions: list[RewardFnConfig] = field(
        default_factory=lambda: [RewardFnConfig("accuracy", 1.0), RewardFnConfig("format", 0.2)]
    )
    timeout_s: float = 5.0  # per verification; math-verify can hang on pathological strings


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine


@dataclass
class DeepSpeedConfig:
    """``backend=deepspeed``: ZeRO data parallelism (the DeepSpeed JSON is built from these)."""

    zero_stage: int = 3  # 1 | 2 | 3
    offload_optimizer: str = "none"  # none | cpu
    offload_param: str = "none"  # none | cpu (ZeRO-3 only)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    # ZeRO-3 hybrid generation: GiB of gathered parameters allowed per GPU. The whole model is
    # gathered when it fits, else decoder layers are gathered in groups that fit. -1 = half of
    # the free device memory (the whole model on CPU).
    generation_gather_gb: float = -1.0
    # ZeRO-3 parameters at or below this many elements stay whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold); 0 partitions everything (the tests do).
    param_persistence_threshold: int = 100_000
    reference_offload: bool = False  # ZeRO-3 reference model's parameters on CPU
    # Raw DeepSpeed JSON merged last (escape hatch for anything not above).
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class MegatronConfig:
    """``backend=megatron``: megatron-core tensor x pipeline parallelism (megatron_ext/)."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    distributed_optimizer: bool = True  # shard optimizer state over data-parallel ranks
    reference_offload: bool = False  # the KL reference's weights on CPU between uses


@dataclass
class BackendConfig:
    name: str = "torch"  # torch | deepspeed | megatron
    ddp_backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    # Recompute each decoder layer's activations in the backward pass instead of keeping them:
    # HF gradient checkpointing (non-reentrant) on torch/deepspeed, megatron-core's full uniform
    # activation recompute (one layer per checkpoint) on megatron.
    gradient_checkpointing: bool = False
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)


@dataclass
class WarmupConfig:
    """Cold-start SFT on reference solutions, so a tiny model starts with non-zero reward."""

    enabled: bool = False
    steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    max_tokens: int = 256


@dataclass
class TrainerConfig:
    steps: int = 100
    eval_every: int = 0  # 0 = only before and after GRPO
    eval_size: int = 200
    # Sampled evaluation besides the greedy one: k samples per problem (rollout temperature/top_p)
    # on the first eval_k_size held-out problems give eval/mean@k and eval/pass@k; 0 = off.
    eval_k: int = 0
    eval_k_size: int = 200
    seed: int = 0
    output_dir: str = "outputs/run"
    max_nonfinite_in_a_row: int = 3
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0 = only at the end
    keep_last: int = 2
    resume: str = "none"  # none | auto | <path to a checkpoint folder>
    dir: Optional[str] = None  # default: <output_dir>/checkpoints


@dataclass
class TrackingConfig:
    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    uri: Optional[str] = None
    artifact_location: Optional[str] = None  # default: <cwd>/mlartifacts
    experiment: str = "fastgrpo"
    run_name: Optional[str] = None


@dataclass
class FastGRPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ---- checks ------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key (``section.key=value``)."""


# The accepted values of the string keys with a fixed set of choices. Kept here (no torch import)
# so that a typo fails at start-up, before any model is built; tests/test_cli_errors.py checks
# them against the modules that use them.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_implementation": ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3",
                                  "flex_attention"),
    "data.kind": ("synthetic", "gsm8k", "prompt_answer"),
    "data.long_prompt_policy": ("skip", "error"),
    "rollout.mode": ("ar", "static", "fastgrpo"),
    "rollout.policy": ("cost_model", "formula"),
    "rollout.concurrency_aggregate": ("local", "mean", "max", "sum"),
    "draft.kind": ("eagle", "lm", "suffix", "hybrid"),
    "algo.kl_estimator": ("k1", "k2", "k3"),
    "algo.loss_agg": ("token_mean", "seq_mean", "dr_grpo"),
    "optim.schedule": ("constant", "cosine"),
    "backend.name": ("torch", "deepspeed", "megatron"),
    "backend.ddp_backend": ("auto", "gloo", "nccl"),
}

# Numeric keys and the smallest value that can work.
MINIMUMS: dict[str, int] = {
    "trainer.steps": 0,
    "trainer.eval_every": 0,
    "trainer.eval_size": 0,
    "trainer.eval_k": 0,
    "trainer.eval_k_size": 1,
    "trainer.max_nonfinite_in_a_row": 1,
    "algo.group_size": 1,
    "algo.prompts_per_step": 1,
    "algo.updates_per_batch": 1,
    "algo.micro_batch_size": 1,
    "rollout.max_new_tokens": 1,
    "draft.max_sequences": 0,
    "draft.update_every": 1,
    "rollout.top_k": 0,
    "data.max_prompt_tokens": 1,
    "data.test_size": 1,
    "checkpoint.every": 0,
    "checkpoint.keep_last": 0,
}


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_config(cfg: FastGRPOConfig) -> FastGRPOConfig:
    """Raise :class:`ConfigError` naming the first key whose value cannot work (a choice that is
    not one of :data:`CHOICES`, a count below :data:`MINIMUMS`, a sampling parameter out of
    range). Cheap and model-free: ``fastgrpo-train`` runs it before building anything."""
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(choices)}")
    for key, low in MINIMUMS.items():
        value = _get(cfg, key)
        if value < low:
            raise ConfigError(f"{key}={value!r}: must be >= {low}")
    a = cfg.algo
    if a.clip_ratio_c is not None and not a.clip_ratio_c > 1:
        raise ConfigError(f"algo.clip_ratio_c={a.clip_ratio_c!r}: must be > 1 (dual-clip cap on -A * ratio), or null")
    if a.kl_clamp is not None and not (a.kl_clamp > 0 and a.kl_estimator == "k3"):
        raise ConfigError(f"algo.kl_clamp={a.kl_clamp!r}: must be > 0 and needs algo.kl_estimator=k3 "
                          f"(it is {a.kl_estimator!r}), or null")
    _check_lora(cfg)
    r = cfg.rollout
    if not r.temperature > 0:
        raise ConfigError(f"rollout.temperature={r.temperature!r}: must be > 0 (the policy's logits are divided by it)")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p={r.top_p!r}: must be in (0, 1]")
    if r.c_peak is not None and r.c_peak < 1:
        raise ConfigError(f"rollout.c_peak={r.c_peak!r}: must be >= 1 (or null: the cached profile, else measured)")
    if r.eval_temperature < 0:
        raise ConfigError(f"rollout.eval_temperature={r.eval_temperature!r}: must be >= 0 (0 = greedy)")
    return cfg


def _check_lora(cfg: FastGRPOConfig) -> None:
    lora = cfg.model.lora
    if not lora.enabled:
        return
    if cfg.backend.name == "megatron":
        raise ConfigError("model.lora.enabled=true: the megatron backend has no LoRA; use backend=torch or "
                          "backend=deepspeed (or model.lora.enabled=false)")
    if lora.r < 1:
        raise ConfigError(f"model.lora.r={lora.r!r}: must be >= 1")
    if not lora.alpha > 0:
        raise ConfigError(f"model.lora.alpha={lora.alpha!r}: must be > 0 (the update is scaled by alpha / r)")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout={lora.dropout!r}: must be in [0, 1)")
    if lora.target_modules is not None and not lora.target_modules:
        raise ConfigError("model.lora.target_modules=[]: name at least one module, or null for the family's default")
    if cfg.warmup.enabled and cfg.algo.kl_beta != 0:
        raise ConfigError("model.lora.enabled=true with warmup.enabled=true and algo.kl_beta != 0: the KL "
                          "reference of a LoRA policy is its base model (adapter off), which the warm-up does "
                          "not move; set warmup.enabled=false, or warm up without LoRA and point model.path at it")
