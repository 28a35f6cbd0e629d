"""TensorBoard after a resume: each step once, with the resumed run's values."""

import time

from segexec_jax.training.metrics import MetricsWriter


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    w = MetricsWriter(tmp_path, keep_through=0)
    for step in range(1, 6):
        w.write(step, {"loss": float(step)})
    w.close()
    time.sleep(1.1)  # event files are named by the second they start in
    w = MetricsWriter(tmp_path, keep_through=3)  # resumed from step 3: steps 4 and 5 again
    for step in (4, 5, 6):
        w.write(step, {"loss": 10.0 * step})
    w.close()
    assert scalars(tmp_path, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
