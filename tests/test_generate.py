"""Inference: generation is consistent with the training forward (SPEC §4), caches, sampling,
stops, the CLI and bad input."""

import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import F64, SHARP, max_abs_diff, tiny

import segexec_jax as sx
from segexec_jax.inference.generate import sample
from segexec_jax.segment.reference import reference_forward
from segexec_jax.training import loop as train

ROOT = Path(__file__).resolve().parent.parent
forward = jax.jit(sx.forward, static_argnums=1)
SEG = ["segment.len=8", "segment.tail=3", "segment.retrieval.budget=5", "segment.retrieval.query_window=4"]
MODES = {
    "topk": SEG,
    "topk_sinks": SEG + ["segment.sinks=2"],
    "topk_block": ["segment.len=8", "segment.tail=3", "segment.retrieval.policy=topk_block",
                   "segment.retrieval.budget=8", "segment.retrieval.block_size=4", "segment.retrieval.query_window=4"],
    "all": SEG + ["segment.retrieval.policy=all", "segment.sinks=1"],
    "none": SEG + ["segment.retrieval.policy=none"],
    "per_layer_heads": SEG + ["segment.retrieval.budget=20", "segment.long_layers=[0,1]",
                              "segment.long_heads={0: [0, 1], 1: [1]}"],
    "pool_on_host": SEG + ["inference.pool_on_host=true"],
    "refresh": SEG + ["segment.retrieval.refresh=4", "segment.sinks=1"],
    "refresh_block_on_host": ["segment.len=8", "segment.tail=3", "segment.retrieval.policy=topk_block",
                              "segment.retrieval.budget=4", "segment.retrieval.block_size=2",
                              "segment.retrieval.query_window=2", "segment.retrieval.refresh=2",
                              "inference.pool_on_host=true"],
    "full": ["attention.mode=full"],
    "streaming": ["attention.mode=streaming", "inference.stream_sinks=2", "inference.stream_window=6"],
}


def logprob_gap(params, cfg, prompts, result) -> float:
    """max |log p(token)| difference between generation and the forward on the final sequence."""
    worst = 0.0
    for b, seq in enumerate(result.sequences):
        logp = jax.nn.log_softmax(forward(params, cfg, np.array([seq])), axis=-1)[0]
        L, n = len(prompts[b]), int(result.num_generated[b])
        ref = np.asarray(logp[L - 1:L - 1 + n])[np.arange(n), seq[L:]]
        worst = max(worst, float(np.abs(ref - result.logprobs[b, :n]).max()))
    return worst


CASES = [pytest.param(name, lengths, marks=[pytest.mark.slow] if (lengths == (21,) and name not in ("topk", "full", "streaming"))
                      or name == "refresh_block_on_host" else []) for name in MODES for lengths in [(21,), (13, 5, 24)]]


@pytest.mark.parametrize("name,lengths", CASES)
def test_generation_logprobs_equal_the_forward(name, lengths):
    """Prompts that cross several segment boundaries and end mid-segment, a generation that
    crosses more, batch 1 and a ragged batch of 3; float32."""
    cfg = tiny(*SHARP, "inference.max_len=128", *MODES[name])
    params = sx.init_params(cfg, seed=1)
    rng = np.random.default_rng(sum(lengths))
    prompts = [rng.integers(0, 256, n).tolist() for n in lengths]
    result = sx.generate(params, cfg, prompts, max_new_tokens=19)
    assert result.tokens.shape == (len(lengths), 19) and (result.num_generated == 19).all()
    assert logprob_gap(params, cfg, prompts, result) < 1e-4


def test_prompt_ending_on_a_segment_boundary_and_sampling():
    cfg = tiny(*SHARP, "inference.max_len=96", *SEG, "segment.sinks=2")
    params = sx.init_params(cfg, seed=2)
    prompts = [list(range(10, 26)), list(range(40, 48)), [7]]  # 16 and 8: boundaries; 1 token
    result = sx.generate(params, cfg, prompts, max_new_tokens=20, temperature=0.8, top_k=50, top_p=0.9, seed=3)
    assert logprob_gap(params, cfg, prompts, result) < 1e-4


def test_refresh_prompts_ending_on_chunk_boundaries():
    """`refresh`: prompts that end right before a chunk (12 and 6 with S = 8, r = 2), on a
    segment boundary (16), and a generation that crosses both kinds of boundary."""
    cfg = tiny(*SHARP, "inference.max_len=96", *MODES["refresh_block_on_host"])
    params = sx.init_params(cfg, seed=4)
    prompts = [list(range(30, 42)), list(range(50, 56)), list(range(60, 76))]
    result = sx.generate(params, cfg, prompts, max_new_tokens=13)
    assert logprob_gap(params, cfg, prompts, result) < 1e-4


