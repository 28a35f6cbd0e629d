"""Run metrics: one JSON object per line in `metrics.jsonl`, mirrored as TensorBoard scalars.

The run directory may be local or a URI etils reaches (gs://...). A local file gets each
line as it is written; an object store cannot append (gcsfs opens "a" as "w"), so there
the file is rewritten whole, keeping what an earlier run of the same directory logged, at
most every `flush_seconds` and at close.

A run that resumes from step N passes `keep_through=N`: rows of later steps (logged by the
run that was stopped after its last checkpoint, and about to be logged again) and a line
torn by a kill are dropped, so every step appears once. TensorBoard event files cannot be
edited: a resumed run starts a new one with a session-start record at step N + 1, from
which TensorBoard drops the older files' rows of step N + 1 on, so there too every step
appears once.
"""

from __future__ import annotations

import json
import math
import os
import time

from etils import epath


class MetricsWriter:
    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, flush_seconds: float = 60.0,
                 keep_through: int | None = None):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        run_dir = epath.Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._path = run_dir / "metrics.jsonl"
        self._remote = "://" in os.fspath(run_dir)
        self._flush_seconds, self._flushed = flush_seconds, time.monotonic()
        lines = []
        if (self._remote or keep_through is not None) and self._path.exists():
            lines = self._path.read_text().splitlines(keepends=True)
        if keep_through is not None:
            kept = [line for line in lines if (s := _step_of(line)) is not None and s <= keep_through]
            if kept != lines:
                self._replace("".join(kept))
            lines = kept
        if self._remote:
            self._lines = lines
        else:
            self._jsonl = self._path.open("a")
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._tb = EventFileWriter(os.fspath(run_dir / "tensorboard"))
        except ImportError:  # TensorBoard is optional; metrics.jsonl always exists
            self._tb = None
        if self._tb is not None and keep_through is not None:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            self._tb.add_event(Event(wall_time=time.time(), step=int(keep_through) + 1,
                                     session_log=SessionLog(status=SessionLog.START)))

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        line = json.dumps(record) + "\n"
        if self._remote:
            self._lines.append(line)
            if time.monotonic() - self._flushed >= self._flush_seconds:
                self._rewrite()
        else:
            self._jsonl.write(line)
            self._jsonl.flush()  # a killed run keeps every line it logged
        if self._tb is not None:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary

            scalars = [Summary.Value(tag=k, simple_value=float(v)) for k, v in record.items()
                       if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v)]
            if scalars:
                self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=scalars)))

    def _replace(self, text: str) -> None:
        """Rewrite the file whole; locally through a temporary file, so a kill keeps one version."""
        if self._remote:
            self._path.write_text(text)
            return
        tmp = self._path.parent / (self._path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self._path)

    def _rewrite(self) -> None:
        self._path.write_text("".join(self._lines))
        self._flushed = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            if self._remote:
                self._rewrite()
            else:
                self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def _step_of(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line that is not a complete record."""
    try:
        step = json.loads(line).get("step") if line.endswith("\n") else None
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _plain(v):
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v
