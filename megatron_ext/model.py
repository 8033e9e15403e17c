"""A megatron-core GPTModel (local, non-Transformer-Engine spec) built from an HF Llama / Qwen2 / Qwen3
config (dense models only: mixture-of-experts families are refused).

``GPTArch`` is the architecture read (and validated) from the HF config; ``ShardLayout`` is one
(TP rank, PP rank) shard of it; ``build_gpt_model`` builds this rank's stage. The conversion in
``megatron_ext.convert`` works on ``GPTArch`` + ``ShardLayout`` alone, so it needs no process group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# Config attributes that give a model routed experts (Qwen2/3-MoE: num_experts, Mixtral:
# num_local_experts, DeepSeek: n_routed_experts); any of them > 0 is refused.
MOE_ATTRIBUTES = ("num_experts", "num_local_experts", "n_routed_experts")
# RoPE variants whose cos/sin are position * inv_freq with no extra attention scaling: megatron's
# RotaryEmbedding reproduces them exactly once it holds the checkpoint's inv_freq.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class GPTArch:
    """The architecture of a Llama / Qwen2 / Qwen3 checkpoint, in the terms megatron-core uses."""

    model_type: str
    vocab_size: int  # the checkpoint's (unpadded) vocabulary
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads (GQA)
    head_dim: int
    norm_eps: float
    tied_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int
    rope_type: str
    rope_theta: float
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each q and k head, before RoPE

    @classmethod
    def from_hf(cls, hf_config) -> GPTArch:
        """Validate ``hf_config`` (a transformers Llama / Qwen2 / Qwen3 config) and read its shape.
        Raises ValueError for anything the megatron model would silently get wrong."""
        model_type = getattr(hf_config, "model_type", None)
        qkv_bias = _check_family(hf_config, model_type)
        if getattr(hf_config, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        heads, groups = hf_config.num_attention_heads, hf_config.num_key_value_heads or hf_config.num_attention_heads
        if heads % groups:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {groups}")
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"RoPE scaling type {rope_type!r} is not supported by the megatron backend "
                f"(supported: {SUPPORTED_ROPE_TYPES})"
            )
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        return cls(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            ffn_hidden_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
            norm_eps=hf_config.rms_norm_eps,
            tied_embeddings=bool(hf_config.tie_word_embeddings),
            qkv_bias=qkv_bias,
            max_position_embeddings=hf_config.max_position_embeddings,
            rope_type=rope_type,
            rope_theta=float(rope["rope_theta"]),
            qk_norm=model_type == "qwen3",
        )

    def padded_vocab_size(self, tp_size: int, divisible_by: int = 128) -> int:
        """Megatron's vocab padding: a multiple of ``divisible_by * tp_size`` so every TP rank holds
        an equal, aligned slice. The extra rows are zeros; their logits must be stripped."""
        multiple = divisible_by * tp_size
        return -(-self.vocab_size // multiple) * multiple


def _check_family(hf_config, model_type) -> bool:
    """Refuse what the megatron model cannot build exactly (mixture-of-experts, other families,
    sliding-window attention, biases beyond Qwen2's q/k/v); returns whether q/k/v carry a bias."""
    experts = {a: getattr(hf_config, a, None) for a in MOE_ATTRIBUTES}
    experts = {a: n for a, n in experts.items() if isinstance(n, int) and n > 0}
    if experts or "moe" in str(model_type) or model_type == "mixtral":
        raise ValueError(f"model_type {model_type!r} is a mixture-of-experts model ({experts or 'MoE'}): the "
                         f"megatron backend supports dense {SUPPORTED_MODEL_TYPES} models only")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"megatron backend supports model_type {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    if hf_config.hidden_act != "silu":
        raise ValueError(f"only SwiGLU (hidden_act='silu') is supported, got {hf_config.hidden_act!r}")
    if model_type == "qwen2":
        if getattr(hf_config, "use_sliding_window", False):
            raise ValueError("Qwen2 use_sliding_window=True is not supported")
        return True  # Qwen2: q/k/v always carry a bias, o_proj never does
    if getattr(hf_config, "attention_bias", False):
        # Llama's / Qwen3's attention_bias also puts a bias on o_proj, which add_qkv_bias does not cover.
        raise ValueError(f"{model_type} attention_bias=True is not supported")
    sliding = [t for t in getattr(hf_config, "layer_types", None) or () if t != "full_attention"]
    if model_type == "qwen3" and (getattr(hf_config, "use_sliding_window", False) or sliding):
        raise ValueError(f"Qwen3 sliding-window attention (use_sliding_window=True, layer types "
                         f"{sorted(set(sliding))}) is not supported by the megatron backend")
    return False


def rope_inv_freq(hf_config) -> torch.Tensor:
    """The checkpoint's RoPE inverse frequencies, computed by transformers' own init function, so
    llama3 / linear scaling match HF exactly (megatron's built-in llama3 scaling hardcodes
    low/high_freq_factor 1/4 and original_max_position_embeddings 8192)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = GPTArch.from_hf(hf_config).rope_type
    if rope_type == "default":
        rope = hf_config.rope_parameters
        dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        return 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, device=torch.device("cpu"))
    if attention_scaling != 1.0:
        raise ValueError(f"RoPE {rope_type!r} with attention scaling {attention_scaling} is not supported")
    return inv_freq


@dataclass(frozen=True)
class ShardLayout:
    """Which part of the model one (TP rank, PP rank) holds."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    first_layer: int  # global index of this stage's first transformer layer
    num_local_layers: int
    padded_vocab_size: int

    @property
    def pre_process(self) -> bool:  # holds the word embedding
        return self.pp_rank == 0

    @property
    def post_process(self) -> bool:  # holds the final norm and the output layer
        return self.pp_rank == self.pp_size - 1

    @classmethod
    def for_rank(cls, arch: GPTArch, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int,
                 vocab_divisible_by: int = 128) -> ShardLayout:
        """Even layer split, as megatron does without uneven-pipeline settings."""
        if arch.num_layers % pp_size:
            raise ValueError(f"{arch.num_layers} layers do not split evenly over {pp_size} pipeline stages")
        if arch.num_attention_heads % tp_size or arch.ffn_hidden_size % tp_size:
            raise ValueError(f"attention heads / ffn size not divisible by tensor parallel size {tp_size}")
        if arch.num_query_groups % tp_size and tp_size % arch.num_query_groups:
            raise ValueError(f"{arch.num_query_groups} kv heads cannot be split over TP {tp_size}")
        per_stage = arch.num_layers // pp_size
        return cls(tp_rank, tp_size, pp_rank, pp_size, pp_rank * per_stage, per_stage,
                   arch.padded_vocab_size(tp_size, vocab_divisible_by))

    @classmethod
    def current(cls, arch: GPTArch, vocab_divisible_by: int = 128) -> ShardLayout:
        """This process's shard, from megatron's initialized parallel_state."""
        from megatron.core import parallel_state as ps

        return cls.for_rank(arch, ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
                            ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(),
                            vocab_divisible_by)


def transformer_config(arch: GPTArch, layout: ShardLayout, params_dtype: torch.dtype = torch.float32,
                       **overrides):
    """The megatron TransformerConfig for ``arch``: RMSNorm, SwiGLU, GQA, no biases except Qwen2's qkv,
    Qwen3's per-head q/k RMSNorm (``qk_layernorm``), no dropout. ``overrides`` go straight to
    TransformerConfig (e.g. recompute settings)."""
    from megatron.core.transformer import TransformerConfig

    kwargs = {
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "ffn_hidden_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_query_groups": arch.num_query_groups,
        "kv_channels": arch.head_dim,
        "normalization": "RMSNorm",
        "layernorm_epsilon": arch.norm_eps,
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "add_qkv_bias": arch.qkv_bias,
        # Also makes finalize_model_grads sum the replicated q/k norm weights' grads over TP.
        "qk_layernorm": arch.qk_norm,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "tensor_model_parallel_size": layout.tp_size,
        "pipeline_model_parallel_size": layout.pp_size,
        "params_dtype": params_dtype,
        "pipeline_dtype": params_dtype,
        "bf16": params_dtype == torch.bfloat16,
        "fp16": params_dtype == torch.float16,
        # Weights come from the checkpoint: skip megatron's random init (and its CUDA RNG use), and
        # allocate straight on torch.cuda.current_device() when there is a GPU.
        "perform_initialization": False,
        "use_cpu_initialization": not torch.cuda.is_available(),
    }
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def activation_recompute(enabled: bool) -> dict:
    """TransformerConfig overrides for megatron-core's activation recompute (gradient
    checkpointing): each layer's input is kept and its activations recomputed in the backward
    pass (granularity full, method uniform, one layer per checkpoint); {} when off."""
    if not enabled:
        return {}
    return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


def build_gpt_model(hf_config, params_dtype: torch.dtype = torch.float32, vocab_divisible_by: int = 128,
                    **config_overrides):
    """This rank's pipeline stage of a megatron-core GPTModel for ``hf_config`` (parallel_state must
    be initialized). Returns ``(model, arch, layout)``; load weights with
    ``megatron_ext.convert.load_hf_into_megatron``. The model outputs vocab-parallel logits
    [seq, batch, padded_vocab / tp] (``parallel_output=True``) on the last stage."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    arch = GPTArch.from_hf(hf_config)
    layout = ShardLayout.current(arch, vocab_divisible_by)
    config = transformer_config(arch, layout, params_dtype, **config_overrides)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=arch.qk_norm),
        vocab_size=layout.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=layout.pre_process,
        post_process=layout.post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
    )
    # Every stage owns a RotaryEmbedding; give it the checkpoint's exact frequencies (see
    # rope_inv_freq). It is a plain attribute, not a buffer: set it before the first forward,
    # since RotaryEmbedding.forward is lru_cached per sequence length.
    rotary = model.rotary_pos_emb
    rotary.inv_freq = rope_inv_freq(hf_config).to(rotary.inv_freq.device)
    return model, arch, layout
