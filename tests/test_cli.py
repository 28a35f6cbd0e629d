"""The command lines: `--help` (defaults, presets), `python -m segexec_jax.config --print`,
infer's timings (compilation apart) and `--prompts-file`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import tiny

import segexec_jax as sx
from segexec_jax import config, convert
from segexec_jax.evaluation import bench, calibrate
from segexec_jax.evaluation import suite as ev
from segexec_jax.inference import infer
from segexec_jax.training import loop as train

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "segexec_jax" / "configs").glob("*.yaml"))
MAX_LEN = "inference.max_len=200"  # this file's own engine: its first generation compiles


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    train.run(tiny("train.seq_len=64", "train.batch_size=2", "segment.len=16", "segment.tail=4",
                   "segment.retrieval.budget=4", "segment.retrieval.query_window=4", "train.steps=2",
                   "mesh.data=1", "eval.every=100", f"run.dir={run}"))
    return run


def help_text(main, argv, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as stop:
        main(argv + ["--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # wrapping undone


@pytest.mark.parametrize("main,argv,default", [
    (infer.main, [], "--max-new-tokens MAX_NEW_TOKENS tokens generated per prompt, at most (default: 64)"),
    (ev.main, [], "--samples SAMPLES samples per task, length and depth (default: 4)"),
    (calibrate.main, [], "--layers LAYERS long-range layers to choose (default: 4)"),
    (convert.main, ["from-hf"], "--max-shard-size MAX_SHARD_SIZE default: 5GB"),
    (convert.main, ["to-hf"], "--max-shard-size MAX_SHARD_SIZE default: 5GB"),
    (bench.main, ["prefill"], "--seq-len SEQ_LEN default: 32768"),
    (bench.main, ["decode"], "--context CONTEXT default: 32768"),
])
def test_help_shows_defaults(main, argv, default, capsys, monkeypatch):
    text = help_text(main, argv, capsys, monkeypatch)
    assert default in text
    assert "(default: None)" not in text and "(default: False)" not in text  # unset and off say nothing


@pytest.mark.parametrize("main,argv,default", [
    (bench.main, ["train"], "1b"), (bench.main, ["prefill"], "llama2_7b"), (bench.main, ["decode"], "llama2_7b"),
    (config.main, [], "tiny"),
])
def test_help_lists_every_preset(main, argv, default, capsys, monkeypatch):
    assert len(PRESETS) >= 5
    text = help_text(main, argv, capsys, monkeypatch)
    assert f"preset ({', '.join(PRESETS)})" in text
    assert f"(default: {default})" in text
    assert config.preset_names() == PRESETS  # read from the folder, not a list in the code


def test_config_print(capsys):
    assert config.main(["--print", "--config", "tiny", "segment.len=32", "model.n_layers=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["segment"]["len"] == 32 and printed["model"]["n_layers"] == 3
    assert config.config_from_dict(printed) == sx.load_config("tiny", ["segment.len=32", "model.n_layers=3"])
    assert config.main(["--print", "--config", "small"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == sx.load_config("small").to_dict()

    assert config.main(["--print", "model.nope=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'model.nope'") and err.count("\n") == 1
    assert config.main(["--print", "--config", "nope"]) == 1
    assert "config 'nope' not found (presets: " + ", ".join(PRESETS) + ")" in capsys.readouterr().err


def test_config_print_as_a_module():
    """`python -m segexec_jax.config`: exit 0, the YAML alone (no runpy warning about the module
    being imported by the package first)."""
    out = subprocess.run([sys.executable, "-m", "segexec_jax.config", "--print", "--config", "tiny", "train.steps=7"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert yaml.safe_load(out.stdout)["train"]["steps"] == 7
    bad = subprocess.run([sys.executable, "-m", "segexec_jax.config", "--print", "train.nope=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("error: unknown config key 'train.nope'") and bad.stderr.count("\n") == 1


def run_infer(args, capsys) -> str:
    assert infer.main(args) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_infer_timings_keep_compilation_apart(run_dir, capsys):
    """The first generation compiles the engine: `compile_s` says how long, and prefill,
    decode and decode tokens/s leave it out; the same generation again compiles nothing."""
    args = ["--checkpoint", str(run_dir), "--prompt", "def f(x):", "--max-new-tokens", "6", "--json", MAX_LEN]
    first = json.loads(run_infer(args, capsys))["timings"]
    second = json.loads(run_infer(args, capsys))["timings"]
    for t in (first, second):
        assert {"compile_s", "prefill_s", "decode_s", "decode_tokens", "decode_tokens_per_s", "wall_s"} <= set(t)
        assert min(t["compile_s"], t["prefill_s"], t["decode_s"]) >= 0
        assert t["compile_s"] + t["prefill_s"] + t["decode_s"] <= t["wall_s"] + 1e-3
        assert t["decode_tokens"] == 5  # the first token comes from the prefill
        assert t["decode_tokens_per_s"] == pytest.approx(t["decode_tokens"] / t["decode_s"])
        assert t["time_to_first_token_s"] == t["prefill_s"]
    assert first["compile_s"] > 0 and second["compile_s"] == 0
    assert first["decode_s"] < first["compile_s"]  # compiling the decode step is not in decode_s


def test_infer_prompts_file(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\nimport os\r\nclass A:\n")  # a CRLF line, a final newline
    args = ["--checkpoint", str(run_dir), "--prompts-file", str(prompts), "--max-new-tokens", "5", MAX_LEN]
    records = [json.loads(line) for line in run_infer(args + ["--json", "--batch-size", "2"], capsys).splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3] and [r["batch"] for r in records] == [0, 0, 1]
    assert [r["prompt"] for r in records] == ["def f(x):", "import os", "class A:"]
    assert all(len(r["tokens"]) == len(r["logprobs"]) == 5 and "compile_s" in r["timings"] for r in records)
    alone = json.loads(run_infer(["--checkpoint", str(run_dir), "--prompt", "import os", "--max-new-tokens", "5",
                                  "--json", MAX_LEN], capsys))["results"][0]
    assert records[1]["tokens"] == alone["tokens"]  # batched, it generates what it does alone
    lines = run_infer(args, capsys).split("\n")  # one batch, one line per prompt
    assert lines[-1] == "" and lines[:-1] == [infer.one_line(r["text"]) for r in records]
    assert infer.one_line("a\nb\\n") == "a\\nb\\\\n"

    def fails(path, message):
        assert infer.main(["--checkpoint", str(run_dir), "--prompts-file", str(path)]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    (tmp_path / "blank.txt").write_text("a\n\nb\n")
    fails(tmp_path / "blank.txt", "line 2 is blank")
    (tmp_path / "empty.txt").write_text("")
    fails(tmp_path / "empty.txt", "holds no prompts")
    fails(tmp_path / "missing.txt", f"cannot read --prompts-file '{tmp_path / 'missing.txt'}': No such file")
    with pytest.raises(SystemExit):
        infer.main(["--checkpoint", str(run_dir), "--prompt", "a", "--batch-size", "2"])
    assert "--batch-size needs --prompts-file" in capsys.readouterr().err
