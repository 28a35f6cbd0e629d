"""Training: `python train.py [--config NAME|PATH] [key=value ...]`.

With no arguments it trains the tiny preset on the embedded corpus on this machine. A run
directory (`run.dir`) receives the resolved `config.yaml`, `metrics.jsonl`, TensorBoard
events and Orbax checkpoints; running again with the same `run.dir` resumes from the
latest checkpoint (parameters, optimizer, step, RNG and data position), bit for bit; a
checkpoint that fails its checksums is set aside (`run.dir/set_aside/`) and the previous good
one is used, and `--resume-from STEP` picks a saved step (list them with
`python -m segexec_jax.training.checkpoint list RUN_DIR`).
Checkpoints are saved every `checkpoint.every` steps, every `checkpoint.every_minutes`
minutes, and at the last step. SIGTERM saves a checkpoint and exits with status 0; SIGINT
(Ctrl-C) saves one and exits with status 130 (a second Ctrl-C quits at once, without
saving). Only one trainer at a time may use a run directory (a lock file, `train.lock`).
A non-finite loss skips its update; after `train.max_nonfinite` in a row the run saves
and stops.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from etils import epath
from jax.experimental import multihost_utils

from ..cli import ArgumentParser, log_to_stderr
from ..config import Config, ConfigError, dump_config, load_config, preset_names
from ..data import pipeline as data_lib
from ..data.tokenization import TokenizerError, check_fits, load_tokenizer
from ..model.sharding import (
    batch_sharding,
    check_batch,
    global_batch,
    make_mesh,
    replicated,
)
from ..model.transformer import init_params, param_shapes, param_shardings
from ..segment.objective import loss, loss_by_segment, token_count
from .checkpoint import Checkpointer, CheckpointError, as_path, layout
from .metrics import MetricsWriter
from .optim import learning_rate, optimizer

log = logging.getLogger("segexec_jax.train")


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite losses); a checkpoint was saved."""


class RunDirBusy(RuntimeError):
    """Another trainer holds the run directory's lock."""


# --------------------------------------------------------------------------- the step


def strided_micro_batches(a: jax.Array, A: int) -> jax.Array:
    """[B, ...] -> [A, B / A, ...], micro-batch i holding rows i, i + A, i + 2A, ...

    The rows of a batch are sharded over the devices in contiguous blocks; a strided split
    gives every micro-batch some rows of every block, so each stays sharded over all the
    devices (a contiguous split would put micro-batch i on a few devices and make XLA
    gather the tokens). The loss is a token-weighted sum, so the grouping does not change it.
    """
    return jnp.swapaxes(a.reshape((a.shape[0] // A, A) + a.shape[1:]), 0, 1)


def make_train_step(cfg: Config, opt: optax.GradientTransformation):
    """(state, batch) -> (state, metrics): gradient accumulation over `train.grad_accum`
    micro-batches, token-weighted so the result is the mean over the whole batch; the
    update is skipped (state kept) when the loss or the gradient norm is not finite.
    `batch["doc_ids"]` may be None: one document per row."""
    A = cfg.train.grad_accum

    def step(state, batch):
        params = state["params"]
        tokens, docs = batch["tokens"], batch.get("doc_ids")
        split = lambda a: None if a is None else strided_micro_batches(a, A)

        def micro(carry, mb):
            g_acc, l_acc, n_acc = carry
            t, d = mb
            n = token_count(t, d).astype(jnp.float32)
            value, grads = jax.value_and_grad(loss)(params, cfg, t, None, d)
            g_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype) * n, g_acc, grads)
            return (g_acc, l_acc + value * n, n_acc + n), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (g, total, n), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)),
                                        (split(tokens), split(docs)))
        n = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda a, p: (a / n).astype(p.dtype), g, params)
        value = total / n
        grad_norm = optax.tree.norm(grads) if hasattr(optax, "tree") else optax.global_norm(grads)
        ok = jnp.isfinite(value) & jnp.isfinite(grad_norm)

        def update(grads, params, opt_state):
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A conditional, not `where(ok, new, old)` over params and moments: with the select,
        # XLA keeps the old moments alive beside the donated buffers it updates in place and
        # copies every one of them first (CPU, 2 layers at the 1b width: 38 copies writing
        # 1363 MB per step, 16 / 118 MB with the conditional; the plain step's 15 / 151 MB).
        new_params, opt_state = jax.lax.cond(ok, update, lambda g, p, s: (p, s), grads, params, state["opt_state"])
        new_state = dict(params=new_params, opt_state=opt_state, step=state["step"] + 1, rng=state["rng"])
        return new_state, dict(loss=value, grad_norm=grad_norm, finite=ok, tokens=n)

    return step


