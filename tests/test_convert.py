"""Hugging Face import/export (golden logits, exact round trips, streaming, errors), training
and inference from a converted model, and head calibration (SPEC §5, the conversion issue)."""

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch  # noqa: E402  (dev extra: the golden references)
import transformers  # noqa: E402
from helpers import tiny

import segexec_jax as sx
from segexec_jax.convert import ConvertError, FullAttentionWarning, from_hf, to_hf
from segexec_jax.convert import main as convert_main
from segexec_jax.data.tokenization import ByteTokenizer, load_tokenizer
from segexec_jax.evaluation.calibrate import choose, needle_rows, retrieval_scores
from segexec_jax.evaluation.calibrate import main as calibrate_main
from segexec_jax.interop import safetensors_io as st
from segexec_jax.training import loop as train
from segexec_jax.training.checkpoint import Checkpointer, layout

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
FAMILIES = {
    "llama_gqa_odd_theta": ("Llama", dict(num_key_value_heads=2, rope_theta=12345.0, tie_word_embeddings=False)),
    "llama2_mha": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3_rope_scaling": ("Llama", dict(num_key_value_heads=1, rope_theta=500000.0, tie_word_embeddings=True,
                                          max_position_embeddings=1024,
                                          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                            high_freq_factor=4.0, original_max_position_embeddings=32))),
    "llama_linear_scaling": ("Llama", dict(num_key_value_heads=2, rope_scaling=dict(rope_type="linear", factor=4.0))),
    "mistral": ("Mistral", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2_biases": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def hf_model(family: str, extra: dict, seed: int = 0, dtype=None):
    torch.manual_seed(seed)
    config = getattr(transformers, f"{family}Config")(**SMALL, **extra)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # sharper than the default init, biases included
            p.normal_(0.0, 0.15)
    return model.to(dtype) if dtype is not None else model


def save_hf(model, path: Path, shard: str | None = None):
    model.save_pretrained(path, max_shard_size=shard or "50MB")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]", "</s>"]))
    tok.save(str(path / "tokenizer.json"))


