"""Policy backends: one parallel layout each, behind the PolicyBackend seam."""

from fastgrpo.backends.base import PolicyBackend, PolicyBatch, build_policy_batch

BACKENDS = ("torch", "deepspeed", "megatron")


def backend_options(cfg) -> dict:
    """The backend-specific constructor arguments of a BackendConfig."""
    if cfg.name == "deepspeed":
        return {"deepspeed_cfg": cfg.deepspeed}
    if cfg.name == "megatron":
        return {"megatron_cfg": cfg.megatron}
    return {}


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
