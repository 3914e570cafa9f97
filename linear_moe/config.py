"""One typed config tree, loaded from YAML, overridable as `path.to.key=value`.

Every YAML key maps 1:1 to a dataclass field. Unknown keys, wrong types and impossible combinations raise
`ConfigError` naming the field and the fix, before any work starts.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from linear_moe.registry import MixerConfig, get_mixer, mixer_for_symbol, registered

FFN_SYMBOLS = {"-": "dense", "E": "moe", "0": "none"}


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and the fix."""


@dataclass(kw_only=True)
class MoEConfig:
    """Megatron-Core MoE FFN settings, used by layers whose FFN symbol is 'E'."""

    num_experts: int = 8
    """Number of routed experts."""
    topk: int = 2
    """Experts per token."""
    ffn_hidden_size: int | None = None
    """Hidden size of each expert; default: model.ffn_hidden_size."""
    aux_loss_coeff: float = 0.01
    """Scale of Megatron's load-balancing loss."""
    grouped_gemm: bool = False
    """Use Megatron's grouped GEMM experts (needs a GPU and the grouped_gemm or TE kernels)."""
    token_dispatcher: Literal["allgather", "alltoall"] = "alltoall"
    """Megatron's MoE token dispatcher."""
    shared_expert_size: int | None = None
    """Hidden size of an always-on shared expert; null for none."""


