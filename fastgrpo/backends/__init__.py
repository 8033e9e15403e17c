"""Policy backends: one parallel layout each, behind the PolicyBackend seam."""

from fastgrpo.backends.base import PolicyBackend, PolicyBatch, build_policy_batch

BACKENDS = ("torch",)  # deepspeed and megatron land with their issues


def build_backend(name: str, **kwargs) -> PolicyBackend:
    if name == "torch":
        from fastgrpo.backends.torch_backend import TorchBackend

        return TorchBackend(**kwargs)
    raise ValueError(f"backend.name={name!r} is not available; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "PolicyBackend", "PolicyBatch", "build_backend", "build_policy_batch"]
