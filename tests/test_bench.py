"""`python -m segexec_jax.bench train` on the CPU: the sharded step train.run compiles, a
JSON record with the mesh and per-device figures."""

import json

from segexec_jax.evaluation import bench


def test_train_bench_runs_the_sharded_step(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    bench.main(["train", "--config", "tiny", "--seq-len", "128", "--batch", "1", "--steps", "2", "--warmup", "1",
                "--out", str(out), "mesh.data=1", "mesh.fsdp=2", "train.steps=3"])
    record = json.loads(out.read_text().splitlines()[-1])
    assert record == json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1} and record["devices"] == 2
    assert record["tokens_per_s_per_device"] * 2 == record["tokens_per_s"] or \
        abs(record["tokens_per_s_per_device"] * 2 - record["tokens_per_s"]) < 1
    assert record["loss_last"] < record["loss_first"]  # three real updates on the same two batches
    assert len(record["step_s_all"]) == 2


def test_decode_and_prefill_benches_run(tmp_path, capsys):
    """`bench decode` (with and without the chunk refresh) and `bench prefill` on the tiny
    config: each prints one record with its figures."""
    for argv in (["decode", "--context", "64", "--steps", "2", "--warmup", "1"],
                 ["decode", "--context", "64", "--steps", "2", "--warmup", "1", "segment.retrieval.refresh=16"],
                 ["prefill", "--seq-len", "64"]):
        bench.main([argv[0], "--config", "tiny", *argv[1:]])
        record = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert record["bench"] == argv[0]
        if argv[0] == "decode":
            assert record["tokens_per_s"] > 0 and record["step_ms"] > 0 and record["fill_ms"] > 0
            assert (record["refresh_ms"] > 0) == ("segment.retrieval.refresh=16" in argv)
