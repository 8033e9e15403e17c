"""Per-GPU memory plan for a GRPO run (DESIGN.md 4): pure arithmetic over an architecture, a
parallel layout, a precision accounting and a rollout shape. ``fastgrpo-plan`` prints it.

The memory model needs no torch; only :func:`budget_rows` imports :mod:`fastgrpo.rollout.budget`
(the concurrency-aware N_verify/K/L formulas are reused from there, never re-derived).

Accounting (bytes per parameter, all configurable through :class:`Precision`):
- weights ``param_bytes`` (bf16: 2), gradients ``grad_bytes``, fp32 master copy ``master_bytes``,
  Adam moments ``optim_bytes`` (m + v in fp32: 8). Defaults: megatron bf16 = 2+4+4+8 = 18 B/param
  (bf16 params, fp32 main grads, fp32 master, fp32 m/v: Megatron-LM's table); deepspeed/torch bf16
  = 2+2+4+8 = 16 B/param (the ZeRO paper's 2+2+12); fp32 = 4+4+0+8 = 16 B/param.
- Sharding over data-parallel ranks: ZeRO-1 the optimizer (master + moments), ZeRO-2 also the
  gradients, ZeRO-3 also the weights (and the ZeRO-3 reference); megatron's distributed optimizer
  shards master + moments (its gradient buffer stays whole: 6 + 12/DP bytes/param).
- Megatron TP x PP: matrices split over TP, norms replicated, the vocab padded to a multiple of
  ``vocab_divisible_by * TP`` and split over TP; the embedding on the first stage, final norm and
  LM head on the last (a tied model keeps a copy there when PP > 1); layers split evenly.
- The draft (EAGLE head or independent LM) lives with the last stage, replicated on each of its TP
  ranks, in the policy's dtype, trained with torch AdamW (weights + grads + 2 moments, all in that
  dtype), with whole replicas of the embedding/LM head it shares when the policy's are sharded.
- Rollout buffers follow the code: the target's RaggedKVCache is [rows, kv_heads, S_max, d] per
  layer (K and V) + an int64 length per row, S_max = prompt + response + min(N_max, C_peak) tree
  slack; the EAGLE proposer adds a 1-layer cache of S_max + K_max*L_max slots and pending buffers
  [rows, S_max] of hidden states and int64 tokens; captured features (the target's final hidden
  state per response token) stay on the GPU until the draft update.
- LoRA (``lora_rank`` > 0, torch/deepspeed): the base weights are frozen, gradients and optimizer
  state exist only for the adapter (r * (in + out) per adapted projection), in fp32 on torch
  (peft keeps adapters of a bf16 model in fp32: 4+4+0+8 B) and in the backend's precision on
  deepspeed; the KL reference is the base model with the adapter off: no second copy.
- Activations are an estimate. With gradient checkpointing (backend.gradient_checkpointing;
  megatron: full recompute) each layer keeps only its input (s*b*h, 1F1B in-flight micro-batches)
  and one layer's working set s*b*h*(10 + 24/TP) bytes (Korthikanti et al. 2022, flash attention)
  lives at a time; without it every layer keeps its working set. LoRA adds per adapted projection
  its rank-r intermediate and, for fp32 adapters on a bf16 model, the fp32 copy of its input. Plus
  fp32 logits/log-softmax/grad on the last stage; the draft update holds ~4 fp32
  [token_budget, vocab] tensors (logits, target log-probs, log-softmax, grad).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fastgrpo.plan_training import activation_bytes, adapter_precision, policy_bytes

GiB = 1024**3
I64 = 8  # int64 bookkeeping tensors (lengths, pending tokens)
# model.lora's default targets for every modelled family (fastgrpo.models.lora.DEFAULT_TARGET_MODULES).
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    """A Llama/Qwen2-style decoder (SwiGLU MLP, RMSNorm, GQA), in HF config.json terms."""

    name: str
    num_layers: int  # num_hidden_layers
    hidden_size: int
    intermediate_size: int
    num_heads: int  # num_attention_heads
    num_kv_heads: int  # num_key_value_heads
    vocab_size: int
    tied_embeddings: bool  # tie_word_embeddings
    head_dim: int = 0  # 0: hidden_size // num_heads
    qkv_bias: bool = False  # Qwen2: q/k/v carry a bias
    o_bias: bool = False  # Llama attention_bias=True also biases o_proj
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    source: str = ""

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def kv_heads_per_rank(self, tp: int) -> int:
        """K/V heads one TP rank holds (replicated when TP exceeds them, as megatron does)."""
        if self.num_kv_heads % tp == 0:
            return self.num_kv_heads // tp
        if tp % self.num_kv_heads == 0:
            return 1
        raise ValueError(f"{self.name}: {self.num_kv_heads} kv heads cannot be split over TP={tp}")

    def layer_params(self, tp: int = 1) -> int:
        """Parameters of one decoder layer on one TP rank (norms and the o bias replicated)."""
        if self.num_heads % tp or self.intermediate_size % tp:
            raise ValueError(f"{self.name}: heads {self.num_heads} / ffn {self.intermediate_size} "
                             f"not divisible by TP={tp}")
        h, d, hq, kv = self.hidden_size, self.hd, self.num_heads // tp, self.kv_heads_per_rank(tp)
        n = 2 * h * hq * d + 2 * h * kv * d + 3 * h * (self.intermediate_size // tp) + 2 * h
        n += (hq + 2 * kv) * d if self.qkv_bias else 0
        n += h if self.o_bias else 0
        n += 2 * d if self.qk_norm else 0
        return n

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear projection of a decoder layer, by its HF name."""
        h, q, kv, f = self.hidden_size, self.num_heads * self.hd, self.num_kv_heads * self.hd, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}

    def lora_params(self, rank: int, targets: tuple[str, ...] = LORA_PROJECTIONS) -> int:
        """Parameters of a rank-``rank`` LoRA adapter on ``targets`` of every layer (A: r x in, B: out x r)."""
        shapes = self.projection_shapes()
        unknown = sorted(set(targets) - set(shapes))
        if unknown:
            raise ValueError(f"LoRA targets {unknown} are not projections of {self.name} ({', '.join(shapes)})")
        return self.num_layers * sum(rank * sum(shapes[t]) for t in targets)

    def total_params(self) -> int:
        """The HF checkpoint's parameter count (unpadded vocabulary)."""
        emb = self.vocab_size * self.hidden_size
        return self.num_layers * self.layer_params() + emb * (1 if self.tied_embeddings else 2) + self.hidden_size

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "") -> Arch:
        mtype = cfg.get("model_type", "")
        if cfg.get("mlp_bias"):
            raise ValueError(f"{name or mtype}: mlp_bias=True is not modelled")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{name or mtype}: only SwiGLU (hidden_act=silu) decoders are modelled")
        heads = cfg["num_attention_heads"]
        return cls(name=name or cfg.get("_name_or_path") or mtype, num_layers=cfg["num_hidden_layers"],
                   hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                   num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
                   vocab_size=cfg["vocab_size"], tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   head_dim=cfg.get("head_dim") or 0,
                   qkv_bias=mtype == "qwen2" or bool(cfg.get("attention_bias")),
                   o_bias=mtype != "qwen2" and bool(cfg.get("attention_bias")), qk_norm=mtype == "qwen3",
                   source=f"config.json (model_type={mtype})")


