"""The pretrain loop on Megatron-Core (`pretrain`), its checkpointing and the mixer telemetry hook.

Attributes load lazily: mixers import `linear_moe.training.telemetry` at import time, and that must not pull in the
training loop (which imports the mixers through the spec builder).
"""
_EXPORTS = {"TrainResult", "initialize", "pretrain", "shutdown"}


def __getattr__(name):
    if name in _EXPORTS:
        from linear_moe.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'linear_moe.training' has no attribute {name!r}")
