"""`python -m segexec_jax.aot`: compiling for a TPU slice on this machine (libtpu's
compile-only devices). The splash kernels lower through Mosaic for a v5e and a v5p chip
(interpret mode, in test_splash.py, checks their arithmetic); wrong topologies and meshes
give one clear error; the collectives of a compiled step are counted from its HLO text."""

import json
import os
import subprocess
import sys
import warnings

import pytest

from segexec_jax.evaluation import aot


def _libtpu_missing() -> str | None:
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        return (f"libtpu is not installed ({e}): `pip install -e '.[dev]'` brings it on Linux "
                "(x86_64, aarch64); elsewhere no libtpu wheel exists")
    return None


MISSING = _libtpu_missing()
if MISSING:  # said out loud, in the warnings summary, not only as an 's'
    warnings.warn(f"tests/test_aot.py: TPU compile tests skipped: {MISSING}", stacklevel=1)
needs_libtpu = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

# a tiny model whose heads are 128 wide (the TPU's lanes: splash takes them) and whose
# segments and prefix fill whole 128-token blocks
SMALL = ["model.d_model=256", "model.n_heads=2", "model.n_kv_heads=2", "model.d_ff=512",
         "segment.len=128", "segment.tail=128", "segment.retrieval.budget=128", "train.seq_len=512"]


def run_aot(*args: str) -> subprocess.CompletedProcess:
    """The command line in a fresh process: libtpu loads there alone, after its environment
    is set, whatever this test worker has loaded already."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the host's simulated devices are not the slice's
    return subprocess.run([sys.executable, "-m", "segexec_jax.aot", *args], capture_output=True, text=True,
                          env=env, timeout=600, check=False)


# --------------------------------------------------------------------------- no compiling


@pytest.mark.parametrize("name,error", [
    ("v5e:4x4x4", "2D"), ("v5p:4x4", "3D"), ("v7:2x2", "GENERATION"), ("v5e", "AxB"), ("tpu:2x2", "v5e"),
])
def test_bad_topology_names(name, error):
    with pytest.raises(aot.AotError, match=error):
        aot.parse_topology(name)


def test_topology_sizes():
    assert aot.parse_topology("v5e:4x4") == ("v5e", 16)
    assert aot.parse_topology("v5p:4x4x4") == ("v5p", 64)


class Mesh:  # the config's mesh section, as check_mesh reads it
    def __init__(self, data, fsdp, tensor):
        self.mesh = type("M", (), dict(data=data, fsdp=fsdp, tensor=tensor))


@pytest.mark.parametrize("mesh,ok", [((-1, 1, 1), True), ((1, 16, 1), True), ((2, 4, 2), True),
                                     ((1, 8, 1), False), ((-1, 3, 1), False), ((4, 4, 4), False),
                                     ((0, 16, 1), False)])
def test_mesh_must_use_the_whole_slice(mesh, ok):
    if ok:
        aot.check_mesh(Mesh(*mesh), 16, "v5e:4x4")
    else:
        with pytest.raises(aot.AotError, match="mesh"):
            aot.check_mesh(Mesh(*mesh), 16, "v5e:4x4")


def test_bad_mesh_flag():
    with pytest.raises(aot.AotError, match="DATA,FSDP,TENSOR"):
        aot.mesh_overrides("2x8")


HLO = """HloModule jit_step, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%cond (p: (s32[], f32[1024])) -> pred[] {
  %p = (s32[]{:T(128)}, f32[1024]{0}) parameter(0)
  %c = s32[]{:T(128)} constant(8)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %p = (s32[]{:T(128)}, f32[1024]{0}) parameter(0)
  %x = f32[1024]{0} get-tuple-element(%p), index=1
  %ag = bf16[4,1024]{1,0:T(8,128)} all-gather(%x), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %ar = f32[1024]{0:T(1024)} all-reduce(%x), channel_id=2, to_apply=%add
  ROOT %t = (s32[], f32[1024]) tuple(%i, %ar)
}

ENTRY %main (param.1: f32[1024], /*index=1*/param.2: f32[4096]) -> f32[1024] {
  %param.2 = f32[4096]{0} parameter(1)
  %rs = f32[1024]{0} reduce-scatter(f32[4096]{0} %param.2), channel_id=3, dimensions={0}, to_apply=%add
  %w = (s32[], f32[1024]) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[1024]{0} get-tuple-element(%w), index=1
}
"""


def test_collectives_count_loops_by_their_trip_count():
    found = aot.collectives(HLO)
    assert found["all-gather"] == dict(count=8, bytes=8 * 4 * 1024 * 2)
    assert found["all-reduce"] == dict(count=8, bytes=8 * 1024 * 4)
    assert found["reduce-scatter"] == dict(count=1, bytes=4096 * 4)  # its input, the larger side
    assert "loops_counted_once" not in found


def test_collectives_unknown_trip_count_is_said():
    found = aot.collectives(HLO.replace("direction=LT", "direction=NE"))
    assert found["all-reduce"]["count"] == 1 and found["loops_counted_once"] == 1


# --------------------------------------------------------------------------- compiling for a slice


def test_command_line_errors_are_one_line(tmp_path):
    """A wrong name, a mesh that does not fill the slice (--mesh wins over a layered YAML's
    mesh), a slice libtpu does not have: exit 2, one line on stderr, no traceback."""
    layered = tmp_path / "mesh.yaml"
    layered.write_text("mesh:\n  fsdp: 4\n")
    for args, words in [(["--topology", "v5e:2x2x2"], "2D"),
                        (["--topology", "v5e:2x2", "--mesh", "1,3,1", str(layered)], "3 chips, but v5e:2x2 has 4"),
                        (["--topology", "v5e:3x3"], "libtpu does not know it")]:
        if "libtpu" in words and MISSING:
            continue
        proc = run_aot("--config", "tiny", *args)
        assert proc.returncode == 2, proc.stderr
        assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@needs_libtpu
@pytest.mark.parametrize("topology,kind", [("v5e:2x2", "TPU v5 lite"), ("v5p:2x2x1", "TPU v5")])
def test_train_step_compiles_with_mosaic_splash(topology, kind):
    """The real training step (2 micro-batches, AdamW, FSDP × data) for a 4-chip slice, with
    `attention.backend: auto` taking splash as on the TPU: its kernels are Mosaic custom
    calls in the compiled program, not interpret mode; the memory per chip is XLA's and fits;
    the gradients' reductions show up as collectives."""
    programs = "train,prefill,decode" if topology.startswith("v5e") else "train"
    proc = run_aot("--config", "tiny", "--topology", topology, "--mesh", "2,2,1", "--programs", programs, "--json",
                   *SMALL, "train.grad_accum=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device"].startswith(kind) and result["mesh"] == dict(data=2, fsdp=2, tensor=1)
    train = result["programs"]["train"]
    assert train["mosaic_kernels"] > 0
    assert train["fits"] and 0 < train["total_bytes"] < 10**9 and train["bytes"]["aliased"] > 0
    kinds = set(train["collectives"])
    assert {"all-reduce", "all-gather"} & kinds and "loops_counted_once" not in kinds, train["collectives"]
    assert all(c["count"] > 0 and c["bytes"] > 0 for k, c in train["collectives"].items())
    for name in programs.split(",")[1:]:
        assert result["programs"][name]["fits"] and result["programs"][name]["chips"] == 1
