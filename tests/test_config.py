"""Typed configs: presets, dotted overrides, and one clear error per bad key (SPEC §5)."""

import dataclasses

import jax
import pytest

import segexec_jax as sx
from segexec_jax.config import FrozenMap, dump_config, long_heads_by_layer


@pytest.mark.parametrize("name", ["tiny", "1b", "llama2_7b"])
def test_presets_load_and_are_hashable(name):
    cfg = sx.load_config(name)
    assert hash(cfg) == hash(sx.load_config(name))
    assert cfg == sx.load_config(f"configs/{name}.yaml")


def test_paper_defaults_in_the_7b_preset():
    s = sx.load_config("llama2_7b").segment
    assert (s.len, s.tail, s.retrieval.budget, s.long_layers) == (4096, 512, 512, (6, 8, 11, 18))
    m = sx.load_config("llama2_7b").model
    assert (m.d_model, m.n_layers, m.n_heads, m.d_ff, m.vocab_size) == (4096, 32, 32, 11008, 32000)


def test_overrides_parse_types():
    cfg = sx.load_config("tiny", ["model.n_layers=3", "train.lr=1e-3", "model.tie_embeddings=false",
                                  "segment.long_layers=[0, 2]", "segment.grad_horizon=chain",
                                  "segment.long_heads={0: [1], 2: [0, 1]}", "data.files=[a.txt, b.jsonl]"])
    assert cfg.model.n_layers == 3 and cfg.train.lr == 1e-3 and cfg.model.tie_embeddings is False
    assert cfg.segment.long_layers == (0, 2) and cfg.segment.grad_horizon == "chain"
    assert isinstance(cfg.segment.long_heads, FrozenMap)
    assert long_heads_by_layer(cfg) == ((1,), (), (0, 1))
    assert cfg.data.files == ("a.txt", "b.jsonl")
    jax.jit(lambda x, c: x, static_argnums=1)(1.0, cfg)  # usable as a static argument


def test_roundtrip_through_yaml(tmp_path):
    cfg = sx.load_config("tiny", ["segment.long_heads={1: [0]}", "segment.grad_horizon=chain"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert sx.load_config(tmp_path / "config.yaml") == cfg


BAD = {
    # override -> fragment the one error message must contain (it names the key)
    "model.n_layer=3": "unknown config key 'model.n_layer'",
    "modle.n_layers=3": "unknown config key 'modle'",
    "segment.retrieval.polcy=topk": "unknown config key 'segment.retrieval.polcy'",
    "model.n_layers=two": "config key 'model.n_layers': expected an integer",
    "model.n_layers=2.5": "config key 'model.n_layers': expected an integer",
    "model.tie_embeddings=3": "config key 'model.tie_embeddings': expected true or false",
    "train.lr=fast": "config key 'train.lr': expected a number",
    "model.dtype=float16": "config key 'model.dtype': expected one of",
    "attention.mode=sliding": "config key 'attention.mode'",
    "segment.retrieval.policy=random": "config key 'segment.retrieval.policy'",
    "model.n_kv_heads=3": "config key 'model.n_kv_heads': model.n_heads (4) must be divisible by model.n_kv_heads (3)",
    "model.d_model=66": "config key 'model.d_model': must be divisible by model.n_heads (4)",
    "model.n_heads=3": "config key",  # 64 / 3 is not an integer either way
    "segment.tail=65": "config key 'segment.tail': the tail M (65) must be between 0 and segment.len S (64)",
    "segment.tail=-1": "config key 'segment.tail'",
    "segment.long_layers=[2]": "config key 'segment.long_layers': layer 2 is out of range for model.n_layers=2",
    "segment.long_layers=[1, 1]": "config key 'segment.long_layers': has duplicates",
    "segment.long_heads=[2]": "config key 'segment.long_heads': KV group 2 (layer 0) is out of range for model.n_kv_heads=2",
    "segment.long_heads={5: [0]}": "config key 'segment.long_heads': layer key 5 is out of range",
    "segment.long_heads=3": "config key 'segment.long_heads'",
    "segment.grad_horizon=-1": "config key 'segment.grad_horizon'",
    "segment.grad_horizon=forever": "config key 'segment.grad_horizon'",
    "segment.retrieval.budget=-4": "config key 'segment.retrieval.budget'",
    "segment.retrieval.query_window=65": "config key 'segment.retrieval.query_window'",
    "segment.sinks=100": "config key 'segment.sinks'",
    "segment.len=0": "config key 'segment.len': must be positive",
    "model.head_dim=7": "config key 'model.head_dim': RoPE needs an even head dimension",
    "train.batch_size=0": "config key 'train.batch_size': must be positive",
    "checkpoint.keep=0": "config key 'checkpoint.keep': must be positive",
    "mesh.tensor=3": "config key 'mesh.tensor'",
    "model=3": "config key 'model': expected a mapping",
    "model.n_layers.x=3": "'n_layers' is not a section",
}


@pytest.mark.parametrize("override", list(BAD))
def test_bad_config_raises_one_clear_error(override):
    with pytest.raises(sx.ConfigError) as err:
        sx.load_config("tiny", [override])
    assert BAD[override] in str(err.value)


def test_topk_block_constraints():
    with pytest.raises(sx.ConfigError, match="'segment.retrieval.block_size': must divide segment.len"):
        sx.load_config("tiny", ["segment.retrieval.policy=topk_block", "segment.retrieval.block_size=6"])
    with pytest.raises(sx.ConfigError, match="'segment.retrieval.budget': must be a multiple"):
        sx.load_config("tiny", ["segment.retrieval.policy=topk_block", "segment.retrieval.budget=12"])


def test_refresh_constraints():
    ok = sx.load_config("tiny", ["segment.retrieval.refresh=16", "segment.retrieval.query_window=16"])
    assert ok.segment.retrieval.refresh == 16 and sx.load_config("tiny").segment.retrieval.refresh is None
    bad = {"segment.retrieval.refresh=24": "'segment.retrieval.refresh': must divide segment.len (64)",
           "segment.retrieval.refresh=0": "'segment.retrieval.refresh': must divide",
           "segment.retrieval.refresh=8": "must be at least segment.retrieval.query_window (16)",
           "segment.retrieval.refresh=fast": "'segment.retrieval.refresh': expected"}
    for item, message in bad.items():
        with pytest.raises(sx.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            sx.load_config("tiny", ["segment.retrieval.query_window=16", item])
    with pytest.raises(sx.ConfigError, match="'segment.retrieval.refresh': needs a query-dependent policy"):
        sx.load_config("tiny", ["segment.retrieval.policy=all", "segment.retrieval.refresh=64"])


def test_missing_preset_and_malformed_override(tmp_path):
    with pytest.raises(sx.ConfigError, match="config 'nope' not found"):
        sx.load_config("nope")
    with pytest.raises(sx.ConfigError, match="must look like section.key=value"):
        sx.load_config("tiny", ["model.n_layers"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(sx.ConfigError, match="not valid YAML"):
        sx.load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(sx.ConfigError, match="must be a mapping of sections"):
        sx.load_config(listy)


def test_config_error_is_a_value_error():
    assert issubclass(sx.ConfigError, ValueError)
    cfg = sx.load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.n_layers = 4  # configs are immutable; use overrides or dataclasses.replace