def compile_step(cfg: Config, opt, mesh, shardings: dict, state, doc_ids: bool = True):
    """The jitted train step, traced on the mesh (the model pins activations at the layer
    boundaries) and compiled for `state`; returns it with the batch's sharding. Without
    `doc_ids` the batch is {"tokens"} alone: one document per row."""
    rows = batch_sharding(mesh, cfg.train.batch_size // cfg.train.grad_accum)
    batch_sh = {"tokens": rows, "doc_ids": rows} if doc_ids else {"tokens": rows}
    step_fn = jax.jit(make_train_step(cfg, opt), in_shardings=(shardings, batch_sh),
                      out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    example = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows) for k in batch_sh}
    with jax.set_mesh(mesh):
        return step_fn.lower(state, example).compile(), rows


def init_state(cfg: Config, opt: optax.GradientTransformation):
    def init():
        params = init_params(cfg, seed=cfg.train.seed)
        return dict(params=params, opt_state=opt.init(params), step=jnp.zeros((), jnp.int32),
                    rng=jax.random.key_data(jax.random.key(cfg.train.seed)))

    return init


def state_shardings(cfg: Config, opt, mesh):
    """Shardings of the whole train state: parameters by the logical rules, optimizer moments
    like their parameters, scalars replicated."""
    abstract = jax.eval_shape(init_state(cfg, opt))
    p_sh = param_shardings(cfg, abstract["params"], mesh)
    rep = replicated(mesh)
    like_params = lambda x: jax.tree.structure(x) == jax.tree.structure(abstract["params"])
    opt_sh = jax.tree.map(lambda x: p_sh if like_params(x) else rep, abstract["opt_state"], is_leaf=like_params)
    return abstract, dict(params=p_sh, opt_state=opt_sh, step=rep, rng=rep)


# --------------------------------------------------------------------------- the run


def _tokenizer_for(cfg: Config):
    """data.tokenizer; when training starts from a converted checkpoint and no tokenizer was
    named, the checkpoint's own."""
    if cfg.data.tokenizer == "bytes" and cfg.train.init_from:
        from .checkpoint import read_meta

        name = read_meta(cfg.train.init_from).get("tokenizer", "bytes")
        if name != "bytes":
            log.info("using the tokenizer of %s", cfg.train.init_from)
            return load_tokenizer(name, search=Path(cfg.train.init_from))
    return load_tokenizer(cfg.data.tokenizer)


# what must agree between a run and the checkpoint it starts from (shapes alone would let a
# different RoPE or normalisation through silently)
ARCHITECTURE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "dim_head", "d_ff",
                     "tie_embeddings", "rope_theta", "rope_scaling", "qkv_bias", "norm_eps")


