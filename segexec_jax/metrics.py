"""Run metrics: one JSON object per line in `metrics.jsonl`, mirrored as TensorBoard scalars."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._tb = EventFileWriter(str(run_dir / "tensorboard"))
        except ImportError:  # TensorBoard is optional; metrics.jsonl always exists
            self._tb = None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary

            scalars = [Summary.Value(tag=k, simple_value=float(v)) for k, v in record.items()
                       if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v)]
            if scalars:
                self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=scalars)))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def _plain(v):
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v
