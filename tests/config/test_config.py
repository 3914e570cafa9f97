"""Registry and config validation: every bad input fails before any work, with an error naming the field."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from linear_moe.config import Config, ConfigError, apply_override, field_docs, from_dict, load_config
from linear_moe.registry import get_mixer, mixer_for_symbol, registered

LINEAR = {"linear_attention": "L", "retention": "R", "gla": "G", "deltanet": "N", "gated_deltanet": "D",
          "mamba2": "M"}
CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def cfg(*overrides: str) -> Config:
    return load_config(None, list(overrides))


def test_linear_mixers_registered_with_their_symbols():
    for name, sym in LINEAR.items():
        assert get_mixer(name).mixer_name == name and mixer_for_symbol(sym) is get_mixer(name)


def test_unknown_mixer_name_lists_registered():
    with pytest.raises(KeyError) as e:
        get_mixer("glaa")
    msg = e.value.args[0]
    assert "unknown mixer 'glaa'" in msg and "did you mean 'gla'" in msg
    assert msg.endswith("registered: " + ", ".join(registered()))


def test_unknown_mixer_in_yaml_section():
    with pytest.raises(ConfigError, match=r"model.mixers: unknown mixer 'deltanett'.*registered: .*deltanet"):
        from_dict(Config, {"model": {"mixers": {"deltanett": {}}}})


@pytest.mark.parametrize("data,match", [
    ({"model": {"hiden_size": 64}}, r"unknown config key 'model.hiden_size'; did you mean 'hidden_size'"),
    ({"model": {"mixers": {"gla": {"gate_low_rank": 8}}}},
     r"unknown config key 'model.mixers.gla.gate_low_rank'; did you mean 'gate_low_rank_dim'"),
    ({"model": {"mixers": {"mamba2": {"num_group": 2}}}},
     r"'model.mixers.mamba2.num_group'; did you mean 'num_groups'"),
], ids=["model", "gla", "mamba2"])
def test_unknown_key_did_you_mean(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Config, data)


@pytest.mark.parametrize("data,match", [
    ({"model": {"hidden_size": "big"}}, r"model.hidden_size: expected an integer, got 'big'"),
    ({"model": {"mixers": {"gla": {"use_short_conv": 1}}}}, r"model.mixers.gla.use_short_conv: expected true/false"),
    ({"model": {"mixers": {"gla": {"gate_logit_normalizer": "x"}}}},
     r"model.mixers.gla.gate_logit_normalizer: expected a number"),
    ({"model": {"mixers": {"linear_attention": {"feature_map": "elu1"}}}},
     r"model.mixers.linear_attention.feature_map='elu1' must be one of \['identity', 'elu'\] \(did you mean 'elu'"),
    ({"model": {"mixers": {"gla": {"num_heads": 2.5}}}}, r"model.mixers.gla.num_heads: expected int or NoneType"),
], ids=["int", "bool", "float", "literal", "optional-int"])
def test_wrong_type(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Config, data)


@pytest.mark.parametrize("overrides,match", [
    (["parallel.tensor=3", "model.layer_pattern=G-G-G-G-"],
     r"model.mixers.gla.num_heads=4 must be divisible by parallel.tensor=3"),
    (["parallel.tensor=2", "model.layer_pattern=D-D-D-D-", "model.mixers.gated_deltanet.num_heads=3",
      "model.mixers.gated_deltanet.head_dim=16"],
     r"model.mixers.gated_deltanet.num_heads=3 must be divisible by parallel.tensor=2"),
    (["model.layer_pattern=G-G-G-"], r"model.layer_pattern has 3 layers but model.num_layers=4"),
    (["model.layer_pattern=G-Q-G-G-"], r"unknown mixer symbol 'Q' in model.layer_pattern"),
    (["model.layer_pattern=G-GxG-G-"], r"layer 1: FFN symbol 'x' unknown"),
    (["model.layer_pattern=G-G-G-G", ], r"two symbols per layer"),
    (["model.layer_pattern=M-M-M-M-", "model.mixers.mamba2.num_groups=3"],
     r"model.mixers.mamba2: num_groups=3 must be >= 1 and divide num_heads=4"),
    (["model.layer_pattern=G-G-G-G-", "model.mixers.gla.gate_logit_normalizer=0"],
     r"model.mixers.gla: gate_logit_normalizer=0.0 must be > 0"),
    (["model.layer_pattern=D-D-D-D-", "model.mixers.gated_deltanet.A_init_min=0"],
     r"model.mixers.gated_deltanet: A_init_min=0.0 and A_init_max=16.0 must satisfy"),
    (["model.layer_pattern=N-N-N-N-", "model.mixers.deltanet.num_heads=3"],
     r"model.mixers.deltanet: num_heads=3 must divide hidden_size=128, or set head_dim"),
    (["model.layer_pattern=L-L-L-L-", "model.mixers.linear_attention.backend=cuda"],
     r"model.mixers.linear_attention: backend='cuda' must be null, 'triton' or 'torch'"),
], ids=["tp-default-heads", "tp-mixer-heads", "pattern-length", "unknown-symbol", "unknown-ffn", "odd-pattern",
        "mamba2-groups", "gla-normalizer", "gdn-A-range", "heads-hidden", "backend"])
def test_validation_names_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        cfg(*overrides)


def test_mom_topk_above_num_memories():
    with pytest.raises(ConfigError, match=r"topk=3 must be <= num_memories=2"):
        cfg("model.layer_pattern=X-X-X-X-", "model.mixers.mom.num_memories=2", "model.mixers.mom.topk=3")


def test_overrides_reach_nested_fields():
    c = cfg("model.layer_pattern=G- ME D- *E", "model.mixers.gla.gate_low_rank_dim=8",
            "model.mixers.mamba2.num_groups=2", "parallel.tensor=2", "parallel.sequence_parallel=true",
            "model.moe.num_experts=4", "train.seed=7", "optim.lr=3e-3")
    assert c.model.mixers["gla"].gate_low_rank_dim == 8
    assert c.model.mixers["mamba2"].num_groups == 2
    assert c.model.mixer_config("gated_deltanet").num_heads == 4  # defaults resolved from the model
    assert c.model.layers()[1] == ("mamba2", "moe") and c.parallel.tensor == 2 and c.train.seed == 7
    assert c.optim.lr == 3e-3  # YAML 1.1 would read "3e-3" as text


def test_moe_with_tensor_parallel_needs_sequence_parallel():
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel=true"):
        cfg("model.layer_pattern=*-*E*-*E", "parallel.tensor=2")


@pytest.mark.parametrize("bad,match", [
    ("model.hidden_size", r"must look like path.to.key=value"),
    ("model..hidden_size=3", r"empty key"),
    ("model.hidden_size.x=3", r"'hidden_size' is not a section"),
])
def test_malformed_override(bad, match):
    data = {"model": {"hidden_size": 64}}
    with pytest.raises(ConfigError, match=match):
        apply_override(data, bad)


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_every_config_field_has_a_docstring(name):
    """STYLE: a docstring under every field (the README's config reference is generated from them)."""
    cls = get_mixer(name).Config
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__qualname__} fields without a docstring: {missing}"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_yaml_validates(path):

    cfg = load_config(path)
    assert len(cfg.model.layers()) == cfg.model.num_layers
