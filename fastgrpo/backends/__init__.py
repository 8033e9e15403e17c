"""Policy backends: one parallel layout each, behind the PolicyBackend seam."""

from fastgrpo.backends.base import PolicyBackend, PolicyBatch, build_policy_batch

BACKENDS = ("torch", "deepspeed", "megatron")


def backend_options(cfg, lora=None) -> dict:
    """The backend-specific constructor arguments of a BackendConfig; ``lora``: the
    ``model.lora`` section (torch and deepspeed; check_config refuses it for megatron)."""
    opts: dict = {"gradient_checkpointing": bool(getattr(cfg, "gradient_checkpointing", False))}
    if cfg.name in ("torch", "deepspeed") and lora is not None and lora.enabled:
        opts["lora"] = lora
    if cfg.name == "deepspeed":
        opts["deepspeed_cfg"] = cfg.deepspeed
    if cfg.name == "megatron":
        opts["megatron_cfg"] = cfg.megatron
    return opts


def build_backend(name: str, **kwargs) -> PolicyBackend:
    if name == "torch":
        from fastgrpo.backends.torch_backend import TorchBackend

        return TorchBackend(**kwargs)
    if name == "deepspeed":
        from fastgrpo.backends.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(**kwargs)
    if name == "megatron":
        from fastgrpo.backends.megatron_backend import MegatronBackend

        return MegatronBackend(**kwargs)
    raise ValueError(f"backend.name={name!r} is not available; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "PolicyBackend", "PolicyBatch", "backend_options", "build_backend", "build_policy_batch"]
