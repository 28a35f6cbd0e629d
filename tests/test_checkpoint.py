"""Checkpoints: per-process data positions, run directories as etils paths (local or gs://),
parameters loaded straight into their shardings."""

import json

import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem
from helpers import tiny
from jax.sharding import PartitionSpec as P

import segexec_jax as sx
from segexec_jax.config import dump_config
from segexec_jax.data import pipeline as data
from segexec_jax.data.tokenization import ByteTokenizer
from segexec_jax.model.sharding import make_mesh
from segexec_jax.model.transformer import param_shardings
from segexec_jax.training import checkpoint
from segexec_jax.training import loop as train
from segexec_jax.training.checkpoint import (
    Checkpointer,
    as_path,
    layout,
    load_checkpoint,
    read_config,
    read_meta,
)
from segexec_jax.training.metrics import MetricsWriter
from segexec_jax.training.optim import optimizer

SMALL = ["train.seq_len=64", "train.batch_size=2", "segment.len=16", "segment.tail=4",
         "segment.retrieval.budget=4", "segment.retrieval.query_window=4", "mesh.data=1"]


def batches(it, n):
    return [next(it) for _ in range(n)]


def test_each_process_saves_and_restores_its_own_data_position(tmp_path):
    cfg = tiny(*SMALL)
    it = iter(data.prefetch(data.dataset(cfg, ByteTokenizer(), "train")))
    batches(it, 3)
    state = {"step": jnp.int32(3), "w": jnp.arange(6.0).reshape(2, 3)}
    ckpt = Checkpointer(epath.Path(tmp_path) / "run", keep=2, asynchronous=False)  # an epath, local
    ckpt.save(3, state, it, layout(cfg, "bytes"))
    ckpt.wait()
    expected = batches(it, 2)
    data_dir = tmp_path / "run" / "checkpoints" / "3" / "data"
    assert sorted(p.name for p in data_dir.iterdir() if p.suffix == ".json") == ["process_0-of-1.json"]

    def restore():
        fresh = iter(data.prefetch(data.dataset(cfg, ByteTokenizer(), "train")))
        restored, meta = ckpt.restore(3, jax.tree.map(jnp.zeros_like, state), fresh)
        return restored, meta, batches(fresh, 2)

    restored, meta, got = restore()
    assert meta["step"] == 3 and int(restored["step"]) == 3
    np.testing.assert_array_equal(restored["w"], state["w"])
    for a, b in zip(got, expected, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])

    # a checkpoint of a two-process run: this one process cannot take both positions
    mine = data_dir / "process_0-of-1.json"
    position = mine.read_text()
    mine.rename(data_dir / "process_0-of-2.json")
    (data_dir / "process_1-of-2.json").write_text(position)
    with pytest.raises(sx.CheckpointError, match=r"data positions of 2 processes, and this run has 1: .*resume "
                                                  r"with 2 processes"):
        restore()
    # a checkpoint from before per-process positions (Orbax JsonSave's one file) still resumes
    for p in data_dir.glob("process_*.json"):
        p.unlink()
    (data_dir / "metadata").write_text(position)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(restore()[2], expected) for k in a)
    ckpt.close()


