"""The evaluation suite: generators checked by independent parsers, scoring, determinism,
and a tiny end-to-end run that writes the table and the plots."""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny

from segexec_jax.data import synthetic
from segexec_jax.evaluation import suite as ev
from segexec_jax.evaluation.scoring import string_match_all, string_match_any
from segexec_jax.training import loop as train

# --------------------------------------------------------------------------- independent parsers


def parse_passkey(prompt):
    keys = re.findall(r"The pass key is (\d+)\. Remember it\.", prompt)
    assert len(keys) == 1
    return keys


def parse_niah(prompt):
    needles = re.findall(r"One of the special magic numbers for (\w+) is: (\d+)\.", prompt)
    asked = re.search(r"What are all the special magic numbers for (.+?) mentioned in the provided text\?",
                      prompt).group(1).split(", ")
    return [v for k, v in needles if k in asked]


def parse_variable_tracking(prompt):
    value = re.search(r"assigned the value (\d+)\.", prompt).group(1)
    direct = dict(re.findall(r"VAR (\w+) = (\d+)\.", prompt))
    links = dict(re.findall(r"VAR (\w+) = VAR (\w+)\.", prompt))

    def resolve(var):
        while var in links:
            var = links[var]
        return direct.get(var)

    return [v for v in list(direct) + list(links) if resolve(v) == value]


def parse_common_words(prompt):
    n = int(re.search(r"What are the (\d+) most common words", prompt).group(1))
    listing = prompt.split("Below is a numbered list of words. ")[1].split(" What are")[0]
    counts = Counter(re.findall(r"\d+\. (\w+)", listing))
    return sorted(counts, key=lambda w: (-counts[w], w))[:n], counts


def parse_frequent_words(prompt):
    n = int(re.search(r"What are the (\d+) most frequently", prompt).group(1))
    text = prompt.split("Read the following coded text. ")[1].split(" ...")[0]
    counts = Counter(text.split())
    return n, counts


@pytest.mark.parametrize("seed,length,split", [(0, 1500, "eval"), (1, 4000, "eval"), (7, 9000, "eval"),
                                               (3, 4000, "train")])
def test_every_generator_answer_is_correct_by_construction(seed, length, split):
    for task in synthetic.TASKS:
        for index in range(3):
            s = synthetic.generate(task, seed, index, length, split)
            answers = list(s.answers)
            if task == "passkey":
                assert parse_passkey(s.prompt) == answers
            elif task.startswith("niah"):
                assert sorted(parse_niah(s.prompt)) == sorted(answers), task
            elif task == "variable_tracking":
                assert sorted(parse_variable_tracking(s.prompt)) == sorted(answers)
            elif task == "common_words":
                top, counts = parse_common_words(s.prompt)
                assert top == answers
                assert counts[top[-1]] > max(c for w, c in counts.items() if w not in top)  # no tie at the cut
            elif task == "copy":
                assert [re.match(r"Remember this line: ([^.]+)\.", s.prompt).group(1)] == answers
                assert s.prompt.endswith("Now repeat the line:") and s.prompt.count(answers[0]) == 1
            else:
                n, counts = parse_frequent_words(s.prompt)
                ranked = sorted(counts.values(), reverse=True)
                assert len(answers) == n and all(counts[a] >= ranked[n - 1] for a in answers)
            assert s.text.startswith(s.prompt)


def test_training_documents_share_no_filler_or_words_with_evaluation_prompts():
    """SPEC §9: evaluation instances never come from the filler used in training."""
    import re

    eval_words = set(synthetic.SPLITS["eval"].words)
    train_words = set(synthetic.SPLITS["train"].words)
    assert len(train_words) == len(eval_words) == 2000 and not train_words & eval_words
    for task in synthetic.TASKS:
        train = synthetic.generate(task, 0, 0, 3000, "train").text
        evaluation = synthetic.generate(task, 0, 0, 3000, "eval").prompt
        assert "The grass is green" not in train and "The river runs" not in evaluation, task
        words = lambda text: set(re.findall(r"\b[a-z]+\b", text))  # lower-case words: the haystack's
        assert not words(train) & eval_words, task
        if task not in ("passkey", "variable_tracking"):  # their haystacks are filler alone
            assert words(evaluation) & eval_words, task


def test_needle_depth_is_where_the_needle_lands():
    for depth in [0.0, 0.3, 0.7, 1.0]:
        for task, needle in [("passkey", "The pass key is"), ("niah_single", "One of the special magic")]:
            s = synthetic.generate(task, seed=2, index=0, length=6000, depth=depth)
            at = s.prompt.index(needle) / len(s.prompt)
            assert abs(at - depth) < 0.1 and s.depth == depth, (task, depth, at)