def _start_from(cfg: Config, opt, state: dict, shardings: dict) -> dict:
    """Replace the fresh parameters by those of `train.init_from` (cast to model.param_dtype),
    read straight into their shardings."""
    from ..model.transformer import check_params, param_shapes
    from .checkpoint import load_checkpoint, read_config

    source_cfg = read_config(cfg.train.init_from)
    differ = [k for k in ARCHITECTURE_KEYS if getattr(source_cfg.model, k) != getattr(cfg.model, k)]
    if differ:
        detail = ", ".join(f"model.{k}: {getattr(cfg.model, k)!r} here, {getattr(source_cfg.model, k)!r} there"
                           for k in differ)
        raise ConfigError(f"config key 'train.init_from': the model of {cfg.train.init_from} differs ({detail}); "
                          f"start from its config (--config {cfg.train.init_from}) and layer overrides on it")
    source = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(source_cfg.model.param_dtype)),
                          param_shapes(source_cfg), is_leaf=lambda x: isinstance(x, tuple))
    try:
        check_params(source, state["params"])
    except ValueError as e:
        raise ConfigError(f"config key 'train.init_from': {e}") from None
    _, loaded = load_checkpoint(cfg.train.init_from, shardings["params"])
    dtypes = jax.tree.map(lambda ref: ref.dtype, state["params"])
    cast = lambda tree: jax.tree.map(lambda a, dt: a.astype(dt), tree, dtypes)
    params = jax.jit(cast, out_shardings=shardings["params"], donate_argnums=0)(loaded)
    log.info("initialised the parameters from %s", cfg.train.init_from)
    opt_state = jax.jit(opt.init, out_shardings=shardings["opt_state"])(params)
    return dict(state, params=params, opt_state=opt_state)


def _check_resume_compatible(run_dir: Path, cfg: Config) -> None:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = yaml.safe_load(saved.read_text()) or {}
    new = cfg.to_dict()
    changed = [f"{sec}.{k}" for sec in ("model", "segment", "attention") for k in new[sec]
               if old.get(sec, {}).get(k) != new[sec][k]]
    if changed:
        raise CheckpointError(f"run.dir {str(run_dir)!r} holds a run whose config differs in "
                              f"{', '.join(changed)}; use another run.dir or the same settings")


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step",
                file=sys.stderr, mininterval=0.5)


def evaluate(cfg: Config, eval_fn, params, val_ds, rows) -> dict:
    sums, counts = None, None
    it = iter(val_ds)
    for _ in range(cfg.eval.batches):
        batch = global_batch(next(it), rows)
        s, c = eval_fn(params, batch["tokens"], batch["doc_ids"])
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    it.close()
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    by_segment = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return {"val_loss": float(sums.sum() / max(counts.sum(), 1)),
            "val_loss_by_segment": [round(float(x), 5) for x in by_segment]}


LOCK_FILE = "train.lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: epath.Path, main_process: bool):
    """Hold `run_dir/train.lock` for the run (process 0 holds it for all the processes): a
    second trainer on the same directory stops with `RunDirBusy` before it touches anything.

    An flock, which the kernel releases when its process dies, even by SIGKILL: a killed run
    never blocks its rerun (a file that merely exists would). Object stores (gs://...) have
    no such lock: there the run goes on with a warning, and keeping to one trainer is up to
    the user."""
    handle, busy = None, ""
    if main_process and "://" in os.fspath(run_dir):
        log.warning("run.dir %s is not a local path: no run-directory lock, so nothing stops a second "
                    "trainer on it", run_dir)
    elif main_process:
        path = Path(os.fspath(run_dir))
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            handle = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                busy = (f"run.dir {path} is in use by another trainer ({holder or 'holder unknown'}; lock "
                        f"{path / LOCK_FILE}); wait for it to finish, stop it, or use another run.dir")
            else:  # a file system without flock (some Lustre mounts)
                log.warning("cannot lock run.dir %s (%s): going on without a run-directory lock", path, e)
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
    if jax.process_count() > 1:  # the others learn process 0's outcome, or they would wait for it forever
        if multihost_utils.broadcast_one_to_all(np.int32(bool(busy))) and not busy:
            busy = f"run.dir {run_dir} is in use by another trainer (process 0 could not lock it)"
    if busy:
        raise RunDirBusy(busy)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock; the file stays (removing it would race a new trainer)


