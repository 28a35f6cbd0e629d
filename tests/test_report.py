"""benchmarks/smollm2_report.py on fabricated eval results with known scores."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "smollm2_report.py"
spec = importlib.util.spec_from_file_location("smollm2_report", SCRIPT)
report_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report_mod)


def fake_results(path: Path, scores: dict, ppl_lengths=(64,)) -> None:
    """scores: (task, length) -> list of per-sample scores."""
    tasks = [dict(mode="segmented", task=t, length=n, depth=None, sample=i, prompt_tokens=n, answers=["x"],
                  prediction="x", score=s) for (t, n), ss in scores.items() for i, s in enumerate(ss)]
    ppl = [dict(mode="segmented", length=n, buckets=[dict(bucket=[lo, min(2 * lo, n)], nll=3.0 - 0.1 * k, count=8)
                                                     for k, lo in enumerate([1, 2, 4, 8, 16, 32])]) for n in ppl_lengths]
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(dict(checkpoint="ckpt", seed=0, samples=20, tasks=tasks,
                                                       perplexity=ppl, summary=[])))


def test_report(tmp_path, capsys):
    runs = tmp_path / "runs"
    # base/full: passkey 20/20 and 10/20 at 512 and 1024; qa fractional, mean 0.5, at 512 only
    fake_results(runs / "base" / "full", {("passkey", 512): [1.0] * 20, ("passkey", 1024): [1.0] * 10 + [0.0] * 10,
                                          ("qa", 512): [0.5] * 10 + [0.0] * 5 + [1.0] * 5})
    # k1/segmented: passkey only at 512 (1024 and qa missing)
    fake_results(runs / "k1" / "segmented", {("passkey", 512): [1.0] * 15 + [0.0] * 5}, ppl_lengths=(64, 32))
    out = tmp_path / "evidence"
    summary = report_mod.report(str(runs), str(out), ["k1/segmented=K=1 segmented", "base/full=Base full"])
    printed = capsys.readouterr().out

    assert [r["name"] for r in summary["rows"]] == ["K=1 segmented", "Base full"]
    macro, task = summary["macro"], summary["per_task"]
    assert macro["Base full"][512]["mean"] == pytest.approx(0.75)  # (1.0 + 0.5) / 2
    assert macro["Base full"][512]["n"] == 40
    assert macro["Base full"][1024]["mean"] == pytest.approx(0.5)
    c = task["passkey"]["Base full"][512]
    assert c["interval"] == "wilson" and (c["lo"], c["hi"]) == (pytest.approx(0.839, abs=1e-3), pytest.approx(1.0))
    c = task["passkey"]["Base full"][1024]
    assert (c["lo"], c["hi"]) == (pytest.approx(0.299, abs=1e-3), pytest.approx(0.701, abs=1e-3))
    assert task["qa"]["Base full"][512]["interval"] == "bootstrap"
    lo, hi = macro["Base full"][512]["lo"], macro["Base full"][512]["hi"]
    assert 0.6 < lo < 0.75 < hi < 0.9  # bootstrap around 0.75 (passkey 20/20 has no spread)
    assert summary == report_mod.report(str(runs), str(out), ["k1/segmented=K=1 segmented", "base/full=Base full"])

    # missing cells are blank: k1 has no 1024 and no qa
    assert 1024 not in macro["K=1 segmented"] and task["qa"]["K=1 segmented"] == {}
    table = (out / "table.md").read_text()
    assert "| K=1 segmented | 0.75 [0.53, 0.89] |  |" in table
    assert "| K=1 segmented |  |  |" in table  # qa table row
    assert "K=1 segmented" in printed and "Base full" in printed
    for name in ("table.md", "summary.json", "scores_by_length.png", "task_passkey.png", "task_qa.png",
                 "loss_by_position.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["macro"]["Base full"]["512"]["n"] == 40


def test_no_results(tmp_path):
    with pytest.raises(SystemExit, match="no results found"):
        report_mod.report(str(tmp_path), str(tmp_path / "out"))


def test_per_task_parts_merge_into_their_row(tmp_path):
    runs = tmp_path / "runs"
    fake_results(runs / "base" / "segmented" / "passkey", {("passkey", 512): [1.0] * 20})
    fake_results(runs / "base" / "segmented" / "qa", {("qa", 512): [0.0] * 20})
    summary = report_mod.report(str(runs), str(tmp_path / "out"), [])
    (row,) = summary["rows"]
    assert row["name"] == "base / segmented"
    assert summary["macro"][row["name"]][512]["mean"] == pytest.approx(0.5)  # both tasks, one row
    assert summary["macro"][row["name"]][512]["tasks"] == 2


def test_rows_merge_across_run_directories(tmp_path):
    """Two GPU stints: one row's tasks split between two directories, another row in one."""
    first, second = tmp_path / "stint1", tmp_path / "stint2"
    fake_results(first / "base" / "full", {("passkey", 512): [1.0] * 20})
    fake_results(second / "base" / "full" / "qa", {("qa", 512): [0.0] * 10 + [1.0] * 10})
    fake_results(second / "k1" / "segmented" / "qa", {("qa", 512): [1.0] * 20})
    summary = report_mod.report([str(first), str(second)], str(tmp_path / "out"), [])
    assert [r["name"] for r in summary["rows"]] == ["base / full", "k1 / segmented"]
    cell = summary["macro"]["base / full"][512]
    assert (cell["tasks"], cell["n"], cell["mean"]) == (2, 40, pytest.approx(0.75))
