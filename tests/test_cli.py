"""The command lines: `--help` (defaults, presets), `python -m segexec_jax.config --print`."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import segexec_jax as sx
from segexec_jax import bench, calibrate, config, convert

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "segexec_jax" / "configs").glob("*.yaml"))


def help_text(main, argv, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as stop:
        main(argv + ["--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # wrapping undone


@pytest.mark.parametrize("main,argv,default", [
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