# Architecture presets: the config.json values of the public checkpoints.
ARCH_PRESETS: dict[str, Arch] = {
    a.name: a for a in (
        # meta-llama/Meta-Llama-3-70B(-Instruct): hidden 8192, intermediate 28672, 80 layers, 64 heads,
        # 8 kv heads, vocab 128256, tie_word_embeddings false -> 70.55B parameters.
        Arch("llama3-70b", 80, 8192, 28672, 64, 8, 128256, False, source="Meta-Llama-3-70B config.json"),
        # meta-llama/Llama-3.1-8B(-Instruct): 4096 / 14336 / 32 layers / 32 heads / 8 kv / 128256, untied.
        Arch("llama3.1-8b", 32, 4096, 14336, 32, 8, 128256, False, source="Llama-3.1-8B config.json"),
        # Qwen/Qwen2.5-7B(-Instruct): 3584 / 18944 / 28 layers / 28 heads / 4 kv / 152064, untied, qkv bias.
        Arch("qwen2.5-7b", 28, 3584, 18944, 28, 4, 152064, False, qkv_bias=True, source="Qwen2.5-7B config.json"),
        # Qwen/Qwen3-8B: 4096 / 12288 / 36 layers / 32 heads / 8 kv / 151936, head_dim 128, untied,
        # per-head q/k RMSNorm, no biases.
        Arch("qwen3-8b", 36, 4096, 12288, 32, 8, 151936, False, head_dim=128, qk_norm=True,
             source="Qwen3-8B config.json"),
        # Draft-sized LMs for draft=lm. Qwen/Qwen2.5-0.5B: 896 / 4864 / 24 / 14 / 2 / 151936, tied.
        Arch("qwen2.5-0.5b", 24, 896, 4864, 14, 2, 151936, True, qkv_bias=True, source="Qwen2.5-0.5B config.json"),
        # meta-llama/Llama-3.2-1B: 2048 / 8192 / 16 layers / 32 heads / 8 kv / 128256, head_dim 64, tied.
        Arch("llama3.2-1b", 16, 2048, 8192, 32, 8, 128256, True, head_dim=64, source="Llama-3.2-1B config.json"),
    )
}