@dataclass(kw_only=True)
class ModelConfig:
    """The network: sizes, the hybrid layer pattern and per-mixer settings."""

    hidden_size: int = 128
    """Model width."""
    num_layers: int = 4
    """Number of transformer layers; must equal the number of layers in layer_pattern."""
    layer_pattern: str = "X-*-X-*-"
    """Two symbols per layer: the mixer (see README) then the FFN ('-' dense MLP, 'E' MoE, '0' none). Spaces ignored."""
    num_attention_heads: int = 4
    """Heads of softmax attention and default heads of the linear mixers."""
    num_query_groups: int | None = None
    """Grouped-query attention groups for softmax attention; null means num_attention_heads."""
    ffn_hidden_size: int | None = None
    """Dense MLP hidden size; default 4 * hidden_size."""
    vocab_size: int = 256
    """Vocabulary size (padded up to a multiple of 128 * tensor parallel size by Megatron's rule)."""
    position_embedding: Literal["rope", "none"] = "rope"
    """Position embedding for softmax-attention layers; linear mixers use none."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Norm before each mixer and FFN."""
    tie_embeddings: bool = True
    """Share input embedding and output projection weights."""
    init_method_std: float = 0.02
    """Std of the normal weight init."""
    gated_mlp: bool = True
    """SwiGLU dense MLP and experts."""
    mixers: dict[str, MixerConfig] = field(default_factory=dict)
    """Per-mixer settings keyed by registry name (e.g. `mom: {num_memories: 4, topk: 2}`)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """MoE FFN settings."""

    def layers(self) -> list[tuple[str, str]]:
        """The pattern as [(mixer name, ffn kind)] per layer."""
        p = self.layer_pattern.replace(" ", "")
        if len(p) % 2:
            raise ConfigError(
                f"model.layer_pattern={self.layer_pattern!r} must hold two symbols per layer (mixer, FFN), "
                f"got an odd length {len(p)}")
        out = []
        for i in range(0, len(p), 2):
            m, f = p[i], p[i + 1]
            try:
                cls = mixer_for_symbol(m)
            except KeyError as e:
                raise ConfigError(str(e.args[0])) from None
            if f not in FFN_SYMBOLS:
                raise ConfigError(
                    f"model.layer_pattern layer {i // 2}: FFN symbol {f!r} unknown; use '-' (dense), 'E' (MoE), '0' (none)")
            out.append((cls.mixer_name, FFN_SYMBOLS[f]))
        return out

    def mixer_config(self, name: str) -> MixerConfig:
        """The resolved settings of one mixer (its defaults where the YAML gives none)."""
        if name not in self.mixers:
            self.mixers[name] = get_mixer(name).Config()
        cfg = self.mixers[name]
        cfg.resolve(self.hidden_size, self.num_attention_heads)
        return cfg


@dataclass(kw_only=True)
class ParallelConfig:
    """Megatron parallel sizes. World size = tensor * pipeline * context * data."""

    tensor: int = 1
    """Tensor-parallel size."""
    pipeline: int = 1
    """Pipeline-parallel size."""
    virtual_pipeline: int | None = None
    """Virtual pipeline stages per rank (interleaved schedule); null for none."""
    context: int = 1
    """Context-parallel size."""
    expert: int = 1
    """Expert-parallel size for MoE FFNs."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor > 1)."""


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (Megatron's optimizer and OptimizerParamScheduler)."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Final learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    clip_grad: float = 1.0
    """Gradient-norm clip; 0 disables (on CPU it is forced to 0: Megatron's clipping is CUDA-only)."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    decay_style: Literal["cosine", "linear", "constant", "WSD"] = "cosine"
    """Decay after warmup."""


@dataclass(kw_only=True)
class TrainConfig:
    """The training run."""

    steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per micro batch per data-parallel rank."""
    global_batch_size: int = 32
    """Sequences per optimizer step over all data-parallel ranks."""
    seq_length: int = 128
    """Tokens per sequence."""
    seed: int = 42
    """Seed for weights and data."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision (CPU mode uses fp32)."""
    log_interval: int = 10
    """Steps between log lines."""
    eval_interval: int = 50
    """Steps between evaluations; 0 disables."""
    eval_steps: int = 4
    """Micro batches per evaluation."""


@dataclass(kw_only=True)
class MQARConfig:
    """Synthetic multi-query associative recall (Zoology): key-value pairs, then queries of keys seen before."""

    num_kv_pairs: int = 8
    """Key-value pairs per sequence."""
    num_keys: int = 64
    """Size of the key alphabet (keys and values are disjoint token ranges)."""
    num_values: int = 64
    """Size of the value alphabet."""
    power_a: float = 0.01
    """Zoology's power-law query placement: p(gap) ~ a * gap^(a-1) in (0, 1]; small a puts queries near the context."""
    random_non_queries: bool = True
    """Fill positions outside the pairs and queries with random tokens (Zoology's default); false leaves them 0."""


@dataclass(kw_only=True)
class DataConfig:
    """Training data: the embedded synthetic MQAR task or a Megatron indexed dataset."""

    kind: Literal["mqar", "indexed"] = "mqar"
    """'mqar' (generated, deterministic by seed) or 'indexed' (Megatron .bin/.idx files)."""
    mqar: MQARConfig = field(default_factory=MQARConfig)
    """MQAR task settings."""
    path: str | None = None
    """Prefix of the indexed dataset (without .bin/.idx), for kind 'indexed'."""
    split: str = "98,2,0"
    """Train/valid/test split weights for the indexed dataset."""
    tokenizer: str = "byte"
    """'byte' (no download) or a path to a local HF tokenizer.json."""


@dataclass(kw_only=True)
class LoggingConfig:
    """Where logs, plots and checkpoints go."""

    dir: str = "runs/demo"
    """Run directory: tensorboard logs, metrics.jsonl, loss.png."""
    tensorboard: bool = True
    """Write tensorboard event files."""
    plot: bool = True
    """Write loss.png at the end of training."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    peak_tflops: float | None = None
    """Peak dense bf16 TFLOP/s of one GPU for the logged MFU; null looks it up by GPU name (H100, H200, A100, B200)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Megatron dist_checkpointing save and resume."""

    save: str | None = None
    """Directory to save checkpoints to; null disables saving."""
    interval: int = 0
    """Steps between saves; 0 saves only at the end."""
    load: str | None = None
    """Directory to resume from (its latest checkpoint); null starts fresh."""


@dataclass(kw_only=True)
class Config:
    """The root of the config tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel sizes."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training run."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logs and plots."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""

    def validate(self, world_size: int | None = None) -> None:
        """Check combinations across the tree; raise ConfigError naming the field and the fix."""
        m, p, t = self.model, self.parallel, self.train
        layers = m.layers()
        if len(layers) != m.num_layers:
            raise ConfigError(
                f"model.layer_pattern has {len(layers)} layers but model.num_layers={m.num_layers}; "
                "make them equal")
        for name in m.mixers:
            try:
                get_mixer(name)
            except KeyError as e:
                raise ConfigError(f"model.mixers: {e.args[0]}") from None
        for name in {n for n, _ in layers} | set(m.mixers):
            try:
                mc = m.mixer_config(name)
            except ValueError as e:
                raise ConfigError(f"model.mixers.{name}: {e}") from None
            if mc.num_heads % p.tensor:
                raise ConfigError(
                    f"model.mixers.{name}.num_heads={mc.num_heads} must be divisible by parallel.tensor={p.tensor}")
        if m.num_attention_heads % p.tensor:
            raise ConfigError(
                f"model.num_attention_heads={m.num_attention_heads} must be divisible by parallel.tensor={p.tensor}")
        if m.hidden_size % m.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={m.hidden_size} must be divisible by model.num_attention_heads="
                f"{m.num_attention_heads}")
        if any(f == "moe" for _, f in layers):
            if m.moe.topk > m.moe.num_experts:
                raise ConfigError(f"model.moe.topk={m.moe.topk} must be <= model.moe.num_experts={m.moe.num_experts}")
            if p.tensor > 1 and not p.sequence_parallel:
                raise ConfigError("MoE layers ('E' in model.layer_pattern) with parallel.tensor > 1 need "
                                  "parallel.sequence_parallel=true (Megatron's MoE requires it)")
            if m.moe.num_experts % p.expert:
                raise ConfigError(
                    f"model.moe.num_experts={m.moe.num_experts} must be divisible by parallel.expert={p.expert}")
        if p.sequence_parallel and p.tensor == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor > 1")
        if m.num_layers % p.pipeline:
            raise ConfigError(
                f"model.num_layers={m.num_layers} must be divisible by parallel.pipeline={p.pipeline}")
        if p.virtual_pipeline is not None:
            if p.pipeline < 2:
                raise ConfigError("parallel.virtual_pipeline needs parallel.pipeline >= 2")
            if m.num_layers % (p.pipeline * p.virtual_pipeline):
                raise ConfigError(
                    f"model.num_layers={m.num_layers} must be divisible by parallel.pipeline * "
                    f"parallel.virtual_pipeline={p.pipeline * p.virtual_pipeline}")
        if t.seq_length % (2 * p.context) and p.context > 1:
            raise ConfigError(
                f"train.seq_length={t.seq_length} must be divisible by 2 * parallel.context={2 * p.context}")
        if world_size is not None:
            mp = p.tensor * p.pipeline * p.context
            if world_size % mp:
                raise ConfigError(
                    f"world size {world_size} must be divisible by parallel.tensor * pipeline * context = {mp}")
            dp = world_size // mp
            if t.global_batch_size % (t.micro_batch_size * dp):
                raise ConfigError(
                    f"train.global_batch_size={t.global_batch_size} must be divisible by train.micro_batch_size * "
                    f"data-parallel size = {t.micro_batch_size * dp}")
            if p.expert > 1 and (dp * p.context * p.tensor) % p.expert:
                raise ConfigError(f"parallel.expert={p.expert} must divide data * context * tensor sizes")
        if self.data.kind == "indexed" and not self.data.path:
            raise ConfigError("data.kind='indexed' needs data.path (prefix of the .bin/.idx files)")
        if self.data.kind == "mqar":
            q = self.data.mqar
            need = 4 * q.num_kv_pairs
            if t.seq_length < need:
                raise ConfigError(
                    f"train.seq_length={t.seq_length} is too short for data.mqar.num_kv_pairs={q.num_kv_pairs}; "
                    f"need at least {need}")
            if 1 + q.num_keys + q.num_values > m.vocab_size:
                raise ConfigError(
                    f"model.vocab_size={m.vocab_size} must be >= 1 + data.mqar.num_keys + data.mqar.num_values = "
                    f"{1 + q.num_keys + q.num_values}")
            if q.num_kv_pairs > min(q.num_keys, q.num_values):
                raise ConfigError(
                    f"data.mqar.num_kv_pairs={q.num_kv_pairs} must be <= data.mqar.num_keys={q.num_keys} and "
                    f"data.mqar.num_values={q.num_values} (keys and values of a sample are distinct)")
        if t.steps <= 0 or t.micro_batch_size <= 0 or t.seq_length <= 0:
            raise ConfigError("train.steps, train.micro_batch_size and train.seq_length must be positive")
        if self.logging.peak_tflops is not None and self.logging.peak_tflops <= 0:
            raise ConfigError(f"logging.peak_tflops={self.logging.peak_tflops} must be > 0, or null to look it up")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}={value!r} must be one of {list(choices)}{hint}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    return value


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types; `where` is the dotted path for messages."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {path!r}{hint}")
        if cls is ModelConfig and key == "mixers":
            kwargs[key] = _mixers_from_dict(value, path)
        else:
            kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _mixers_from_dict(data: Any, where: str) -> dict[str, MixerConfig]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of mixer name -> settings, got {data!r}")
    out = {}
    for name, value in data.items():
        try:
            cls = get_mixer(name)
        except KeyError as e:
            raise ConfigError(f"{where}: {e.args[0]}") from None
        out[name] = from_dict(cls.Config, value, f"{where}.{name}")
    return out