def test_generators_are_deterministic_from_the_seed():
    for task in synthetic.TASKS:
        assert synthetic.generate(task, 5, 1, 2000) == synthetic.generate(task, 5, 1, 2000)
        assert synthetic.generate(task, 5, 1, 2000).prompt != synthetic.generate(task, 6, 1, 2000).prompt
    with pytest.raises(ValueError, match="unknown synthetic task 'nope'"):
        synthetic.generate("nope", 0, 0, 100)


def test_scoring_on_hand_made_cases():
    assert string_match_all("The pass key is 12345.", ["12345"]) == 1.0
    assert string_match_all("numbers: 111 and 333", ["111", "222", "333", "444"]) == 0.5
    assert string_match_all("nothing here", ["7"]) == 0.0
    assert string_match_all("VAR ABC", ["abc"]) == 1.0  # case-insensitive
    assert string_match_any("one of them: 2", ["1", "2"]) == 1.0
    assert string_match_any("none", ["1", "2"]) == 0.0
    with pytest.raises(ValueError):
        string_match_all("x", [])


@pytest.mark.parametrize("mode", ["segmented", "full", "streaming"])
def test_token_nll_equals_the_forward_logits(mode):
    """The evaluation's per-token loss (logits one segment at a time) against log-softmax of
    `forward`'s whole [B, T, V] logits; a length that ends mid-segment."""
    import jax
    import jax.numpy as jnp

    import segexec_jax as sx
    from segexec_jax.evaluation.suite import _nll_fn

    cfg = sx.load_config("tiny", ["segment.len=16", "segment.tail=4", "segment.retrieval.budget=4",
                                  "segment.retrieval.query_window=4", "model.init_std=0.3", f"attention.mode={mode}",
                                  "inference.stream_window=8", "inference.stream_sinks=2"])
    params = sx.init_params(cfg, 0)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 45)).astype(np.int32)
    logp = jax.nn.log_softmax(sx.forward(params, cfg, tokens), -1)[:, :-1]
    expected = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    assert float(jnp.abs(_nll_fn(cfg)(params, jnp.asarray(tokens)) - expected).max()) < 1e-5


def test_a_prompt_longer_than_inference_max_len_still_runs():
    """Token counts per character vary by sample (frequent_words): the run grows the cache
    for a batch instead of stopping."""
    import segexec_jax as sx
    from segexec_jax.data.tokenization import load_tokenizer
    from segexec_jax.evaluation.suite import run_task

    cfg = sx.load_config("tiny", ["segment.len=64", "segment.tail=8", "segment.retrieval.budget=8",
                                  "segment.retrieval.query_window=8", "inference.max_len=64"])
    records = run_task(sx.init_params(cfg, 0), cfg, load_tokenizer("bytes"), "passkey", 300, 1, [0.5], 0, 1)
    assert len(records) == 1 and records[0]["prompt_tokens"] > 64


def test_position_buckets():
    assert ev.buckets(9) == [(1, 2), (2, 4), (4, 8), (8, 9)]
    assert sum(hi - lo for lo, hi in ev.buckets(1024)) == 1023


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    train.run(tiny("train.seq_len=64", "train.batch_size=2", "segment.len=16", "segment.tail=4",
                   "segment.retrieval.budget=4", "segment.retrieval.query_window=4", "train.steps=2",
                   "mesh.data=1", "eval.every=100", f"run.dir={run}"))
    return run


def test_tiny_end_to_end_run(tmp_path, tiny_run):
    run = tiny_run
    args = ["--checkpoint", str(run), "--tasks", "passkey", "variable_tracking", "--lengths", "96", "160",
            "--samples", "1", "--depths", "0", "1", "--ppl-lengths", "128", "--ppl-samples", "2", "--batch", "3"]
    assert ev.main(args + ["--out", str(tmp_path / "a")]) == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["modes"] == ["segmented", "full", "streaming"]
    assert len(results["tasks"]) == 3 * (2 * 2 * 1 + 2 * 1)  # modes x (passkey: lengths x depths x samples + vt)
    assert {r["task"] for r in results["summary"]} == {"passkey", "variable_tracking"}
    assert all(0.0 <= r["score"] <= 1.0 for r in results["tasks"])
    assert [b["bucket"] for b in results["perplexity"][0]["buckets"]][-1] == [64, 128]
    table = (tmp_path / "a" / "results.md").read_text()
    assert "| passkey | 96 |" in table and "Loss by position" in table
    for png in ["loss_by_position.png", "task_scores.png", "depth_passkey.png"]:
        assert (tmp_path / "a" / png).read_bytes()[:4] == b"\x89PNG"
    assert ev.main(args + ["--out", str(tmp_path / "b")]) == 0  # deterministic
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["tasks"] == results["tasks"] and again["perplexity"] == results["perplexity"]
    assert ev.main(["--checkpoint", str(run), "--tasks", "nope", "--out", str(tmp_path / "c")]) == 1