def load_arch(model: str) -> Arch:
    """A preset name, or a folder (or file) holding an HF config.json."""
    if model in ARCH_PRESETS:
        return ARCH_PRESETS[model]
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise ValueError(f"model {model!r}: not a preset ({', '.join(ARCH_PRESETS)}) and no config.json there")
    with open(path, encoding="utf-8") as f:
        return Arch.from_hf_config(json.load(f), name=model)


def default_lm_draft(target: Arch, hidden_scale: float = 0.5, num_layers: int = 2) -> Arch:
    """The shape fastgrpo.draft.lm.small_lm_config builds when draft.init_path is unset: a tied Qwen2
    of half the hidden/MLP size (whole heads of the target's head size), 2 layers."""
    d = target.hd
    heads = max(1, int(target.hidden_size * hidden_scale) // d)
    kv = max(1, target.num_kv_heads * heads // target.num_heads)
    while heads % kv:
        kv -= 1
    return Arch(f"{target.name}-draft-lm", num_layers, heads * d, max(1, int(target.intermediate_size * hidden_scale)),
                heads, kv, target.vocab_size, True, qkv_bias=True, source="fastgrpo.draft.lm.small_lm_config")


# GPUs: total memory as nvidia-smi reports it (MiB).
GPUS: dict[str, tuple[str, float]] = {
    "h100": ("H100 80GB", 81559 / 1024),
    "h800": ("H800 80GB", 81559 / 1024),
    "h200": ("H200 141GB", 143771 / 1024),
}


@dataclass(frozen=True)
class Layout:
    backend: str = "megatron"  # megatron (TP x PP x DP) | deepspeed (ZeRO DP) | torch (DDP)
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 0  # deepspeed: 0..3
    distributed_optimizer: bool = True  # megatron: shard master + moments over DP
    vocab_divisible_by: int = 128  # megatron's vocab padding unit (times TP)

    def __post_init__(self) -> None:
        if self.backend not in ("megatron", "deepspeed", "torch"):
            raise ValueError(f"backend {self.backend!r}: megatron | deepspeed | torch")
        if min(self.tp, self.pp, self.dp) < 1:
            raise ValueError("tp, pp and dp must be >= 1")
        if self.backend != "megatron" and (self.tp > 1 or self.pp > 1):
            raise ValueError(f"the {self.backend} backend is data-parallel only: use backend=megatron for TP/PP")
        if self.backend == "deepspeed" and self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0..3, got {self.zero_stage}")

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def zero(self) -> int:
        return self.zero_stage if self.backend == "deepspeed" else 0

    def shard(self, what: str) -> int:
        """Divisor over DP for ``weights`` | ``grads`` | ``optim``."""
        if self.backend == "megatron":
            return self.dp if what == "optim" and self.distributed_optimizer else 1
        need = {"optim": 1, "grads": 2, "weights": 3}[what]
        return self.dp if self.zero >= need else 1

    def padded_vocab(self, arch: Arch) -> int:
        if self.backend != "megatron":
            return arch.vocab_size
        m = self.vocab_divisible_by * self.tp
        return -(-arch.vocab_size // m) * m

    def describe(self) -> str:
        if self.backend == "megatron":
            opt = "distributed optimizer" if self.distributed_optimizer else "replicated optimizer"
            return f"megatron TP={self.tp} x PP={self.pp} x DP={self.dp} ({self.world} GPUs, {opt})"
        return f"{self.backend} DP={self.dp}" + (f" ZeRO-{self.zero}" if self.backend == "deepspeed" else "")


@dataclass(frozen=True)
class Precision:
    param_bytes: int = 2
    grad_bytes: int = 4
    master_bytes: int = 4
    optim_bytes: int = 8  # Adam m + v

    @classmethod
    def named(cls, name: str, backend: str = "megatron") -> Precision:
        if name == "fp32":
            return cls(4, 4, 0, 8)
        if name == "bf16":
            return cls(2, 4 if backend == "megatron" else 2, 4, 8)
        raise ValueError(f"precision {name!r}: bf16 | fp32")

    def describe(self) -> str:
        b = (self.param_bytes, self.grad_bytes, self.master_bytes, self.optim_bytes)
        return "weights+grads+master+moments = " + "+".join(map(str, b)) + f" = {sum(b)} B/param"


@dataclass(frozen=True)
class RolloutShape:
    prompts_per_step: int = 32
    group_size: int = 8
    prompt_len: int = 1024
    response_len: int = 3072
    micro_batch: int = 1  # sequences per training forward/backward

    def rows_per_rank(self, dp: int) -> int:
        return -(-self.prompts_per_step * self.group_size // dp)


@dataclass(frozen=True)
class Options:
    draft: str = "eagle"  # eagle | lm | none
    draft_arch: Arch | None = None  # draft=lm: None = default_lm_draft(target)
    kl_beta: float = 0.04  # 0: no reference model
    reference_offload: bool = False
    features_on_cpu: bool = False
    draft_token_budget: int = 4096
    gpu: str = "h100"
    gpu_gib: float | None = None  # overrides the GPU's memory
    reserve_gib: float = 5.0  # CUDA context, NCCL buffers, allocator fragmentation
    lora_rank: int = 0  # > 0: a LoRA adapter of this rank is trained, the base weights frozen
    lora_targets: tuple[str, ...] = LORA_PROJECTIONS
    gradient_checkpointing: bool = True  # each layer keeps only its input; False: every activation


@dataclass
class StagePlan:
    stage: str
    params: int  # policy parameters held on this GPU (before ZeRO-3 sharding)
    items: dict[str, int] = field(default_factory=dict)  # component -> bytes
    phases: dict[str, int] = field(default_factory=dict)  # phase -> peak bytes


@dataclass
class Plan:
    model: str
    total_params: int
    trainable_params: int  # what gets gradients and optimizer state: all, or the LoRA adapter
    layout: str
    precision: str
    gpu: str
    capacity: int
    reserve: int
    rows_per_rank: int
    seq_slots: int  # S_max
    stages: list[StagePlan]
    peak: int = 0
    fits: bool = False
    max_rows_fit: int = 0  # rows per DP rank whose rollout buffers fit next to the persistent state
    budget: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PERSISTENT = ("weights", "grads", "optimizer", "reference", "draft", "draft heads")
GENERATION = ("gathered weights", "kv cache", "draft kv cache", "draft buffers", "features")
TRAINING = ("features", "activations (est.)")
DRAFT_UPDATE = ("features", "draft update (est.)")


def _ceil_div(n: int, k: int) -> int:
    return -(-n // k)


def kv_cache_bytes(arch: Arch, rows: int, seq_len: int, dtype_bytes: int, tp: int = 1, pp: int = 1,
                   layers: int | None = None) -> int:
    """RaggedKVCache bytes on one GPU: K and V [rows, kv_heads/TP, S, d] per local layer
    (num_layers/PP unless ``layers``) plus one int64 length per row."""
    n_layers = arch.num_layers // pp if layers is None else layers
    return 2 * n_layers * arch.kv_heads_per_rank(tp) * arch.hd * dtype_bytes * rows * seq_len + I64 * rows


def stage_params(arch: Arch, layout: Layout, stage: int) -> int:
    if arch.num_layers % layout.pp:
        raise ValueError(f"{arch.num_layers} layers do not split evenly over PP={layout.pp}")
    n = arch.num_layers // layout.pp * arch.layer_params(layout.tp)
    emb = layout.padded_vocab(arch) * arch.hidden_size // layout.tp
    first, last = stage == 0, stage == layout.pp - 1
    n += emb if first else 0
    if last:
        n += arch.hidden_size + (emb if not arch.tied_embeddings or not first else 0)
    return n


def draft_params(arch: Arch, opts: Options) -> int:
    """Trainable draft parameters (EAGLE: fc [h, 2h] + one target decoder layer + norm)."""
    if opts.draft == "eagle":
        return 2 * arch.hidden_size**2 + arch.layer_params() + arch.hidden_size
    if opts.draft == "lm":
        return (opts.draft_arch or default_lm_draft(arch)).total_params()
    return 0


def _stage(arch: Arch, layout: Layout, prec: Precision, shape: RolloutShape, opts: Options, stage: int,
           slack: int, slots: int) -> StagePlan:
    last = stage == layout.pp - 1
    p = stage_params(arch, layout, stage)
    b, rows = prec.param_bytes, shape.rows_per_rank(layout.dp)
    s_max = shape.prompt_len + shape.response_len + slack
    h = arch.hidden_size
    it: dict[str, int] = policy_bytes(arch, layout, prec, opts, p)
    drafting = last and opts.draft != "none"
    dparams = draft_params(arch, opts) if drafting else 0
    it["draft"] = dparams * b * 4  # weights + grads + AdamW m, v in the draft's dtype
    # Whole replicas of the embedding / LM head the draft shares, where this GPU lacks them whole
    # (TP or ZeRO-3 shards them; with PP > 1 the embedding is on the first stage; a tied model's
    # last stage keeps a copy of it, and one replica serves both).
    sharded = layout.tp > 1 or layout.zero == 3
    need_head = drafting and sharded
    need_emb = drafting and opts.draft == "eagle" and (sharded or (layout.pp > 1 and not arch.tied_embeddings))
    replicas = int(need_emb or need_head) if arch.tied_embeddings else need_emb + need_head
    it["draft heads"] = replicas * arch.vocab_size * h * b
    adapter = arch.lora_params(opts.lora_rank, opts.lora_targets) // layout.pp if opts.lora_rank else 0
    whole = p * b + adapter * adapter_precision(prec, layout.backend).param_bytes
    it["gathered weights"] = whole if layout.zero == 3 else 0
    it["kv cache"] = kv_cache_bytes(arch, rows, s_max, b, layout.tp, layout.pp)
    if drafting and opts.draft == "eagle":
        it["draft kv cache"] = kv_cache_bytes(arch, rows, s_max + slots, b, layers=1)
        it["draft buffers"] = rows * s_max * (h * b + I64) + I64 * rows  # pend_h, pend_tok, pend_len
    elif drafting:
        da = opts.draft_arch or default_lm_draft(arch)
        it["draft kv cache"] = kv_cache_bytes(da, rows, s_max + slots, b)
        it["draft buffers"] = rows * s_max * I64 + I64 * rows  # pend_tok, pend_len
    else:
        it["draft kv cache"] = it["draft buffers"] = 0
    it["features"] = rows * shape.response_len * h * b if drafting and not opts.features_on_cpu else 0
    it["activations (est.)"] = activation_bytes(arch, layout, prec, shape, opts, stage)
    it["draft update (est.)"] = 4 * opts.draft_token_budget * arch.vocab_size * 4 if drafting else 0
    pers = sum(it[k] for k in PERSISTENT)
    phases = {"generation": pers + sum(it[k] for k in GENERATION), "policy update": pers + sum(it[k] for k in TRAINING),
              "draft update": pers + sum(it[k] for k in DRAFT_UPDATE), "persistent": pers}
    name = "all" if layout.pp == 1 else ("first" if stage == 0 else "last" if last else f"stage {stage}")
    return StagePlan(name, p, it, phases)


def budget_rows(rows: int, params: Any = None, levels: list[int] | None = None) -> list[dict[str, Any]]:
    """N_verify, K, L (fastgrpo.rollout.budget.compute_budget) as concurrency falls from ``rows``."""
    from fastgrpo.rollout.budget import BudgetParams, compute_budget

    params = params or BudgetParams()
    if levels is None:
        levels, b = [], rows
        while b >= 1:
            levels.append(b)
            b //= 2
    out = []
    for b in sorted(set(levels), reverse=True):
        bud = compute_budget(b, params)
        out.append({"concurrency": b, "n_verify": bud.n_verify, "k": bud.k, "depth": bud.depth,
                    "tokens_per_forward": b * bud.n_verify, "mode": "speculative" if bud.speculative else "AR"})
    return out


def make_plan(arch: Arch, layout: Layout, prec: Precision, shape: RolloutShape, opts: Options = Options(),
              budget_params: Any = None, levels: list[int] | None = None) -> Plan:
    """The per-GPU plan. ``budget_params``: a fastgrpo.rollout.budget.BudgetParams (None: defaults);
    its C_peak/N_max set the tree slack of the KV cache and K_max*L_max the draft's tree slots."""
    from fastgrpo.rollout.budget import BudgetParams

    bp = budget_params or BudgetParams()
    slack = min(bp.n_max, bp.c_peak) if opts.draft != "none" else 1
    slots = bp.k_max * bp.l_max
    if opts.draft not in ("eagle", "lm", "none"):
        raise ValueError(f"draft {opts.draft!r}: eagle | lm | none")
    if opts.lora_rank and layout.backend == "megatron":
        raise ValueError("LoRA is modelled on the torch and deepspeed backends only (the megatron backend refuses "
                         "model.lora)")
    if opts.gpu_gib is None and opts.gpu not in GPUS:
        raise ValueError(f"gpu {opts.gpu!r}: one of {', '.join(GPUS)} (or give its memory in GiB)")
    gpu_name, gib = GPUS.get(opts.gpu, (opts.gpu, 0.0))
    gib = opts.gpu_gib or gib
    stages = sorted({0, layout.pp - 1})
    plans = [_stage(arch, layout, prec, shape, opts, s, slack, slots) for s in stages]
    rows = shape.rows_per_rank(layout.dp)
    cap, reserve = int(gib * GiB), int(opts.reserve_gib * GiB)
    peak = max(max(sp.phases[k] for k in ("generation", "policy update", "draft update")) for sp in plans)
    per_row = max(sum(sp.items[k] for k in GENERATION if k != "gathered weights") / rows for sp in plans)
    free = min(cap - reserve - sp.phases["persistent"] - sp.items["gathered weights"] for sp in plans)
    trainable = arch.lora_params(opts.lora_rank, opts.lora_targets) if opts.lora_rank else arch.total_params()
    notes = []
    if opts.lora_rank:
        notes.append(f"LoRA r={opts.lora_rank} on {', '.join(opts.lora_targets)}: {trainable / 1e6:.1f}M trainable "
                     f"parameters ({100 * trainable / arch.total_params():.2f}%); gradients and optimizer state for "
                     "the adapter only; the KL reference is the base model with the adapter off (no copy)")
    notes.append("activations: " + ("gradient checkpointing (each layer keeps its input, one layer recomputed at a "
                                    "time)" if opts.gradient_checkpointing else
                                    "no gradient checkpointing (every layer keeps its activations)"))
    if opts.draft != "none" and layout.tp * layout.pp > 1:
        notes.append("the draft and its buffers live on the last pipeline stage, replicated over its TP ranks")
    if layout.zero == 3:
        notes.append("gathered weights: the whole model; deepspeed.generation_gather_gb caps it (layer groups)")
    if layout.pp > 2:
        notes.append(f"stages 1..{layout.pp - 2} hold only their layers: less than the first stage")
    if layout.dp > 1:
        notes.append(f"rows per DP rank = {shape.prompts_per_step}*{shape.group_size}/{layout.dp} = {rows}")
    return Plan(model=arch.name, total_params=arch.total_params(), trainable_params=trainable,
                layout=layout.describe(), precision=_precision_line(prec, layout, opts),
                gpu=f"{gpu_name} ({gib:.1f} GiB)", capacity=cap, reserve=reserve, rows_per_rank=rows,
                seq_slots=shape.prompt_len + shape.response_len + slack, stages=plans, peak=peak,
                fits=peak <= cap - reserve, max_rows_fit=max(0, int(free // per_row)),
                budget=budget_rows(rows, bp, levels), notes=notes)


def _precision_line(prec: Precision, layout: Layout, opts: Options) -> str:
    if not opts.lora_rank:
        return prec.describe()
    return (f"frozen base weights {prec.param_bytes} B/param; LoRA adapter "
            + adapter_precision(prec, layout.backend).describe())


def with_dp_from_world(layout: Layout, world: int) -> Layout:
    """``layout`` with DP = world / (TP * PP) (nodes x gpus_per_node)."""
    if world % (layout.tp * layout.pp):
        raise ValueError(f"{world} GPUs are not a multiple of TP*PP = {layout.tp * layout.pp}")
    return replace(layout, dp=world // (layout.tp * layout.pp))


def gib(n: float) -> float:
    return n / GiB