def to_dict(obj: Any) -> Any:
    """The config tree as plain YAML-able data (inverse of from_dict)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_override(data: dict, override: str) -> None:
    """Apply one `path.to.key=value` override (value parsed as YAML) to the raw mapping."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like path.to.key=value")
    path, raw = override.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {override!r}: empty key in path {path!r}")
    node = data
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {override!r}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = _parse_value(raw)


def _parse_value(raw: str) -> Any:
    """An override value as YAML (numbers, booleans, null, lists); text YAML can't parse (e.g. '*-X-') stays text."""
    if not raw.strip():
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        # YAML 1.1 reads 3e-3 (no dot) as text; on the command line it is meant as a number
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML file (None: the embedded defaults), apply overrides, build and validate the tree."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    for o in overrides:
        apply_override(data, o)
    cfg = from_dict(Config, data)
    cfg.validate()
    return cfg


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (and its dataclass bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                doc = nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) else ""
                docs[node.target.id] = " ".join(str(doc).split())
    return docs


def config_reference() -> str:
    """The config reference as Markdown tables: every section of the tree, then each registered mixer's settings."""
    out = []

    def table(title: str, cls: type, path: str) -> None:
        docs = field_docs(cls)
        rows, nested = [], []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                nested.append((f.name, f.default_factory))
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
            shown = "{}" if isinstance(default, dict) and not default else yaml.safe_dump(default).strip()
            shown = shown.removesuffix("\n...").strip()
            rows.append(f"| `{path}{f.name}` | `{shown}` | {docs.get(f.name, '')} |")
        out.extend([f"#### {title}", "", "| key | default | meaning |", "|---|---|---|", *rows, ""])
        for name, sub in nested:
            table(f"`{path}{name}`", sub, f"{path}{name}.")

    for f in dataclasses.fields(Config):
        table(f"`{f.name}`", f.default_factory, f"{f.name}.")
    for name, cls in registered().items():
        table(f"`model.mixers.{name}` (symbol `{cls.mixer_symbol}`)", cls.Config, f"model.mixers.{name}.")
    return "\n".join(out)