def test_a_converted_checkpoint_and_a_run_load_into_the_mesh_shardings(tmp_path):
    """Eight simulated devices (tests/conftest.py sets them before jax starts) as data 2 × fsdp 2
    × tensor 2: every array comes back with the sharding of its logical axes and its saved values."""
    assert jax.device_count() == 8
    cfg = tiny(*SMALL, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    params = sx.init_params(cfg, seed=3)
    ckpt = Checkpointer(tmp_path / "run", keep=1, asynchronous=False)
    ckpt.save(1, {"params": params}, None, layout(cfg, "bytes"))
    ckpt.wait()
    ckpt.close()
    mesh = make_mesh(cfg)
    expected = param_shardings(cfg, params, mesh)
    assert expected["embed"].spec == P("tensor", "fsdp")  # really split, over four devices

    def check(loaded):
        for path, a in jax.tree_util.tree_leaves_with_path(loaded):
            want = expected
            for k in path:
                want = want[k.key]
            assert a.sharding == want, (jax.tree_util.keystr(path), a.sharding, want)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    check(load_checkpoint(tmp_path / "run", mesh)[1])
    check(load_checkpoint(tmp_path / "run", expected)[1])
    shard = load_checkpoint(tmp_path / "run", mesh)[1]["embed"].addressable_shards[0]
    assert shard.data.shape == (params["embed"].shape[0] // 2, params["embed"].shape[1] // 2)
    one = load_checkpoint(tmp_path / "run")[1]  # no target: the first device
    assert all(a.sharding.device_set == {jax.devices()[0]} for a in jax.tree.leaves(one))
    with pytest.raises(sx.CheckpointError, match="shardings given do not match"):
        load_checkpoint(tmp_path / "run", {"embed": expected["embed"]})

    # the same parameters as a converted (safetensors) checkpoint: placed shard by shard
    from segexec_jax.convert import from_hf, to_hf

    to_hf(tmp_path / "run", tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "converted")
    check(load_checkpoint(tmp_path / "converted", mesh)[1])

    # train.init_from reads into the training state's shardings
    run_cfg = cfg.replace(train=cfg.train.__class__(**{**cfg.train.__dict__, "init_from": str(tmp_path / "run")}))
    opt = optimizer(run_cfg.train)
    _, shardings = train.state_shardings(run_cfg, opt, mesh)
    fresh = jax.jit(train.init_state(run_cfg, opt), out_shardings=shardings)()
    check(train._start_from(run_cfg, opt, fresh, shardings)["params"])


@pytest.fixture
def fake_gcs():
    """gs:// served from memory by fsspec (what etils uses for gs:// without TensorFlow), so
    that nothing goes to the network."""

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store: dict = {}
        pseudo_dirs = [""]
        root_marker = ""

    for name in FakeGCS.protocol:
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    yield FakeGCS.store
    FakeGCS.store.clear()


def test_a_gs_run_dir_stays_a_uri(tmp_path, monkeypatch, fake_gcs):
    monkeypatch.chdir(tmp_path)
    uri = "gs://bucket/run"
    assert isinstance(as_path(uri), epath.Path) and str(as_path(uri)) == uri

    managers = []
    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", lambda directory, **kw: managers.append(directory))
    assert str(Checkpointer(uri, keep=1).directory) == uri + "/checkpoints"
    assert str(managers[0]) == uri + "/checkpoints"

    cfg = tiny(*SMALL, f"run.dir={uri}")
    dump_config(cfg, as_path(cfg.run.dir) / "config.yaml")
    assert yaml.safe_load(epath.Path(uri, "config.yaml").read_text())["run"]["dir"] == uri
    # metrics: an object store cannot append, so a resumed run's writer keeps the earlier lines
    for steps in ([1, 2], [3]):
        metrics = MetricsWriter(uri, flush_seconds=0)
        for s in steps:
            metrics.write(s, {"loss": float(s)})
        metrics.close()
    lines = epath.Path(uri, "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]

    with pytest.raises(sx.CheckpointError, match="no checkpoint found in 'gs://bucket/run'"):
        read_meta(uri)
    step = epath.Path(uri, "checkpoints", "3")
    (step / "meta").mkdir(parents=True)
    (step / "state").mkdir()
    (step / "state" / "_METADATA").write_text("{}")
    (step / "meta" / "metadata").write_text(json.dumps(layout(cfg, "bytes")))
    assert read_meta(uri)["config"] == cfg.to_dict() and read_config(uri) == cfg
    assert not any(tmp_path.iterdir())  # nothing local, no "gs:" directory


# ------------------------------------------------------------------ checksums and damage


def test_fingerprints_see_every_bit_and_position_and_ignore_the_sharding():
    x = jax.random.normal(jax.random.key(0), (8, 16))
    base = checkpoint.fingerprints({"x": x})["x"]
    flipped = jax.lax.bitcast_convert_type(x, jnp.uint32).at[3, 5].add(1)  # one bit of one element
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])  # same values, other positions
    assert checkpoint.fingerprints({"x": jax.lax.bitcast_convert_type(flipped, jnp.float32)})["x"] != base
    assert checkpoint.fingerprints({"x": swapped})["x"] != base
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("a", "b")))
    assert checkpoint.fingerprints({"x": sharded})["x"] == base
    bf16 = x.astype(jnp.bfloat16)
    assert checkpoint.fingerprints({"x": bf16})["x"] != checkpoint.fingerprints({"x": bf16.at[7, 15].set(0)})["x"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4, never modified: copy it."""
    root = tmp_path_factory.mktemp("saved")
    cfg = tiny(*SMALL, "train.steps=4", "checkpoint.every=2", "eval.every=100", "train.log_every=1",
               f"run.dir={root / 'run'}")
    train.run(cfg)
    return root / "run"


def _copy(saved_run, tmp_path):
    import shutil

    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


def _damage(run_dir, step, how):
    """Overwrite bytes in the middle of the largest array file of `step` ("overwrite": it
    still reads, as wrong values; "overwrite all": every array file), truncate it, or delete
    a metadata file."""
    files = sorted((p for p in (run_dir / "checkpoints" / str(step) / "state").rglob("*")
                    if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    largest = files[-1]
    if how.startswith("overwrite"):
        for f in files if how == "overwrite all" else [largest]:
            data = bytearray(f.read_bytes())
            for at in (len(data) // 4, len(data) // 2):
                data[at:at + 32] = b"\x00\xff" * 16
            f.write_bytes(bytes(data))
    elif how == "truncate":  # every array file: the parameters' too, whichever file holds them
        for f in files:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        (run_dir / "checkpoints" / str(step) / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("how", ["overwrite all", "truncate", "metadata"])
def test_a_damaged_checkpoint_is_refused_in_one_line_naming_the_previous_good_step(saved_run, tmp_path, how):
    run_dir = _copy(saved_run, tmp_path)
    _damage(run_dir, 4, how)
    with pytest.raises(sx.CheckpointError) as e:
        load_checkpoint(run_dir)
    message = str(e.value)
    assert "\n" not in message and len(message) < 500, message
    assert "step 4" in message and "damaged" in message and "previous good step is 2" in message, message
    if how == "metadata":
        assert "state/_METADATA is missing" in message
    rows = {r["step"]: r for r in checkpoint.list_checkpoints(run_dir, verify=True)}
    assert rows[2]["status"] == "ok" and rows[4]["status"].startswith("damaged"), rows


def test_training_falls_back_to_the_previous_good_step(saved_run, tmp_path, caplog):
    """Step 4 damaged: a longer run warns, sets step 4 aside, resumes from step 2 and ends
    where an undamaged run ends, bit for bit."""
    run_dir = _copy(saved_run, tmp_path)
    _damage(run_dir, 4, "overwrite")
    cfg = tiny(*SMALL, "train.steps=6", "checkpoint.every=2", "eval.every=100", f"run.dir={run_dir}")
    with caplog.at_level("WARNING", logger="segexec_jax"):
        summary = train.run(cfg)
    assert summary["start_step"] == 2 and summary["step"] == 6
    assert any("step 4" in r.message and "does not match its checksum" in r.message
               and "falling back to step 2" in r.message for r in caplog.records), [r.message for r in caplog.records]
    assert (run_dir / "set_aside" / "4" / "state").is_dir()  # kept, not deleted
    intact = _copy(saved_run, tmp_path / "intact")
    train.run(tiny(*SMALL, "train.steps=6", "checkpoint.every=2", "eval.every=100", f"run.dir={intact}"))
    a, b = load_checkpoint(run_dir)[1], load_checkpoint(intact)[1]
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_resume_from_a_chosen_step(saved_run, tmp_path, capsys):
    """`train.py --resume-from 2`: starts at step 2, sets step 4 aside, rewrites the metrics
    after step 2, and ends equal to the uninterrupted run; an unsaved step is refused,
    listing the saved ones."""
    run_dir = _copy(saved_run, tmp_path)
    args = ["--config", "tiny", *SMALL, "train.steps=4", "checkpoint.every=2", "eval.every=100", "train.log_every=1",
            f"run.dir={run_dir}"]
    assert train.main(["--resume-from", "3", *args]) == 1
    assert "no checkpoint step 3 (saved steps: 2, 4)" in capsys.readouterr().err
    assert train.main(["--resume-from", "2", *args]) == 0
    assert (run_dir / "set_aside" / "4").is_dir()
    rows = lambda d: [(r["step"], sorted(r)) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    assert rows(run_dir) == rows(saved_run)  # steps 3 and 4 once each, as in the uninterrupted run
    a, b = load_checkpoint(run_dir)[1], load_checkpoint(saved_run)[1]
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_list_checkpoints_command(saved_run, tmp_path, capsys):
    run_dir = _copy(saved_run, tmp_path)
    assert checkpoint.main(["list", str(run_dir), "--verify"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out] == [["step", "2"], ["step", "4"]] and all("checksums  ok" in l for l in out)
    _damage(run_dir, 2, "overwrite")
    assert checkpoint.main(["list", str(run_dir), "--verify"]) == 1
    assert "damaged" in capsys.readouterr().out