def test_streaming_forward_matches_the_streamingllm_reference(x64):
    cfg = tiny(*F64, *SHARP, "attention.mode=streaming", "inference.stream_sinks=2", "inference.stream_window=5")
    params = sx.init_params(cfg, seed=0)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 23))
    assert np.abs(np.asarray(forward(params, cfg, tokens)) - reference_forward(params, cfg, tokens)).max() < 1e-9
    full = tiny(*F64, *SHARP, "attention.mode=full", "attention.backend=reference")  # nothing evicted yet
    np.testing.assert_allclose(forward(params, cfg, tokens[:, :7]), forward(params, full, tokens[:, :7]), atol=1e-10)


def layer0_pool_entries(params, cfg, tokens) -> tuple[np.ndarray, np.ndarray]:
    """Pre-RoPE keys and values [T Gl D] of the long-range groups of layer 0, written out in
    numpy: layer 0's keys depend on nothing but each token (RMS norm of its embedding)."""
    m = cfg.model
    x = np.asarray(params["embed"], np.float64)[np.asarray(tokens)]
    blk = jax.tree.map(lambda a: np.asarray(a[0], np.float64), params["blocks"])
    h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + m.norm_eps) * blk["attn_norm"]["scale"]
    groups = list(cfg.segment.long_heads)
    return tuple(np.einsum("td,dgk->tgk", h, blk[w])[:, groups] for w in ("wk", "wv"))


