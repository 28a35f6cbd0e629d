"""What `python train.py` tells its user: what it is doing before the (long) first compile,
and, for a run that is finished already, that nothing was left to train."""

from helpers import tiny  # noqa: F401  (conftest's devices and paths)

from segexec_jax.training import loop as train

SMALL = ["train.seq_len=64", "train.batch_size=2", "segment.len=16", "segment.tail=4",
         "segment.retrieval.budget=4", "segment.retrieval.query_window=4", "mesh.data=1", "eval.every=1000"]


def test_says_what_it_does_and_that_a_finished_run_is_done(tmp_path, capsys):
    args = ["--config", "tiny", *SMALL, "train.steps=2", f"run.dir={tmp_path / 'run'}"]
    assert train.main(args) == 0
    err = capsys.readouterr().err
    starting, compiling = err.find("INFO training "), err.find("INFO compiling the training step")
    assert 0 <= starting < compiling < err.find("INFO compiled train step"), err
    assert "for 2 steps of 2 × 64 tokens" in err
    assert "done: step 2, loss " in err and "None" not in err
    assert train.main(args) == 0  # again: nothing to do
    err = capsys.readouterr().err
    assert "done already" in err and "holds step 2 of train.steps=2" in err and "None" not in err