FULL = ["attention.mode=full", "model.dtype=float32", "attention.backend=reference"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_golden_logits_against_transformers(tmp_path, name):
    family, extra = FAMILIES[name]
    model = hf_model(family, extra)
    save_hf(model, tmp_path / "hf", shard="20KB" if name == "llama2_mha" else None)  # sharded + index
    from_hf(tmp_path / "hf", tmp_path / "ours", FULL)
    cfg, params = sx.load_checkpoint(tmp_path / "ours")
    tokens = np.random.default_rng(0).integers(0, 300, (2, 40))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(sx.forward(params, cfg, tokens))
    assert np.abs(ours - ref).max() < 1e-4, np.abs(ours - ref).max()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_round_trip_reproduces_every_tensor(tmp_path, dtype):
    family, extra = FAMILIES["qwen2_biases"] if dtype == "float32" else FAMILIES["llama_gqa_odd_theta"]
    save_hf(hf_model(family, extra, dtype=getattr(torch, dtype)), tmp_path / "hf", shard="30KB")
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (tmp_path / "hf" / "chat_template.jinja").write_text(template)  # tokenizer files beyond tokenizer.json
    (tmp_path / "hf" / "added_tokens.json").write_text("{}")
    assert convert_main(["from-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    assert convert_main(["to-hf", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    a, b = st.Reader.open(tmp_path / "hf"), st.Reader.open(tmp_path / "back")
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        x, y = a[name], b[name]
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    ours = sx.load_config(tmp_path / "ours")  # plus our settings (test_round_trip_keeps_our_settings)
    assert back.pop("segexec")["segment"]["len"] == ours.segment.len
    assert back == json.loads((tmp_path / "hf" / "config.json").read_text())
    for f in ("tokenizer.json", "chat_template.jinja", "added_tokens.json"):
        assert (tmp_path / "back" / f).read_bytes() == (tmp_path / "hf" / f).read_bytes(), f
    from segexec_jax.data.tokenization import apply_chat_template

    assert apply_chat_template(load_tokenizer(str(tmp_path / "ours")), "hi") == "<user>hi"


@pytest.mark.filterwarnings("ignore::segexec_jax.convert.FullAttentionWarning")  # its own test below
def test_exported_trained_model_loads_in_transformers(tmp_path):
    cfg = tiny("model.tie_embeddings=false", "train.steps=1", "train.seq_len=32", "train.batch_size=2",
               "segment.len=16", "segment.tail=4", "segment.retrieval.budget=4", "segment.retrieval.query_window=4",
               "mesh.data=1", "eval.every=100", f"run.dir={tmp_path / 'run'}")
    train.run(cfg)
    to_hf(tmp_path / "run", tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    c2, params = sx.load_checkpoint(tmp_path / "run")
    c_full = c2.replace(attention=c2.attention.__class__(mode="full", backend="reference"))
    tokens = np.random.default_rng(1).integers(0, 256, (1, 30))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(sx.forward(params, c_full, tokens)) - ref).max() < 1e-4


def test_streaming_conversion_memory(tmp_path):
    """A model of 256 MiB (largest tensor 32 MiB) converts with a peak of allocated host memory
    (numpy arrays included, as tracemalloc sees them) near its largest tensors."""
    import tracemalloc

    d, L, F, V = 512, 24, 2048, 32768
    hf = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=V, hidden_size=d,
              intermediate_size=F, num_hidden_layers=L, num_attention_heads=8, num_key_value_heads=8,
              tie_word_embeddings=False, torch_dtype="bfloat16", rms_norm_eps=1e-6)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    shapes = [("model.embed_tokens.weight", (V, d))]
    for i in range(L):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
        shapes += [(p + f"self_attn.{n}_proj.weight", (d, d)) for n in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (F, d)), (p + "mlp.up_proj.weight", (F, d)),
                   (p + "mlp.down_proj.weight", (d, F))]
    shapes += [("model.norm.weight", (d,)), ("lm_head.weight", (V, d))]
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    st.write(tmp_path / "hf", "model", [(n, bf16, s) for n, s in shapes],
             (rng.standard_normal(s, np.float32).astype(bf16) for _, s in shapes), max_shard_bytes=64 * 2**20)
    total = sum(int(np.prod(s)) * 2 for _, s in shapes)
    largest = max(int(np.prod(s)) * 2 for _, s in shapes)
    tracemalloc.start()
    from_hf(tmp_path / "hf", tmp_path / "ours")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total > 250 * 2**20 and largest <= peak < 4 * largest < total / 2, (peak, largest, total)
    reader = st.Reader.open(tmp_path / "ours", "params")
    np.testing.assert_array_equal(reader["blocks.w_up.3"],
                                  st.Reader.open(tmp_path / "hf")["model.layers.3.mlp.up_proj.weight"][...].T)


def test_conversion_errors(tmp_path):
    family, extra = FAMILIES["llama_gqa_odd_theta"]
    save_hf(hf_model(family, extra), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2", architectures=["GPT2LMHeadModel"])))
    with pytest.raises(ConvertError, match="unsupported architecture 'GPT2LMHeadModel'"):
        from_hf(bad, tmp_path / "x")
    (tmp_path / "wide").mkdir()
    (tmp_path / "wide" / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=80)))
    for f in (tmp_path / "hf").glob("*.safetensors*"):
        (tmp_path / "wide" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConvertError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\), the config needs \(80, 64\)"):
        from_hf(tmp_path / "wide", tmp_path / "y")
    reader = st.Reader.open(tmp_path / "hf")
    keep = [n for n in reader.names() if n != "model.layers.1.mlp.up_proj.weight"]
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "config.json").write_text(json.dumps(cfg))
    st.write(tmp_path / "missing", "model", [(n, reader[n].dtype, reader[n].shape) for n in keep],
             (reader[n] for n in keep))
    with pytest.raises(ConvertError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        from_hf(tmp_path / "missing", tmp_path / "z")
    assert convert_main(["from-hf", "--hf-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "w")]) == 1


def test_converted_model_trains_and_generates_with_its_tokenizer(tmp_path):
    family, extra = FAMILIES["llama_gqa_odd_theta"]
    save_hf(hf_model(family, extra), tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "ours")
    cfg0, params0 = sx.load_checkpoint(tmp_path / "ours")
    over = [f"model.{k}={json.dumps(v)}" for k, v in cfg0.to_dict()["model"].items()]
    cfg = sx.load_config("tiny", over + [f"train.init_from={tmp_path / 'ours'}", "train.steps=1", "train.seq_len=32",
                                         "train.batch_size=2", "segment.len=16", "segment.tail=4",
                                         "segment.retrieval.budget=4", "segment.retrieval.query_window=4",
                                         "segment.long_heads=[0]", "model.param_dtype=float32", "mesh.data=1",
                                         "eval.every=100", "train.warmup_steps=1", f"run.dir={tmp_path / 'run'}"])
    train.run(cfg)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    from segexec_jax.data import pipeline as data

    tok = load_tokenizer(str(tmp_path / "ours"))
    batch = next(iter(data.dataset(cfg, tok, "train")))
    expected = sx.loss(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params0), cfg, batch["tokens"], None,
                       batch["doc_ids"])
    assert abs(records[0]["loss"] - float(expected)) < 1e-4  # step 1 saw the converted weights and tokenizer
    out = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--checkpoint", str(tmp_path / "ours"),
                          "--prompt", "the quick brown", "--max-new-tokens", "4", "--json",
                          "inference.max_len=64"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["results"][0]["tokens"]) == 4


def planted_model():
    """Layer 0 group 1 and layer 1 group 0 attend to earlier copies of the query's own token:
    their query and key projections share one projection onto RoPE's slowest dimensions."""
    cfg = tiny("model.rope_theta=1e9")
    params = sx.init_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    D, r = cfg.model.dim_head, cfg.model.group_size
    slow = [3, 4, 5, 6, 7]
    dims = slow + [i + D // 2 for i in slow]
    P = np.linalg.qr(rng.normal(size=(cfg.model.d_model, len(dims))))[0] * 3.0
    wq, wk = np.array(params["blocks"]["wq"]), np.array(params["blocks"]["wk"])
    for layer, g in [(0, 1), (1, 0)]:
        wk[layer, :, g, :] = 0
        wk[layer, :, g][:, dims] = P
        for h in range(g * r, (g + 1) * r):
            wq[layer, :, h, :] = 0
            wq[layer, :, h][:, dims] = P
    params["blocks"]["wq"], params["blocks"]["wk"] = jnp.asarray(wq), jnp.asarray(wk)
    return cfg, params


def test_calibration_finds_planted_heads(tmp_path):
    cfg, params = planted_model()
    tokens, first, second = needle_rows(256, 4, 512, 32, seed=0)
    scores = retrieval_scores(params, cfg, jnp.asarray(tokens), jnp.asarray(first), jnp.asarray(second), 32)
    assert scores.shape == (2, 2)
    assert scores[0, 1] > 2 * scores[0, 0] and scores[1, 0] > 2 * scores[1, 1]
    assert choose(scores, 2, 1) == ([0, 1], {0: [1], 1: [0]})
    assert choose(np.array([[0.1, 0.5], [0.2, 0.3], [0.9, 0.0]]), 1, 1) == ([2], {2: [0]})
    # end to end through a checkpoint and the override file the other commands accept
    ckpt = Checkpointer(tmp_path / "run", keep=1, asynchronous=False)
    state = dict(params=params, opt_state={}, step=jnp.zeros((), jnp.int32), rng=jnp.zeros((2,), jnp.uint32))
    ckpt.save(1, state, None, layout(cfg, "bytes"))
    ckpt.wait()
    ckpt.close()
    out = tmp_path / "heads.yaml"
    args = ["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--layers", "2", "--heads", "1",
            "--length", "512", "--span", "32", "--samples", "4"]
    assert calibrate_main(args + ["model.dtype=float32", "attention.backend=reference"]) == 0  # overrides
    assert "  long_heads: {0: [1], 1: [0]}\n" in out.read_text()  # the per-layer map, in one line
    chosen = sx.load_config("tiny", [str(out)])
    assert chosen.segment.long_layers == (0, 1) and dict(chosen.segment.long_heads) == {0: (1,), 1: (0,)}
    assert calibrate_main(args + ["model.no_such_key=1"]) == 1


def test_paper_recipe_layers_on_a_converted_model(tmp_path):
    family, extra = FAMILIES["llama_gqa_odd_theta"]
    save_hf(hf_model(family, extra), tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "ours")
    heads = tmp_path / "heads.yaml"
    heads.write_text("segment:\n  long_layers: [1]\n  long_heads: {1: [1]}\n")
    recipe = str(ROOT / "configs" / "llama2_7b_segexec.yaml")
    small = ["train.seq_len=64", "train.batch_size=2", "train.grad_accum=2", "segment.len=16", "segment.tail=4",
             "segment.retrieval.budget=4", "segment.retrieval.query_window=4", "segment.retrieval.block_size=4",
             "train.steps=1", "train.warmup_steps=1", "mesh.data=1", "eval.every=100", "model.param_dtype=float32",
             f"run.dir={tmp_path / 'run'}"]
    # a directory with config.yaml is a config; the recipe, then the calibrated heads, layer on it
    cfg = sx.load_config(tmp_path / "ours", [recipe, str(heads), f"train.init_from={tmp_path / 'ours'}"] + small)
    base, _ = sx.load_checkpoint(tmp_path / "ours")
    assert cfg.model.rope_theta == base.model.rope_theta == 12345.0 and cfg.model.d_model == base.model.d_model
    assert cfg.attention.mode == "segmented" and cfg.segment.grad_horizon == 1
    assert cfg.train.lr == 2e-5 and cfg.train.grad_accum == 2
    assert cfg.segment.long_layers == (1,) and dict(cfg.segment.long_heads) == {1: (1,)}
    plain = sx.load_config("llama2_7b", [recipe])  # the LLaMA-2-7B shape under the recipe
    assert (plain.segment.len, plain.segment.tail, plain.segment.retrieval.budget) == (4096, 512, 512)
    assert (plain.train.steps, plain.train.batch_size, plain.train.grad_accum) == (1000, 8, 8)
    # (training from a converted model: test_converted_model_trains_and_generates_with_its_tokenizer)
    # the same weights under a model config that only matches in shape: refused, naming the keys
    wrong = sx.load_config(tmp_path / "ours", [recipe, str(heads), f"train.init_from={tmp_path / 'ours'}",
                                               "model.rope_theta=10000.0"] + small)
    with pytest.raises(sx.ConfigError, match="model.rope_theta"):
        train.run(wrong)


def saved_run(path: Path, *overrides: str, tokenizer: str = "bytes") -> tuple[sx.Config, dict]:
    """A tiny model saved as a training run would save it (no training: fast)."""
    cfg = tiny(*overrides)
    params = sx.init_params(cfg, seed=0)
    ckpt = Checkpointer(path, keep=1, asynchronous=False)
    state = dict(params=params, opt_state={}, step=jnp.zeros((), jnp.int32), rng=jnp.zeros((2,), jnp.uint32))
    ckpt.save(1, state, None, layout(cfg, tokenizer))
    ckpt.wait()
    ckpt.close()
    return cfg, params


# non-default in every section that config.json's Hugging Face fields do not carry
OURS = ["segment.long_heads={1: [0]}", "segment.sinks=2", "segment.grad_horizon=chain", "segment.remat=dots",
        "segment.retrieval.policy=topk_block", "segment.retrieval.refresh=32", "attention.backend=reference",
        "model.remat=dots", "model.init_std=0.05", "inference.max_len=2048", "inference.stream_window=128"]


def test_round_trip_keeps_our_settings(tmp_path):
    """to-hf then from-hf: the segment settings, attention mode and dtypes come back (they
    used to come back as the converter's defaults: S 4096, long layers [0, 1], bfloat16)."""
    cfg, params = saved_run(tmp_path / "run", *OURS)
    assert cfg.segment.len == 64 and cfg.segment.long_layers == (1,) and cfg.model.dtype == "float32"
    assert convert_main(["to-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert convert_main(["from-hf", "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, params_back = sx.load_checkpoint(tmp_path / "back")
    for section in ("model", "segment", "attention", "inference"):
        assert getattr(back, section) == getattr(cfg, section), section
    assert back.data.tokenizer == "bytes"
    block = json.loads((tmp_path / "hf" / "config.json").read_text())["segexec"]
    assert block["segment"]["len"] == 64 and block["attention"]["mode"] == "segmented"
    assert block["model"]["dtype"] == "float32" and block["tokenizer"] == "bytes"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_back)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    # overrides after --out still win over the block
    over = from_hf(tmp_path / "hf", tmp_path / "over", ["segment.sinks=0", "model.dtype=bfloat16"])
    assert over.segment.sinks == 0 and over.model.dtype == "bfloat16"
    assert dataclasses.replace(over.segment, sinks=2) == cfg.segment
    # a hand-written partial block: only the keys it names change
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf["segexec"] = {"segment": {"len": 256, "retrieval": {"budget": 32}}}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    part = from_hf(tmp_path / "hf", tmp_path / "part")
    assert (part.segment.len, part.segment.retrieval.budget, part.segment.retrieval.query_window) == (256, 32, 64)
    hf["segexec"] = {"segmnt": {}}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConvertError, match="segexec.segmnt"):
        from_hf(tmp_path / "hf", tmp_path / "bad")


TEXTS = ["Hello, world!\n\tdef f(x):  return x ** 2", "héllo — naïve 日本語 🙂 Ünïcödé"]


@pytest.mark.filterwarnings("ignore::segexec_jax.convert.FullAttentionWarning")  # its own test below
def test_byte_tokenizer_exports_for_transformers(tmp_path):
    saved_run(tmp_path / "run")
    to_hf(tmp_path / "run", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = ByteTokenizer()
    for text in TEXTS:
        ids = ours.encode(text)
        assert hf_tok.encode(text) == ids, text
        assert hf_tok.decode(ids) == text == ours.decode(ids)
        assert load_tokenizer(str(tmp_path / "hf")).encode(text) == ids  # our HFTokenizer reads it too
    assert len(hf_tok) == 256 and hf_tok.decode([0xFF, 0x41]) == ours.decode([0xFF, 0x41])  # invalid UTF-8
    # the files travel on through from-hf and to-hf again
    from_hf(tmp_path / "hf", tmp_path / "ours")
    to_hf(tmp_path / "ours", tmp_path / "again")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / f).read_bytes() == (tmp_path / "hf" / f).read_bytes()


@pytest.mark.filterwarnings("ignore::segexec_jax.convert.FullAttentionWarning")  # its own test below
def test_trained_run_exports_the_tokenizer_it_used(tmp_path):
    save_hf(hf_model(*FAMILIES["llama_gqa_odd_theta"]), tmp_path / "src")
    saved_run(tmp_path / "run", "model.vocab_size=300", tokenizer=str(tmp_path / "src" / "tokenizer.json"))
    to_hf(tmp_path / "run", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tmp_path / "src" / "tokenizer.json").read_bytes()
    assert "tokenizer" not in json.loads((tmp_path / "hf" / "config.json").read_text())["segexec"]


def test_to_hf_warns_that_transformers_runs_full_attention(tmp_path, capsys):
    saved_run(tmp_path / "run")
    with pytest.warns(FullAttentionWarning, match="full causal attention.*segment.len=64"):
        to_hf(tmp_path / "run", tmp_path / "hf")
    assert convert_main(["to-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf2")]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "full causal attention" in x]
    assert len(lines) == 1 and lines[0].startswith("warning: transformers will run"), lines
    saved_run(tmp_path / "full", "attention.mode=full")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FullAttentionWarning)
        to_hf(tmp_path / "full", tmp_path / "hf3")  # full attention: nothing to warn about