def run(cfg: Config, resume_from: int | None = None) -> dict:
    """Train `cfg` (resuming from `run.dir`'s latest good checkpoint, or from step
    `resume_from`); returns a summary. Raises `RunDirBusy` when another trainer uses `run.dir`."""
    run_dir = as_path(cfg.run.dir)  # local or a URI Orbax and etils reach (gs://...)
    with run_dir_lock(run_dir, jax.process_index() == 0):
        return _run(cfg, run_dir, resume_from)


def _run(cfg: Config, run_dir: epath.Path, resume_from: int | None = None) -> dict:
    main_process = jax.process_index() == 0
    if main_process:
        n_params = sum(math.prod(s) for s in jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)))
        log.info("training %.1fM parameters (%s attention) for %d steps of %d × %d tokens in %s",
                 n_params / 1e6, cfg.attention.mode, cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len, run_dir)
    try:
        tokenizer = _tokenizer_for(cfg)
        check_fits(tokenizer, cfg.model.vocab_size)
    except TokenizerError as e:
        raise ConfigError(str(e)) from None
    mesh = make_mesh(cfg)
    check_batch(cfg, mesh)
    opt = optimizer(cfg.train)
    abstract, shardings = state_shardings(cfg, opt, mesh)

    train_ds = data_lib.prefetch(data_lib.dataset(cfg, tokenizer, "train", process_index=jax.process_index(),
                                                  process_count=jax.process_count()))
    val_ds = (data_lib.dataset(cfg, tokenizer, "validation", process_index=jax.process_index(),
                               process_count=jax.process_count())
              if data_lib.has_validation(cfg) else None)  # data.val_fraction=0: no evaluation
    train_it = iter(train_ds)

    ckpt = Checkpointer(run_dir, keep=cfg.checkpoint.keep)
    meta = layout(cfg, getattr(tokenizer, "name", cfg.data.tokenizer))
    if resume_from is not None and ckpt.latest_step() is None:
        raise CheckpointError(f"--resume-from {resume_from}: {run_dir} holds no checkpoint")
    start, state = None, None
    if ckpt.latest_step() is not None:
        _check_resume_compatible(run_dir, cfg)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        # the latest good step (a damaged one is set aside with a warning); train_it: this
        # process's own position
        start, state = ckpt.restore_latest(target, train_it, step=resume_from)
        log.info("resuming from step %d in %s", start, run_dir)
    if start is None:
        state = jax.jit(init_state(cfg, opt), out_shardings=shardings)()
        if cfg.train.init_from:
            state = _start_from(cfg, opt, state, shardings)
        start = 0
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    # rows past the restored step were logged by the stopped run and are about to be logged again
    metrics = MetricsWriter(run_dir, enabled=main_process, keep_through=start)

    if main_process:
        log.info("compiling the training step on %d %s device(s) (%s)...", mesh.size, jax.devices()[0].platform,
                 " × ".join(f"{k} {v}" for k, v in mesh.shape.items() if v > 1) or "no sharding")
    compiled, rows = compile_step(cfg, opt, mesh, shardings, state)
    eval_fn = jax.jit(lambda p, t, d: loss_by_segment(p, cfg, t, d))
    eval_rows = batch_sharding(mesh, cfg.train.batch_size)
    schedule = learning_rate(cfg.train)
    T = cfg.train.seq_len
    B = cfg.train.batch_size
    mem = compiled.memory_analysis()
    if main_process and mem is not None:
        log.info("compiled train step: %.1f MiB temporaries, %.1f MiB arguments",
                 mem.temp_size_in_bytes / 2**20, mem.argument_size_in_bytes / 2**20)

    stop_requested = {"signal": None}

    def on_signal(signum, frame):
        if signum == signal.SIGINT and stop_requested["signal"] == signal.SIGINT:
            # a second Ctrl-C: quit now, without a checkpoint, as the caller's handler does
            # (the command line's `quit_now`; Python's raises KeyboardInterrupt)
            handler = previous.get(signal.SIGINT)
            if callable(handler):
                handler(signum, frame)
            raise KeyboardInterrupt
        stop_requested["signal"] = signum

    # a flag checked after each step (a signal in the middle of a step or a save would leave
    # neither finished); handlers can only be set from the main thread, and a signal the
    # caller ignores stays ignored (a shell starts `python train.py &` with SIGINT ignored)
    on_main_thread = threading.current_thread() is threading.main_thread()
    handled = [s for s in (signal.SIGTERM, signal.SIGINT) if on_main_thread and signal.getsignal(s) != signal.SIG_IGN]
    previous = {s: signal.signal(s, on_signal) for s in handled}
    every_s = 60 * (cfg.checkpoint.every_minutes or 0)
    nonfinite_in_a_row = 0
    last_saved, last_saved_at = start, time.monotonic()
    bar = _progress(cfg.train.steps, start, main_process)
    t_last, tokens_since = time.perf_counter(), 0
    wait_total, step_total = 0.0, 0.0
    summary: dict[str, Any] = {"start_step": start}
    step = start
    try:
        while step < cfg.train.steps:
            t0 = time.perf_counter()
            local = next(train_it)
            t1 = time.perf_counter()
            batch = global_batch(local, rows)
            state, out = compiled(state, batch)
            out = jax.device_get(out)
            step += 1
            t2 = time.perf_counter()
            wait_total += t1 - t0
            step_total += t2 - t0
            tokens_since += B * T
            if not out["finite"]:
                nonfinite_in_a_row += 1
                log.warning("step %d: non-finite loss (%s) or gradient norm (%s); update skipped",
                            step, out["loss"], out["grad_norm"])
            else:
                nonfinite_in_a_row = 0
            if step % cfg.train.log_every == 0 or step == cfg.train.steps or not out["finite"]:
                now = time.perf_counter()
                rate = tokens_since / max(now - t_last, 1e-9)
                record = dict(loss=float(out["loss"]), grad_norm=float(out["grad_norm"]),
                              lr=float(schedule(step - 1)), tokens_per_s=round(rate, 1),
                              data_wait_fraction=round(wait_total / max(step_total, 1e-9), 4),
                              finite=bool(out["finite"]))
                metrics.write(step, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{rate:,.0f}")
                t_last, tokens_since = now, 0
            bar.update(1)
            if val_ds is not None and (step % cfg.eval.every == 0 or step == cfg.train.steps):
                with jax.set_mesh(mesh):
                    metrics.write(step, evaluate(cfg, eval_fn, state["params"], val_ds, eval_rows))
            time_due = every_s > 0 and time.monotonic() - last_saved_at >= every_s
            if jax.process_count() > 1:  # every process stops and saves at the same steps
                flags = multihost_utils.process_allgather(np.array([stop_requested["signal"] or 0, time_due],
                                                                   np.int32))
                stop_requested["signal"] = next((int(s) for s in flags[:, 0] if s), None)
                time_due = bool(flags[0, 1])  # process 0's clock decides
            stop = stop_requested["signal"] is not None or nonfinite_in_a_row >= cfg.train.max_nonfinite
            if step % cfg.checkpoint.every == 0 or step == cfg.train.steps or stop or time_due:
                ckpt.save(step, state, train_it, meta)
                last_saved, last_saved_at = step, time.monotonic()
            if stop_requested["signal"] is not None:
                summary["stopped_by"] = signal.Signals(stop_requested["signal"]).name
                break
            if nonfinite_in_a_row >= cfg.train.max_nonfinite:
                ckpt.wait()
                raise TrainingStopped(f"{nonfinite_in_a_row} non-finite losses in a row (train.max_nonfinite); "
                                      f"checkpoint saved at step {step} in {ckpt.directory}")
        ckpt.wait()
    finally:
        bar.close()
        metrics.close()
        train_it.close()
        ckpt.close()
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    if "stopped_by" in summary and main_process:  # after the bar is closed: a line of its own
        log.warning("%s: saved checkpoint at step %d in %s, exiting; run the same command to resume",
                    summary["stopped_by"], step, ckpt.directory)
    summary.update(step=step, last_saved=last_saved, loss=float(out["loss"]) if step > start else None,
                   data_wait_fraction=wait_total / max(step_total, 1e-9))
    return summary


# --------------------------------------------------------------------------- command line


def quit_now(signum, frame):
    """The command line's Ctrl-C outside the training loop (setup, compilation), or a second one
    inside it: leave at once with one line. The checkpoints already saved are complete (Orbax
    moves a step into place only when it is whole). `os._exit` rather than KeyboardInterrupt:
    no 30-line traceback, and no interpreter teardown, which crashed (SIGSEGV) when the
    interrupt came while XLA was compiling."""
    sys.stderr.write("\ninterrupted: exiting without saving a checkpoint (the ones already saved are kept)\n")
    sys.stderr.flush()
    os._exit(130)


def use_compilation_cache() -> None:
    """Keep compiled programs in `$SEGEXEC_CACHE_DIR/jax` (~/.cache/segexec_jax/jax) unless
    JAX_COMPILATION_CACHE_DIR names another place: a rerun or a resume compiles in seconds.
    `train.py` calls it for single-process runs."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(data_lib.cache_dir() / "jax"))


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python train.py", description=__doc__)
    parser.add_argument("--config", default="tiny",
                        help=f"preset ({', '.join(preset_names())}), YAML path or run directory")
    parser.add_argument("--coordinator", default=os.environ.get("SEGEXEC_COORDINATOR"),
                        help="multi-host: coordinator host:port (with --num-processes and --process-id)")
    parser.add_argument("--num-processes", type=int, default=int(os.environ.get("SEGEXEC_NUM_PROCESSES", "1")))
    parser.add_argument("--process-id", type=int, default=int(os.environ.get("SEGEXEC_PROCESS_ID", "0")))
    parser.add_argument("--resume-from", type=int, metavar="STEP",
                        help="resume from this saved step of run.dir, not the latest (the later steps are "
                             "moved to run.dir/set_aside/); list them with python -m segexec_jax.training.checkpoint list")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=100 run.dir=runs/x")
    args = parser.parse_args(argv)
    log_to_stderr(logging.INFO)  # not logging.basicConfig: importing Orbax configured the root logger
    previous = None  # `run` saves in its loop; an ignored SIGINT (`python train.py &`) stays ignored
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        previous = signal.signal(signal.SIGINT, quit_now)
    try:
        return _main(args)
    finally:
        if previous is not None:  # main() called from Python: give the caller its handler back
            signal.signal(signal.SIGINT, previous)


def _main(args: argparse.Namespace) -> int:
    if not args.coordinator:  # with several processes on CPU (gloo) a cached program hung the first step
        use_compilation_cache()
    if args.coordinator:
        # CPU devices need a collectives library across processes (GPUs use NCCL); this must
        # be set before anything initialises the backend.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = run(cfg, resume_from=args.resume_from)
    except (ConfigError, CheckpointError, data_lib.DataError, TrainingStopped, RunDirBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary.get("stopped_by") == "SIGINT":
        return 130  # the shell's status for Ctrl-C; the checkpoint line is already out
    if jax.process_index() == 0:
        if summary["loss"] is None:  # resumed at train.steps already: nothing was trained
            print(f"done already: {cfg.run.dir} holds step {summary['step']} of train.steps={cfg.train.steps}; "
                  f"to train further, raise train.steps (e.g. train.steps={2 * cfg.train.steps})", file=sys.stderr)
        else:
            print(f"done: step {summary['step']}, loss {summary['loss']:.4f}, run directory {cfg.run.dir}",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
