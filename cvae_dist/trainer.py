"""The training loop. `prepare` checks everything and builds a run's parts, writing nothing (a refusal leaves every
file as it was); `Trainer` starts them (resumed state, loss meter, telemetry, logging, checkpoints); `fit` runs the
epochs of (stream -> step -> a step line every `log.every_steps`) and exports. `Trainer.steps` is the one loop over
batches: `cvae-dist bench` times it as it is."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime  # (TIME_FORMAT counts microseconds, which time.strftime cannot)
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, is_compiled_module, set_seed
from tqdm.auto import tqdm

from cvae_dist import checkpoint, distributed, evaluation, faults, files, profiling, telemetry
from cvae_dist.batchnorm import use_global_batchnorm
from cvae_dist.checkpoint import Checkpointer, TrainerState
from cvae_dist.config import TIME_FORMAT, ConfigError, JobConfig, NonFinite, flat_settings, to_dict
from cvae_dist.data import Batch, DataError, RankStream, batch_share, decoded_cache, load_split, to_model_input
from cvae_dist.evaluation import fixed_noise
from cvae_dist.faults import ProfileSignal, StopSignal, run_status
from cvae_dist.images import save_grid
from cvae_dist.loss_meter import LossMeter
from cvae_dist.metrics import RankRecord, RunLogger, buffer_digest, code_commit, parameter_digest
from cvae_dist.model import CVAE, count_parameters
from cvae_dist.step import EagerStep, GraphStep, apply_step_mode, make_step
from cvae_dist.telemetry import NoTimer, RankTable, StepTimer, StragglerDetector, compute_dtype


@dataclass
class TrainResult:
    run_dir: Path
    epoch_losses: list[float]
    steps: int


def train(cfg: JobConfig) -> TrainResult:
    """Train `cfg` on however many processes `accelerate launch` started."""
    with StopSignal() as stop, ProfileSignal() as profile_signal:  # SIGUSR2: profile the next steps
        parts = prepare(cfg)  # everything that can be checked is, before the run directory is written
        try:
            files.write_run_dir(parts.dir, cfg, parts.setup.accelerator)
            if parts.setup.accelerator.is_main_process:
                faults.tell_wrapper(parts.dir)
            with run_status(parts.dir, parts.setup.accelerator.is_main_process):
                stop.arm(resume_command(parts.cfg))
                trainer = Trainer(parts, profile_signal.take)
                with trainer.profiler:  # a CUDA out-of-memory error writes its memory snapshot; no profiler outlives
                    epoch_losses = trainer.fit(stop)
        finally:  # every way out (completed, preempted, interrupted, failed): no graph may outlive the process group
            try:
                parts.step.close()  # (bounded, and it never raises: the error that ended the run is the one to see)
            finally:
                parts.lock.release()
    parts.setup.accelerator.end_training()
    return TrainResult(parts.dir, epoch_losses, parts.state.step)


@dataclass(frozen=True)
class Steps:
    """What `Trainer.steps` did: whether the ranks agreed to stop, and its step lines (every rank has them)."""

    stopped: bool
    lines: list[dict]


@dataclass(frozen=True)
class Sent:
    """An exchange on its way: sent at `step` (a step line's, or a stop poll's), read by `read()`."""

    step: int
    epoch: int
    line: bool
    time: float  # when it was sent (time.time())
    skipped: int  # a step line's: the steps of its interval (log.every_steps) dropped for non-finite gradients
    read: Callable[[], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Parts:
    """One run on this rank as `prepare` built it: prepared by accelerate, checked, and nothing written yet."""

    cfg: JobConfig
    setup: distributed.Setup  # the accelerator and what was decided with it (precision, ZeRO stage, step mode)
    dir: Path
    model: torch.nn.Module  # prepared: DDP / DeepSpeed engine (compiled where accelerate compiles)
    optimizer: torch.optim.Optimizer
    stream: RankStream
    step: EagerStep | GraphStep  # holds the same prepared model
    batch: int  # this rank's
    global_batch: int
    steps_per_epoch: int  # agreed: the same on every rank
    bad_records: int  # skipped in each epoch (data.on_bad_record=skip), all ranks together
    lock: files.RunLock  # held from the first check to the run's end: no other launch trains into `dir`
    state: TrainerState  # this launch's, at the resumed checkpoint's place in training where it continues one
    resume: checkpoint.Resume | None  # the checkpoint this run continues
    changed: dict[str, tuple[object, object]]  # settings the resume changes: {key: (as trained, now)}
    eval_pixels: torch.Tensor
    eval_labels: torch.Tensor
    prior: torch.Tensor  # fixed latent draws for the sample half of the figure


def prepare(cfg: JobConfig, setup: distributed.Setup | None = None) -> Parts:
    """Process group, the run directory's name and the checkpoint to resume, model / AdamW / this rank's data
    stream prepared by accelerate, and the held-out digits. Writes nothing."""
    distributed.set_determinism(cfg.train.deterministic)
    setup = setup or distributed.make_accelerator(cfg)
    accelerator = setup.accelerator
    threads = distributed.set_threads()
    run_dir, lock, resume = _locate_run(accelerator, cfg)
    with lock.released_on_error():
        return _build(cfg, setup, threads, run_dir, lock, resume)


def _build(cfg: JobConfig, setup: distributed.Setup, threads: int, run_dir: Path, lock: files.RunLock,
           resume: checkpoint.Resume | None) -> Parts:  # fmt: skip
    """`prepare`'s parts, once the run directory is agreed and locked."""
    accelerator = setup.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    accelerator.print(
        f"device {distributed.describe_device(accelerator)}, {world} process(es), "
        f"precision {setup.precision} ({setup.precision_reason}), {threads} thread(s) each"
    )
    set_seed(cfg.train.seed)  # same initial weights on every rank
    model = CVAE(cfg.model)
    accelerator.print(f"trainable parameters: {count_parameters(model):,}")
    if cfg.train.channels_last and not setup.deepspeed:
        # DeepSpeed broadcasts parameters as flat bytes and needs them contiguous; inputs stay channels_last.
        model = model.to(memory_format=torch.channels_last)
    if setup.global_batchnorm:  # the same statistics on every rank: the global batch's
        model = use_global_batchnorm(model)
    if cfg.train.on_nonfinite is NonFinite.skip and setup.deepspeed:
        raise ConfigError("train.on_nonfinite=skip is not available under DeepSpeed (its engine steps inside "
                          "backward); accepted there: error")  # fmt: skip
    # capturable and the lr's form are the step mode's: `apply_step_mode` (after any load_state) sets them
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
    share = batch_share(cfg.data.batch_size, world, rank)  # this rank's rows of every global batch
    batch, global_batch = share.stop - share.start, cfg.data.batch_size
    workers = distributed.data_workers(cfg.data.num_workers, accelerator.device)
    stream = RankStream(cfg.data, rank, world, cfg.train.seed, workers, accelerator.device,
                        accelerator.local_main_process_first)  # fmt: skip
    steps_per_epoch, bad_records = _agree_on_steps(accelerator, stream)
    distributed.configure_deepspeed(setup, cfg, batch)
    side_stream = torch.cuda.Stream() if setup.graph else None  # a graph's DDP is wrapped on the stream it warms up on
    with torch.cuda.stream(side_stream) if setup.graph else contextlib.nullcontext():
        model, optimizer = accelerator.prepare(model, optimizer)
    if setup.graph:
        torch.cuda.current_stream().wait_stream(side_stream)
    if setup.deepspeed:
        distributed.load_deepspeed_weights_only(model)
    state = TrainerState(world_size=world, per_rank_batch_size=batch, global_batch_size=global_batch,
                         data_path="resident" if stream.resident else "streamed", zero_stage=setup.zero_stage,
                         model=cfg.model.shape(), engine="deepspeed" if setup.deepspeed else "ddp",
                         data_workers=workers if stream.order_depends_on_workers else 0,
                         settings=flat_settings(cfg))  # fmt: skip
    changed = {}
    if resume is not None:
        changed = checkpoint.check_compatible(resume.state, resume.path, state)
        checkpoint.check_pickles(resume.path)
        state = state.continued(resume.state)
        if not resume.own:  # a new run from another run's checkpoint: its own W&B run
            state.wandb_run_id = None
    eval_pixels, eval_labels = load_split(cfg.data.source, cfg.data.eval_split)
    prior = torch.randn(evaluation.GRID_IMAGES, cfg.model.latent_dim,
                        generator=torch.Generator().manual_seed(cfg.train.seed))  # fmt: skip
    step = make_step(setup, model, optimizer, cfg, share, side_stream)
    return Parts(cfg, setup, run_dir, model, optimizer, stream, step, batch, global_batch, steps_per_epoch,
                 bad_records, lock, state, resume, changed, eval_pixels, eval_labels, prior)  # fmt: skip


