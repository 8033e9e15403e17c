"""FOR TESTS AND CPU-ONLY RUNS: make megatron-core 0.16.1 run on a CPU-only torch build with gloo.

Never apply this in a GPU run: it monkeypatches megatron-core (and ``torch.cuda.current_device``)
process-wide (it refuses when a GPU is visible). Nothing applies it implicitly: tests call
``enable_cpu_for_tests()``, and ``fastgrpo-train backend=megatron`` on a CPU-only machine refuses
to start unless ``FASTGRPO_MEGATRON_CPU=1`` asks for it (``megatron_ext.train.apply_cpu_compat_if_asked``).
``enable_cpu_for_tests()`` applies these patches, idempotently:

1. ``torch.cuda.current_device()`` returns ``torch.device("cpu")``: megatron passes it as the
   ``device=`` of every buffer it allocates (TP all-gathers, pipeline p2p shapes, rotary
   ``inv_freq.to(...)``, ...); a CPU-only build raises "Torch not compiled with CUDA enabled".
2. ``get_default_causal_mask`` builds its mask with a literal ``device="cuda"``
   (megatron/core/transformer/utils.py); used by the local spec's softmax when the attention mask
   is None. Replaced in utils and in fused_softmax, which imported it by name.
3. The CUDA RNG tracker (``tensor_parallel.random``): ``model_parallel_cuda_manual_seed`` and
   ``CudaRNGStatesTracker.add/fork`` read and write CUDA generator states. The CPU generator
   stands in for the CUDA one: ``torch.cuda.manual_seed`` / ``torch.cuda.get_rng_state`` and
   random.py's ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` act on it. The attention's
   dropout always runs inside ``get_cuda_rng_tracker().fork()``, so the tracker must exist even
   with dropout 0 (call ``model_parallel_cuda_manual_seed`` after ``initialize_model_parallel``,
   as a GPU run must too).
4. Literal ``device="cuda"`` in ``pipeline_parallel/schedules.py``: every schedule (no pipelining,
   1F1B, interleaved) allocates its token counter with ``torch.zeros([], ..., device="cuda")``.
   The global ``torch`` of each module in ``_MODULES_WITH_LITERAL_CUDA`` is swapped for a proxy
   whose tensor factories map "cuda" to CPU; everything else resolves to the real torch.
5. ``torch.cuda.synchronize()`` is a no-op: pipeline p2p (``batch_p2p_sync``) calls it after
   ``batch_isend_irecv``; on CPU there is no stream to wait for (gloo requests are already waited).
6. ``Tensor.cuda()`` returns the tensor itself: a tied model with PP > 1 moves the last stage's
   embedding copy with ``weight.data.cuda()`` before all-reducing it over the embedding group
   (``LanguageModule.setup_embeddings_and_output_layer``).
7. Megatron's DDP and optimizer (training, ``megatron_ext.train``): the optimizer, grad clipping,
   grad scaler, distributed optimizer and ``megatron.core.utils`` (grad-norm helpers) allocate
   with literal ``device="cuda"`` too, so they join the modules of patch 4; and they check
   parameter types by string (``param.type() == 'torch.cuda.FloatTensor'``), so ``Tensor.type()``
   with no arguments reports a CPU tensor under its CUDA name (``torch.FloatTensor`` ->
   ``torch.cuda.FloatTensor``). ``Tensor.type(dtype)`` (a conversion) is untouched.
"""

from __future__ import annotations

import importlib

import torch

_CPU = torch.device("cpu")
_enabled = False


def _cpu_current_device():
    return _CPU


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _no_op(*args, **kwargs) -> None:
    return None


def _stay_on_cpu(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return self


# Megatron modules that allocate with a literal device="cuda" on the code paths the tests run.
_MODULES_WITH_LITERAL_CUDA = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.utils",
)
_real_tensor_type = torch.Tensor.type


def _type_named_as_cuda(self: torch.Tensor, dtype=None, non_blocking: bool = False, **kwargs):
    if dtype is not None or kwargs:  # a conversion: the real thing
        return _real_tensor_type(self, dtype, non_blocking, **kwargs)
    name = _real_tensor_type(self)
    if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
        return "torch.cuda." + name[len("torch."):]
    return name


def _on_cpu(factory):
    def make(*args, device=None, **kwargs):
        return factory(*args, device=_CPU if device == "cuda" else device, **kwargs)

    return staticmethod(make)


class _TorchWithCpuDevice:
    """``torch`` for a megatron module, except that tensor factories put ``device="cuda"`` on CPU."""

    zeros, ones, empty, tensor = (_on_cpu(f) for f in (torch.zeros, torch.ones, torch.empty, torch.tensor))

    def __getattr__(self, name):
        return getattr(torch, name)


def is_enabled() -> bool:
    return _enabled


def enable_cpu_for_tests() -> None:
    """Apply the patches listed in the module docstring (once per process)."""
    global _enabled
    if _enabled:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_ext.cpu_compat is for CPU-only test processes; a GPU is visible")

    # 1. Device of megatron's allocations.
    torch.cuda.current_device = _cpu_current_device

    # 2. The default causal mask (attention_mask=None), in both modules that hold the name.
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    transformer_utils.get_default_causal_mask = _cpu_default_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_default_causal_mask

    # 3. CUDA RNG state -> CPU generator state.
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.manual_seed = torch.manual_seed
    torch.cuda.get_rng_state = _cpu_rng_state
    tp_random._get_cuda_rng_state = _cpu_rng_state
    tp_random._set_cuda_rng_state = _cpu_set_rng_state

    # 4. Literal device="cuda", scoped to the modules that use it.
    for module in _MODULES_WITH_LITERAL_CUDA:
        importlib.import_module(module).torch = _TorchWithCpuDevice()

    # 5. No CUDA streams to synchronize.
    torch.cuda.synchronize = _no_op

    # 6. .cuda() keeps tensors where they are.
    torch.Tensor.cuda = _stay_on_cpu

    # 7. Tensor type names as the optimizer expects them (the modules joined patch 4 above).
    torch.Tensor.type = _type_named_as_cuda

    _enabled = True