def test_results_go_to_a_fresh_directory_or_an_explicit_out_never_over_an_earlier_run(tmp_path, tiny_run, capsys):
    """Without --out each run writes a fresh CHECKPOINT/eval/<date-time> directory; an --out
    holding an earlier run's files is refused (before any work) unless --overwrite. The paths
    written are printed at the end."""
    small = ["--checkpoint", str(tiny_run), "--tasks", "passkey", "--lengths", "64", "--samples", "1", "--depths", "0",
             "--ppl-lengths", "64", "--ppl-samples", "1", "--modes", "segmented"]

    def wrote(out: str) -> list[str]:
        paths = [line.removeprefix("wrote ") for line in out.splitlines() if line.startswith("wrote ")]
        assert all(Path(p).is_file() for p in paths)
        return paths

    assert ev.main(small) == 0 and ev.main(small) == 0
    paths = wrote(capsys.readouterr().out)
    runs = sorted(p for p in (tiny_run / "eval").iterdir())
    assert len(runs) == 2 and runs[0].name != runs[1].name
    names = ["results.json", "results.md", "loss_by_position.png", "task_scores.png", "depth_passkey.png"]
    assert sorted(paths) == sorted(str(d / n) for d in runs for n in names)

    out = tmp_path / "mine"
    assert ev.main(small + ["--out", str(out)]) == 0
    assert wrote(capsys.readouterr().out)[0] == str(out / "results.json")
    before = (out / "results.json").read_text()
    (out / "results.md").write_text("kept")
    assert ev.main(small + ["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"--out '{out}' already holds results.json, results.md" in err and "--overwrite" in err
    assert (out / "results.md").read_text() == "kept" and (out / "results.json").read_text() == before
    assert ev.main(small + ["--out", str(out), "--overwrite"]) == 0
    assert (out / "results.md").read_text() != "kept"
    with pytest.raises(SystemExit):
        ev.main(small + ["--overwrite"])
    assert "--overwrite needs --out" in capsys.readouterr().err


def fake_results(seq_len: int) -> dict:
    """Three modes whose losses and scores coincide exactly."""
    buckets = [dict(bucket=[lo, 2 * lo], nll=1.0 + 0.1 * i, count=4) for i, lo in enumerate([1, 2, 4, 8, 16, 32, 64])]
    modes = ["segmented", "full", "streaming"]
    tasks = [dict(mode=m, task="passkey", length=n, depth=d, sample=0, score=0.5) for m in modes
             for n in (64, 128, 256) for d in (0.0, 1.0)]
    return dict(modes=modes, config={"train": {"seq_len": seq_len}}, tasks=tasks, summary=ev.summarise(tasks),
                perplexity=[dict(mode=m, length=128, buckets=buckets) for m in modes])


def series_and_marks(ax):
    marks = [ln for ln in ax.get_lines() if ln.get_label() == "training length"]
    series = [ln for ln in ax.get_lines() if ln.get_label() != "training length"]
    return series, marks


def test_plots_keep_coinciding_series_apart_and_mark_the_training_length(tmp_path):
    results = fake_results(seq_len=96)
    ax = ev.loss_figure(results).axes[0]
    series, marks = series_and_marks(ax)
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [96, 96]
    assert len({(ln.get_marker(), ln.get_linestyle(), ln.get_markersize()) for ln in series}) == 3
    assert "training length" in [t.get_text() for t in ax.get_legend().get_texts()]
    for ax in ev.task_figure(results).axes[:1]:
        series, marks = series_and_marks(ax)
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [96, 96]
        assert len({(ln.get_marker(), ln.get_linestyle()) for ln in series}) == 3
    assert ev.plots(results, tmp_path) == ["loss_by_position.png", "task_scores.png", "depth_passkey.png"]
    assert all((tmp_path / name).read_bytes()[:4] == b"\x89PNG" for name in ev.plots(results, tmp_path))


def test_eval_md_figure_keeps_coinciding_series_apart_and_marks_the_training_length():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "plot_eval.py"
    spec = importlib.util.spec_from_file_location("plot_eval", path)
    plot_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_eval)
    res = fake_results(seq_len=32)
    ax = plot_eval.figure({"full": res, "segmented": res}, 128, "t").axes[0]
    series, marks = series_and_marks(ax)
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [32, 32]
    assert len(series) == 6  # (trained, evaluated) pairs, all on the same values
    assert len({(ln.get_linestyle(), ln.get_marker(), ln.get_color()) for ln in series}) == 6
    assert len({ln.get_marker() for ln in series}) == 3

