"""Mixer registry: `@register_mixer(name, symbol)` on a mixer class makes it usable from YAML and layer patterns.

A mixer is a MegatronModule with Megatron's self-attention call signature and a nested `Config` dataclass derived
from `MixerConfig`. Registration is the only thing a new mixer file does to be picked up: `linear_moe.mixers`
imports every module in its package.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

_BY_NAME: dict[str, type] = {}
_BY_SYMBOL: dict[str, str] = {}
# Symbols reserved by the layer pattern grammar (FFN kinds and separators).
RESERVED_SYMBOLS = frozenset("-E0| ")


@dataclass(kw_only=True)
class MixerConfig:
    """Settings shared by every mixer; each mixer extends it with its own fields."""

    num_heads: int | None = None
    """Number of heads; default: model.num_attention_heads."""
    head_dim: int | None = None
    """Key/query head dimension; default: hidden_size // num_heads."""
    expand_v: float = 1.0
    """Value head dimension = head_dim * expand_v."""
    use_short_conv: bool = True
    """Apply a causal depthwise convolution (SiLU) to q, k and v."""
    conv_size: int = 4
    """Kernel size of the short convolution."""
    use_output_gate: bool = True
    """Gate the normalised output with swish(g_proj(x)) before o_proj."""
    norm_eps: float = 1e-5
    """Epsilon of the output RMSNorm."""
    backend: str | None = None
    """Kernel backend: null picks Triton on GPU and the pure-torch path on CPU; 'triton' or 'torch' forces one."""

    def resolve(self, hidden_size: int, num_attention_heads: int) -> None:
        """Fill defaults that depend on the model and check the result; raises ValueError naming the field."""
        if self.num_heads is None:
            self.num_heads = num_attention_heads
        if self.head_dim is None:
            if hidden_size % self.num_heads:
                raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={hidden_size}, or set head_dim")
            self.head_dim = hidden_size // self.num_heads
        if self.num_heads <= 0 or self.head_dim <= 0:
            raise ValueError(f"num_heads={self.num_heads} and head_dim={self.head_dim} must be positive")
        if self.conv_size < 1:
            raise ValueError(f"conv_size={self.conv_size} must be >= 1")
        if self.backend not in (None, "triton", "torch"):
            raise ValueError(f"backend={self.backend!r} must be null, 'triton' or 'torch'")
        vd = self.head_dim * self.expand_v
        if vd != int(vd) or vd <= 0:
            raise ValueError(f"head_dim * expand_v = {vd} must be a positive integer")

    @property
    def value_dim(self) -> int:
        return int(self.head_dim * self.expand_v)


def register_mixer(name: str, symbol: str):
    """Class decorator: register a mixer under a short lowercase `name` and a one-character pattern `symbol`."""
    if len(symbol) != 1 or symbol in RESERVED_SYMBOLS:
        raise ValueError(f"mixer symbol {symbol!r} must be one character, not one of {sorted(RESERVED_SYMBOLS)}")

    def deco(cls):
        if name in _BY_NAME and _BY_NAME[name] is not cls:
            raise ValueError(f"mixer name {name!r} is already registered by {_BY_NAME[name].__qualname__}")
        if symbol in _BY_SYMBOL and _BY_SYMBOL[symbol] != name:
            raise ValueError(f"mixer symbol {symbol!r} is already used by mixer {_BY_SYMBOL[symbol]!r}")
        cfg = getattr(cls, "Config", None)
        if not (isinstance(cfg, type) and issubclass(cfg, MixerConfig) and dataclasses.is_dataclass(cfg)):
            raise TypeError(f"mixer {cls.__qualname__} needs a nested dataclass `Config(MixerConfig)`")
        cls.mixer_name, cls.mixer_symbol = name, symbol
        _BY_NAME[name] = cls
        _BY_SYMBOL[symbol] = name
        return cls

    return deco


def _load_builtin() -> None:
    import linear_moe.mixers  # noqa: F401  (imports every mixer module, which registers it)


def registered() -> dict[str, type]:
    """Registered mixers by name, sorted."""
    _load_builtin()
    return dict(sorted(_BY_NAME.items()))


def get_mixer(name: str) -> type:
    _load_builtin()
    if name not in _BY_NAME:
        close = difflib.get_close_matches(name, _BY_NAME, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown mixer {name!r}{hint}; registered: {', '.join(sorted(_BY_NAME))}")
    return _BY_NAME[name]


def mixer_for_symbol(symbol: str) -> type:
    _load_builtin()
    if symbol not in _BY_SYMBOL:
        known = ", ".join(f"{s}={n}" for s, n in sorted(_BY_SYMBOL.items(), key=lambda x: x[1]))
        raise KeyError(f"unknown mixer symbol {symbol!r} in model.layer_pattern; known: {known}")
    return _BY_NAME[_BY_SYMBOL[symbol]]