class Trainer:
    """A prepared run, started: the resumed weights and state, the loss meter, telemetry, logging and the
    checkpointer, all built here (the run directory exists by now). `fit` trains it to the end; `steps` is its one
    loop over batches."""

    # The parts, read where they are: one owner each (a copy here could be swapped apart from the step's model).
    cfg = property(lambda self: self.parts.cfg)
    setup = property(lambda self: self.parts.setup)
    accelerator = property(lambda self: self.parts.setup.accelerator)
    dir = property(lambda self: self.parts.dir)
    state = property(lambda self: self.parts.state)
    model = property(lambda self: self.parts.model)
    optimizer = property(lambda self: self.parts.optimizer)
    step = property(lambda self: self.parts.step)
    stream = property(lambda self: self.parts.stream)

    def __init__(self, parts: Parts, profile_requests: Callable[[], bool] | None = None):
        """`profile_requests()`: whether SIGUSR2 asked this rank for a profile since the last call."""
        self.parts = parts
        accelerator = parts.setup.accelerator
        resume = parts.resume
        if resume is not None:
            accelerator.load_state(str(resume.path))
            accelerator.print(f"resumed from {resume.path}: epoch {self.state.epoch}, step {self.state.step}")
            if accelerator.is_main_process and resume.own:
                for moved in checkpoint.set_aside_newer(self.dir, resume.state.step):
                    why = "failed its checks" if moved.name.endswith(".corrupt") else "is newer than the one resumed"
                    accelerator.print(f"set aside a checkpoint that {why}: {moved}")
            accelerator.wait_for_everyone()
        for key, (before, now) in parts.changed.items():
            accelerator.print(f"resume changes {key}: {before!r} -> {now!r}")
        train, graph = self.cfg.train, isinstance(self.step, GraphStep)
        apply_step_mode(self.optimizer, graph, train.lr, accelerator.device, train.weight_decay)
        self.meter = LossMeter.from_state(self.state.loss, accelerator.device, accelerator.process_index,
                                          self.state.step, accelerator.num_processes)  # fmt: skip
        identity = distributed.rank_identity(accelerator)
        self.identities = gather_object([identity])  # once, at start: host and machine of every rank
        blocked_unknown = self.blocked_unknown()
        if self.cfg.log.telemetry:
            mfu_facts = self.mfu_facts()
            self.timer = StepTimer(accelerator.device, parts.batch, mfu_facts["flops_per_image"],
                                   mfu_facts["peak_flops"], blocked_unknown)  # fmt: skip
        else:  # images over wall time only: no hooks, no FLOP count, no peak benchmark
            mfu_facts, self.timer = {}, NoTimer(parts.batch)
        if not isinstance(self.step, GraphStep):  # hooks do not run inside a replayed CUDA graph
            self.timer.instrument(self.model, self.optimizer)
        if self.cfg.log.telemetry and blocked_unknown:
            accelerator.print(f"straggler detection: off ({blocked_unknown}); busy img/s and sync wait are n/a")
        self.stragglers = StragglerDetector(self.cfg.log, accelerator.num_processes)
        self.table = RankTable(self.identities)
        facts = {
            "compute_dtype": self.compute_dtype(), "compiled": is_compiled_module(self.model),
            "per_rank_batch_size": parts.batch, "global_batch_size": parts.global_batch,
            "steps_per_epoch": parts.steps_per_epoch, "threads_per_rank": torch.get_num_threads(),
            "step_mode": type(self.step).__name__, "global_batchnorm": self.setup.global_batchnorm,
            "straggler_detection": (blocked_unknown or "on") if self.cfg.log.telemetry else "off (log.telemetry=false)",
            "data_path": self.state.data_path, "data_table": self.stream.table.source if self.stream.resident else None,
            **identity, **mfu_facts,
            "hosts": [i["host"] for i in self.identities], "nodes": [i["node"] for i in self.identities],
            **distributed.environment_facts(self.setup),
        }  # fmt: skip
        self.logger = RunLogger(self.dir, self.cfg, facts, rank=accelerator.process_index,
                                resume_id=self.state.wandb_run_id,
                                # resume=auto with nothing to resume yet (a restart before the first checkpoint)
                                # starts at step 0: the lost attempt's lines go too
                                resume_step=None if self.cfg.resume is None else self.state.step)  # fmt: skip
        self.state.wandb_run_id = self.logger.run_id
        self.logger.note({"step": self.state.step, "epoch": self.state.epoch,
                         "event": "resumed" if resume else "started", "from": str(resume.path) if resume else None,
                         "changed": {k: list(v) for k, v in parts.changed.items()}, "wandb_run_id": self.logger.run_id,
                         "world_size": accelerator.num_processes})  # fmt: skip
        self.checkpointer = Checkpointer(accelerator, self.dir, self.cfg.checkpoint, self.meter, self.logger.log,
                                         saved_step=resume.state.step if resume and resume.own else None)  # fmt: skip
        # what it ran as, readable without W&B (a resumed run's steps counted from the start)
        self.record = RankRecord(self.dir, facts, self.cfg.log.sample_ids, self.state)
        self.profiler = profiling.Profiler(
            self.cfg.log, self.dir, accelerator.process_index, accelerator.device, self.state.step + 1,
            self.last_step(), gather=lambda summary: gather_object([summary]), logger=self.logger,
            say=accelerator.print, requested=profile_requests, now=lambda: self.state.step,
            graph=isinstance(self.step, GraphStep),
        )  # fmt: skip
        self.poll = distributed.StopPoll(self.state.step, self.profiler)  # its exchanges carry profile requests too
        self.stop_requested: Callable[[], bool] = lambda: False  # `fit` asks its StopSignal
        self.stop_agreed = False
        self.sent: Sent | None = None  # the exchange on its way, read at the next one
        self.lines: list[dict] = []  # the step lines of the `steps` call in progress
        accelerator.print(
            f"run {self.dir}: {parts.global_batch} images per step ({parts.batch} on this rank), "
            f"{parts.steps_per_epoch} steps per epoch ({parts.steps_per_epoch * parts.global_batch} images), "
            f"{type(self.step).__name__}"
        )
        self.progress: tqdm | None = None
        self.epoch_started = time.perf_counter()
        self.timer.restart()  # the first interval measures steps, not the set-up above

    # ---- the run, top to bottom

    def fit(self, stop: StopSignal) -> list[float]:
        """Every epoch left, then the export; returns the epochs' losses. On a signal, every rank checkpoints about a
        second or two later, at the same step, and the run stops (`Stopped`). A run that `train.max_steps` ends
        inside an epoch checkpoints there, with no epoch line: a resume with more steps continues that epoch."""
        epoch_losses = []
        self.stop_requested = lambda: stop.requested
        for epoch in range(self.state.epoch, self.cfg.train.epochs + 1):
            if self.steps_left() is not None and self.steps_left() <= 0:
                self.accelerator.print(f"train.max_steps={self.cfg.train.max_steps}: nothing left to train (the run "
                                       f"is at step {self.state.step})")  # fmt: skip
                break
            stopped = self.steps(self.epoch_batches(epoch), self.stop_requested).stopped
            if not stopped and self.state.batches_done < self.parts.steps_per_epoch:  # max_steps, mid-epoch
                self.record.end_epoch(epoch, self.state.batches_done)  # (what this rank trained of it)
                stopped = self.settle()
                self.checkpointer.save(self.state, "max_steps")
                if not stopped:
                    break
            if not stopped:
                epoch_losses.append(self.end_epoch(epoch))
                if self.steps_left() == 0 or epoch == self.cfg.train.epochs:
                    break
                stopped = self.stop_agreed  # asked at the epoch's end, or during its evaluation
            if stopped:
                raise stop.stopped(self.state.step, str(self.checkpointer.save(self.state, "signal")))
        export_dir = self.finish()
        self.logger.summary({"final/train_loss": epoch_losses[-1] if epoch_losses else None,
                             "final/export": str(export_dir)})  # fmt: skip
        if self.accelerator.is_main_process:
            self.logger.artifact("model", {p.name: p for p in sorted(export_dir.iterdir())}, self.provenance())
        self.logger.close()
        return epoch_losses

    def last_step(self) -> int:
        """The run's last step: its epochs' steps, or `train.max_steps` where that is fewer."""
        last = self.cfg.train.epochs * self.parts.steps_per_epoch
        return last if self.cfg.train.max_steps is None else min(last, self.cfg.train.max_steps)

    def steps_left(self) -> int | None:
        """Steps before `train.max_steps` ends the run (None: it runs all its epochs)."""
        max_steps = self.cfg.train.max_steps
        return None if max_steps is None else max_steps - self.state.step

    def epoch_steps(self) -> int:
        """Steps in the epoch in progress: the agreed count, or fewer where `train.max_steps` ends the run in it."""
        done, to_go = self.state.batches_done, self.steps_left()
        left = self.parts.steps_per_epoch - done
        return done + (left if to_go is None else min(left, to_go))

    def epoch_batches(self, epoch: int) -> Iterable[Batch]:
        """This rank's batches of `epoch` (a resumed one continues where its checkpoint was taken)."""
        self.model.train()
        self.step.noise.start_epoch(epoch, self.state.batches_done)
        self.epoch_started = time.perf_counter() - self.state.epoch_seconds
        self.progress = tqdm(
            self.stream.epoch(epoch, self.epoch_steps(), skip=self.state.batches_done),
            total=self.epoch_steps(), initial=self.state.batches_done, desc=f"epoch {epoch}", leave=False,
            disable=None if self.accelerator.is_local_main_process else True,
        )  # fmt: skip
        return self.progress

    def steps(self, batches: Iterable[Batch], stop: Callable[[], bool]) -> Steps:
        """Train on `batches`, with a step line every `log.every_steps` steps, until they run out or the ranks agree
        to stop (`stop()` was true on some rank). Checkpoints and a stop see the state as of their step."""
        state, every, device = self.state, self.cfg.log.every_steps, self.accelerator.device
        self.lines = []
        for batch in self.timer.timed(batches):
            with self.profiler.step(state.step + 1):  # nothing, outside a profile window
                self.step(batch.pixels.to(device, non_blocking=True), self.meter)
            self.timer.step_done()
            self.record.batch(batch.ids)
            state.step += 1
            state.batches_done += 1
            line = state.step % every == 0
            # about once a second between step lines, however far apart they are
            if not line and not self.poll.due(state.step):
                continue
            stopping = self.exchange(line, stop)
            checkpoint = line and self.checkpointer.due_at_step_line(state, state.batches_done >= self.epoch_steps())
            if stopping or checkpoint:
                stopping |= self.settle()
            if stopping:  # some rank was asked to stop: all stop here, together
                return Steps(True, self.lines)
            if checkpoint:
                self.checkpointer.save(state, "steps")
        return Steps(False, self.lines)

    def exchange(self, line: bool, stop: Callable[[], bool]) -> bool:
        """The interval's one collective, double-buffered: the previous exchange (its gather has had an interval to
        complete while the device kept working) is read and acted on, then this rank's figures go out (gathered
        without a wait: read at the next exchange). True where the previous one says some rank asked to stop."""
        previous, self.sent = self.sent, None
        stopping = previous is not None and self.act(previous, previous.read())
        values = {**self.meter.local(), **self.poll.local(stop(), self.state.step)}
        if line:
            values |= self.timer.local()  # (after the read above: on a GPU the previous interval's events are done)
        read = distributed.send(self.accelerator, values)
        skipped = self.meter.start_interval() if line else 0
        self.sent = Sent(self.state.step, self.state.epoch, line, time.time(), skipped, read)
        return stopping

    def settle(self) -> bool:
        """Read the exchange just sent and act on it: the meter's sums as of this step (for a checkpoint or the
        epoch's end), and its step line written. True where it says some rank asked to stop."""
        sent, self.sent = self.sent, None
        return sent is not None and self.act(sent, sent.read())

    def act(self, sent: Sent, gathered: dict[str, torch.Tensor]) -> bool:
        """An exchange read: a step line's (loss check, line, stragglers) or a poll's (the sums for a checkpoint);
        the stop requests and the polls' pace, agreed by every rank at this same step."""
        if sent.line:
            self.step_line(sent, gathered)
        else:
            self.meter.note(gathered)
        return self.poll.polled(gathered, self.state.step)

    def step_line(self, sent: Sent, gathered: dict[str, torch.Tensor]) -> dict:
        """The loss check (it raises on a non-finite loss), the step line, and straggler reports; returns the line."""
        step_loss = self.meter.end_interval(gathered, sent.step, self.cfg.log.every_steps, sent.skipped)
        line = {"step": sent.step, "epoch": sent.epoch, "train/step_loss": step_loss,
                **telemetry.summarise(gathered, sent.step, self.parts.global_batch)}  # fmt: skip
        self.logger.log(line, at=sent.time)  # (stamped with its interval's end, not the later moment it is read)
        self.lines.append(line)
        self.table.add(gathered)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{step_loss:,.0f}")
        self.report_stragglers(self.stragglers.update(gathered), gathered, sent.step)
        self.state.epoch_seconds = time.perf_counter() - self.epoch_started
        return line

    def report_stragglers(self, ranks: list[int], gathered: dict[str, torch.Tensor], step: int) -> None:
        """Name the ranks just flagged (console, metrics.jsonl, a W&B alert) and, with `log.profile_stragglers`, the
        traces that they and the median rank record of the next steps."""
        if not ranks:
            return
        text = self.stragglers.describe(ranks, step, self.identities)
        window = self.profiler.on_stragglers(ranks, gathered, self.state.step)
        traces = self.profiler.traces(window) if window else []
        if window:
            text += (f"; profiling steps {window.first}-{window.last} on ranks {', '.join(map(str, window.ranks))} "
                     f"(with the median rank, to compare): {', '.join(traces)}")  # fmt: skip
        self.accelerator.print(f"straggler: {text}")
        self.logger.log({"step": step, "event": "straggler", "ranks": ranks, "traces": traces})
        if self.stragglers.alert_due():
            self.logger.alert("cvae-dist straggler", text)

    def end_epoch(self, epoch: int) -> float:
        """The epoch's line (train and held-out loss, throughput), the figure when due, and the epoch-end checkpoint;
        returns the epoch's loss (mean per-batch summed loss, the Lux.jl / MLX examples' figure)."""
        cfg, state, accelerator, global_batch = self.cfg, self.state, self.accelerator, self.parts.global_batch
        self.stop_agreed = self.settle()  # the epoch's last step line
        seconds, steps = time.perf_counter() - self.epoch_started, state.batches_done
        self.record.end_epoch(epoch, steps)
        skipped = self.meter.epoch_skipped
        epoch_loss = self.meter.end_epoch(distributed.exchange(accelerator, self.meter.local()), state.step, steps)
        summary = {
            "step": state.step,
            "epoch": epoch,
            "train/loss": epoch_loss,
            "train/loss_per_image": epoch_loss / global_batch,
            "train/img_per_s": steps * global_batch / seconds,
            "train/epoch_time_s": seconds,
            "train/epoch_steps": steps,
            "train/skipped_steps": skipped,
            "data/bad_records_skipped": self.parts.bad_records,
            **evaluation.evaluate(self.model, accelerator, self.parts.eval_pixels, self.model_input, cfg.train.seed),
        }
        last = epoch == cfg.train.epochs or self.steps_left() == 0
        images = self.save_figure(epoch, last) if epoch % cfg.log.images_every_epochs == 0 or last else None
        self.logger.log(summary, images)
        accelerator.print(
            f"epoch {epoch}: loss {epoch_loss:,.1f} ({epoch_loss / global_batch:.2f} per image), "
            f"held-out {summary['eval/loss_per_image']:.2f} per image, "
            f"{summary['train/img_per_s']:,.0f} img/s, {seconds:.1f} s"
        )
        state.epoch, state.batches_done, state.epoch_seconds = epoch + 1, 0, 0.0
        self.checkpointer.at_epoch_end(state, last)
        # asked for since the last poll, the evaluation and figure included: the next epoch does not start
        polled = distributed.exchange(accelerator, self.poll.local(self.stop_requested(), state.step))
        self.stop_agreed |= self.poll.polled(polled, state.step)
        return epoch_loss

    def save_figure(self, epoch: int, last: bool) -> dict[str, torch.Tensor]:
        """`images/epoch_NNN.png`: reconstructions, a blank row, prior samples (and, at the end, a W&B table)."""
        pixels = self.parts.eval_pixels[: evaluation.GRID_IMAGES]
        image, reconstructions = evaluation.figure(
            self.model, self.accelerator, pixels, self.parts.prior, self.model_input, self.cfg.train.seed
        )
        if self.accelerator.is_main_process:
            files.write_safely(lambda path: save_grid(image, path), self.dir / "images" / f"epoch_{epoch:03d}.png")
        if last:  # a browsable table once, at the end
            labels = self.parts.eval_labels[: evaluation.GRID_IMAGES]
            self.logger.reconstruction_table(pixels, reconstructions, labels, self.state.step)
        return {"images/grid": image}

    def finish(self) -> Path:
        """The per-rank throughput table, the exported model and this rank's record; returns the export directory."""
        accelerator = self.accelerator
        accelerator.print(f"per-rank throughput (means over log intervals):\n{self.table.render()}")
        export_dir = checkpoint.export_final(accelerator, self.model, self.dir, self.cfg)
        zero3 = self.setup.zero_stage == 3  # ZeRO-3 ranks hold only their parameter partition
        self.record.finish(param_sha256=None if zero3 else parameter_digest(self.model),
                           buffer_sha256=buffer_digest(self.model), step_mode=self.step.mode,
                           graph_check=self.step.check)  # fmt: skip
        return export_dir

    # ---- helpers

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """A decoded uint8 batch -> the model's input on this rank's device (resized there)."""
        device = self.accelerator.device
        return to_model_input(
            pixels.to(device, non_blocking=True), self.cfg.model.image_size, self.cfg.train.channels_last
        )

    def blocked_unknown(self) -> str | None:
        """Why this rank's time blocked on peers cannot be measured (None: it is, or there are no peers)."""
        if self.accelerator.num_processes == 1:
            return None
        if isinstance(self.step, GraphStep):
            return "a replayed CUDA graph runs no hooks to time its collectives; train.cuda_graph=false times them"
        if not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return "DeepSpeed's engine has no hook to time its collectives"
        return None

    def mfu_facts(self) -> dict:
        """FLOPs per image and the device's peak (on a CPU a matmul benchmark): MFU's terms, measured once."""
        flops = telemetry.count_flops_per_image(self.cfg.model)
        peak, source = telemetry.peak_flops(self.accelerator.device, self.setup.precision, self.cfg.log.peak_tflops)
        return {"flops_per_image": flops, "peak_flops": peak, "peak_flops_source": source}

    def provenance(self) -> dict:
        """What made the final model, for its W&B artifact: the resolved config, the code's commit, the training
        data (its digest: the one the decode cache is keyed by, of the shards' bytes; None for a hub dataset)."""
        cache = decoded_cache(self.stream.files, self.cfg.data.on_bad_record.value)
        return {
            "config": to_dict(self.cfg), **code_commit(), "step": self.state.step,
            "data": {"source": self.cfg.data.source, "split": self.cfg.data.train_split,
                     "digest": cache.stem.removeprefix("decoded-") if cache else None},
        }  # fmt: skip

    def compute_dtype(self) -> str:
        """What the prepared model computes in (the mu head's output dtype in one probe forward, in eval mode so
        that BatchNorm's statistics stay as they are)."""
        x = self.model_input(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
        self.model.eval()
        try:
            with fixed_noise(self.accelerator.device, 0), self.accelerator.autocast():
                return compute_dtype(self.model, lambda: self.model(x))
        finally:
            self.model.train()


def _locate_run(accelerator: Accelerator, cfg: JobConfig) -> tuple[Path, files.RunLock, checkpoint.Resume | None]:
    """Agree on the run directory and lock it; a new run's must be empty (and creatable), `resume` finds the
    checkpoint to continue. Writes nothing but the lock (gone again, with a directory it made, on a refusal)."""
    timed = cfg.run_name is None or cfg.run_name.endswith("{time}")
    pattern = cfg.run_name or "run-{time}"

    def expanded() -> str:
        return pattern.replace("{time}", datetime.now().strftime(TIME_FORMAT))

    if cfg.resume == "auto" and timed:
        raise ConfigError(
            f"resume=auto continues a named run, but run_name={pattern} names a new one at every launch: "
            f"give the run's name, e.g. run_name={expanded()}"
        )
    if timed:  # a new run at every launch, even launches started together: never a name a directory has
        cfg.run_name = expanded()
        while files.run_dir_for(cfg).exists():
            cfg.run_name = expanded()
    name = [cfg.run_name]
    broadcast_object_list(name, from_process=0)  # rank 0's: ranks start at different moments
    cfg.run_name = name[0]
    run_dir = files.run_dir_for(cfg)
    files.check_writable(run_dir)
    lock = files.RunLock(accelerator, run_dir)
    with lock.released_on_error():
        resume = checkpoint.resolve_resume(run_dir, cfg.resume, accelerator.print)  # every rank, same answer
        if cfg.resume is None or (resume is not None and not resume.own):
            files.check_new_run_dir(run_dir)  # a new run, or one started from another run's checkpoint
        else:
            files.check_config_file(run_dir, cfg)
    return run_dir, lock, resume


def resume_command(cfg: JobConfig) -> str:
    """The command that continues this run: this launch's arguments, with the run's name and resume=auto."""
    args = sys.argv[1:]
    args = args[args.index("train") + 1 :] if "train" in args else args
    kept = [a for a in args if not a.startswith(("run_name=", "resume="))]
    command = shlex.join(["cvae-dist", "train", *kept, f"run_name={cfg.run_name}", "resume=auto"])
    launched = "LOCAL_RANK" in os.environ  # under accelerate launch / torchrun: the same launcher again
    return f"{command} (under the same launcher)" if launched else command


def _agree_on_steps(accelerator: Accelerator, stream: RankStream) -> tuple[int, int]:
    """Every rank runs the smallest rank's step count, so no rank waits alone in a collective. Returns it and the
    number of bad records skipped per epoch over all ranks."""
    counts = distributed.exchange(accelerator, {"steps": stream.local_steps, "bad": stream.bad_rows})
    steps, bad = int(counts["steps"].min()), int(counts["bad"].sum())
    if steps == 0:
        raise DataError(f"a rank has fewer usable rows ({stream.local_rows}) than one batch ({stream.batch_size})")
    if bad:
        accelerator.print(f"data: {bad} bad record(s) in {stream.files or 'the training split'}, skipped every epoch")
    return steps, bad