def test_cache_does_not_grow_with_context_except_the_pool():
    """Cache shapes, whatever the prompt; only the pool's capacity (and a full KV cache) follows
    inference.max_len. And the pool is what it claims: after a 21-token prompt (S = 8) it holds,
    in device memory, the pre-RoPE keys and values of the long-range heads of the prompt's two
    complete segments as the training forward computes them (layer 0 also by hand), and nothing
    beyond; the entries not yet filled are never retrieved."""
    from segexec_jax.inference.generate import _engine
    from segexec_jax.model.transformer import bind
    from segexec_jax.segment.operator import scan_segments

    def cache_shapes(over, length, max_len):
        cfg = tiny("inference.max_len=" + str(max_len), *over)
        params = sx.init_params(cfg, seed=0)
        prefill = _engine(cfg)[0]
        S = cfg.segment.len if cfg.attention.mode == "segmented" else 1
        T = -(-length // S) * S
        cache, pool, _ = prefill.eval_shape(params, jnp.zeros((1, T), jnp.int32), jnp.array([length]),
                                            -(-max_len // S) * S)  # traced, not compiled: shapes only
        return jax.tree.map(jnp.shape, cache), jax.tree.map(jnp.shape, pool)

    short, pool_short = cache_shapes(SEG, 9, 256)
    long, pool_long = cache_shapes(SEG, 200, 256)
    assert short == long and pool_short == pool_long  # fixed shapes, whatever the prompt
    bigger, pool_bigger = cache_shapes(SEG, 9, 4096)
    assert bigger == short  # only the pool's capacity follows inference.max_len
    assert pool_bigger.k[2] == 4096 and pool_short.k[2] == 256
    full_small, _ = cache_shapes(["attention.mode=full"], 9, 256)
    full_big, _ = cache_shapes(["attention.mode=full"], 9, 4096)
    assert full_big.k[2] == 4096 and full_small.k[2] == 256  # a full KV cache grows with context
    stream_a, _ = cache_shapes(["attention.mode=streaming"], 9, 256)
    stream_b, _ = cache_shapes(["attention.mode=streaming"], 200, 4096)
    assert stream_a == stream_b

    cfg = tiny(*SHARP, *SEG, "segment.long_layers=[0,1]", "inference.max_len=64")
    params = sx.init_params(cfg, seed=5)
    prefill, step, fill = _engine(cfg)[:3]
    S, L, C = 8, 21, 64
    tokens = np.random.default_rng(5).integers(0, 256, (1, 3 * S)).astype(np.int32)
    cache, pool, _ = prefill(params, jnp.asarray(tokens), jnp.array([L]), C)
    assert pool.k.shape == (2, 1, C, 1, cfg.model.dim_head)  # [long layers, B, capacity, groups, D]
    assert {a.sharding.memory_kind for a in (pool.k, pool.v)} == {"device"}
    filled = 2 * S  # whole segments only: the last 5 prompt tokens join at the next fill
    k, v = np.asarray(pool.k), np.asarray(pool.v)
    assert not k[:, :, filled:].any() and not v[:, :, filled:].any()
    by_hand = layer0_pool_entries(params, cfg, tokens[0, :filled])
    np.testing.assert_allclose(k[0, 0, :filled], by_hand[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(v[0, 0, :filled], by_hand[1], atol=1e-5, rtol=1e-5)
    model = bind(cfg, params)
    doc = np.ones(tokens.shape, np.int32)
    _, _, (tk, tv) = jax.jit(lambda t, d: scan_segments(model, cfg, t, d, lambda x, s: x[:, :0], single_doc=True))(
        tokens, doc)
    np.testing.assert_allclose(k[:, :, :filled], np.asarray(tk)[:, :, :filled], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(v[:, :, :filled], np.asarray(tv)[:, :, :filled], atol=1e-5, rtol=1e-5)
    # Poison the entries not yet filled with keys far larger than any real one: the fill at the
    # end of segment 3 overwrites 16..23 and selects R_3 among entries 0..23 only.
    noise = np.random.default_rng(6).normal(size=k.shape).astype(k.dtype) * 1e3
    poisoned = dataclasses.replace(pool, k=jnp.asarray(np.where(np.arange(C)[:, None, None] >= filled, noise, k)))
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the engine donates its arguments
    for t in tokens[0, L:]:
        cache, _ = step(params, cache, jnp.asarray([t]))
    assert int(cache.length[0]) == 3 * S
    rows = jnp.array([True])
    clean_cache, clean_pool = fill(copy(cache), copy(pool), rows)
    dirty_cache, dirty_pool = fill(copy(cache), poisoned, rows)
    assert max_abs_diff(clean_pool.k[:, :, :3 * S], dirty_pool.k[:, :, :3 * S]) == 0
    assert np.asarray(clean_cache.ret.count).min() > 0
    assert max_abs_diff(clean_cache.ret, dirty_cache.ret) == 0
    assert np.abs(np.asarray(clean_cache.ret.k)).max() < 1e2  # no poisoned entry came in


def test_pool_on_host_lives_in_host_memory(monkeypatch):
    """Between tokens the pool lives in pinned host memory: every segment fill gets it from
    there and puts it back there, and the fill really writes it (the segment's long-range keys
    and values, layer 0's checked by hand)."""
    gen = importlib.import_module("segexec_jax.inference.generate")  # the module (the package exports the function)
    cfg = tiny(*SEG, "segment.long_layers=[0]", "inference.pool_on_host=true", "inference.max_len=64")
    params = sx.init_params(cfg, seed=0)
    prefill, step, fill, refresh, on_host = gen._engine(cfg)
    seen = []

    def watched_fill(cache, pool, rows):
        kinds_in = {a.sharding.memory_kind for a in jax.tree.leaves(pool)}
        was_empty = not np.asarray(pool.k).any()
        cache, pool = fill(cache, pool, rows)
        seen.append((kinds_in, was_empty, {a.sharding.memory_kind for a in jax.tree.leaves(pool)},
                     np.asarray(pool.k), np.asarray(pool.v)))
        return cache, pool

    monkeypatch.setattr(gen, "_engine", lambda c: (prefill, step, watched_fill, refresh, on_host))
    result = sx.generate(params, cfg, [[1, 2, 3]], max_new_tokens=12)
    assert result.timings["pool_on_host"] and result.timings["pool_bytes"] > 0
    assert len(seen) == 1  # 3 + 11 tokens consumed: segment 1 fills once
    kinds_in, was_empty, kinds_out, k, v = seen[0]
    assert kinds_in == kinds_out == {"pinned_host"} and was_empty
    by_hand = layer0_pool_entries(params, cfg, np.array(result.sequences[0][:8]))
    np.testing.assert_allclose(k[0, 0, :8], by_hand[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(v[0, 0, :8], by_hand[1], atol=1e-5, rtol=1e-5)
    assert not k[:, :, 8:].any() and not v[:, :, 8:].any()


def test_sampling_rules():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32))
    key = jax.random.key(0)
    greedy = sample(logits, key, 0.0, None, None)
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
    np.testing.assert_array_equal(sample(logits, key, 1.0, 1, None), greedy)  # top-1 is greedy
    np.testing.assert_array_equal(sample(logits, key, 1.0, None, 1e-6), greedy)  # a tiny nucleus too
    a, b = sample(logits, key, 1.0, None, None), sample(logits, key, 1.0, None, None)
    np.testing.assert_array_equal(a, b)  # the same key, the same draw
    draws = np.stack([sample(logits, jax.random.key(i), 1.0, 5, None) for i in range(40)])
    top5 = np.argsort(-np.asarray(logits), -1)[:, :5]
    assert all(d in top5[r] for r in range(4) for d in draws[:, r])
    assert len(set(draws[:, 0].tolist())) > 1


def test_stops_and_streaming_callback():
    from segexec_jax.data.tokenization import ByteTokenizer

    cfg = tiny(*SEG, "inference.max_len=64")
    params = sx.init_params(cfg, seed=0)
    tok = ByteTokenizer()
    free = sx.generate(params, cfg, ["hello"], max_new_tokens=10, tokenizer=tok)
    first = int(free.tokens[0, 2])
    stopped = sx.generate(params, cfg, ["hello"], max_new_tokens=10, tokenizer=tok, stop_tokens=[first])
    k = list(free.tokens[0]).index(first) + 1
    assert stopped.num_generated[0] == k and stopped.finish_reasons[0] == "stop_token"
    assert (stopped.tokens[0, k:] == -1).all() and np.isnan(stopped.logprobs[0, k:]).all()
    target = tok.decode(free.tokens[0, :4])[-2:]
    by_string = sx.generate(params, cfg, ["hello"], max_new_tokens=10, tokenizer=tok, stop_strings=[target])
    assert by_string.finish_reasons[0] == "stop_string" and target in by_string.text[0]
    seen = []
    streamed = sx.generate(params, cfg, ["hello", "hi"], max_new_tokens=6, tokenizer=tok,
                           on_token=lambda row, t: seen.append((row, t)))
    assert [t for r, t in seen if r == 1] == streamed.tokens[1].tolist()


def test_bad_generation_input_is_a_clear_error():
    cfg = tiny(*SEG, "inference.max_len=32")
    params = sx.init_params(cfg, seed=0)
    with pytest.raises(ValueError, match="at least one token"):
        sx.generate(params, cfg, [[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        sx.generate(params, cfg, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="exceeds inference.max_len=32"):
        sx.generate(params, cfg, [[1] * 20], max_new_tokens=13)
    with pytest.raises(ValueError, match=r"prompt token ids must lie in \[0, model.vocab_size=256\)"):
        sx.generate(params, cfg, [[1, 999]], max_new_tokens=2)
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        sx.generate(params, cfg, ["text"], max_new_tokens=2)
    with pytest.raises(ValueError, match="parameters do not match"):
        sx.generate(params, tiny(*SEG, "model.d_ff=96"), [[1, 2]], max_new_tokens=2)
    with pytest.raises(sx.ConfigError, match="streaming is inference-only"):
        sx.loss(params, tiny("attention.mode=streaming"), np.ones((1, 8), np.int32))


def infer(*args):
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_infer_cli(tmp_path, capsys):
    cfg = tiny("train.seq_len=64", "train.batch_size=2", "segment.len=16", "segment.tail=4",
               "segment.retrieval.budget=4", "segment.retrieval.query_window=4", "train.steps=2",
               "mesh.data=1", "eval.every=100", f"run.dir={tmp_path / 'run'}", "inference.max_len=256")
    train.run(cfg)
    out = infer("--checkpoint", str(tmp_path / "run"), "--prompt", "def f(x):", "--prompt", "import",
                "--max-new-tokens", "12", "--json")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["mode"] == "segmented" and len(payload["results"]) == 2
    r = payload["results"][0]
    assert len(r["tokens"]) == len(r["logprobs"]) == 12 and isinstance(r["text"], str)
    assert payload["timings"]["time_to_first_token_s"] > 0 and payload["timings"]["decode_tokens_per_s"] > 0
    # the same numbers as the Python API on the checkpoint
    cfg2, params = sx.load_checkpoint(tmp_path / "run")
    api = sx.generate(params, cfg2, [list(b"def f(x):")], max_new_tokens=12)
    assert api.tokens[0].tolist() == r["tokens"]
    split = infer("--checkpoint", str(tmp_path / "run"), "--prompt", "def f(x):", "--max-new-tokens", "12", "--json",
                  "mesh.tensor=2")  # tensor parallel over 2 of the 8 simulated devices
    assert split.returncode == 0, split.stderr
    assert json.loads(split.stdout)["results"][0]["tokens"] == r["tokens"]
    streamed = infer("--checkpoint", str(tmp_path / "run"), "--prompt", "x = ", "--max-new-tokens", "5",
                     "--mode", "full")
    assert streamed.returncode == 0 and streamed.stdout.rstrip("\n") != ""  # the text, streamed
    (tmp_path / "prompt.txt").write_text("")
    from segexec_jax.inference.infer import main as infer_main

    def fails(args, message):
        assert infer_main(args) == 1
        assert message in capsys.readouterr().err, (args, message)

    run = str(tmp_path / "run")
    fails(["--checkpoint", str(tmp_path / "nothing"), "--prompt", "a"], "does not exist")
    fails(["--checkpoint", run, "--prompt-file", str(tmp_path / "prompt.txt")], "prompt is empty")
    fails(["--checkpoint", run, "--prompt", "a", "--max-new-tokens", "0"], "at least 1")
    fails(["--checkpoint", run, "--prompt", "a", "--max-new-tokens", "1000"], "inference.max_len")
    fails(["--checkpoint", run, "--prompt", "a", "model.d_model=32"], "parameters do not match")
    next((tmp_path / "run" / "checkpoints").glob("*/meta/metadata")).write_text("{broken")
    fails(["--checkpoint", run, "--prompt", "a"], "damaged")
