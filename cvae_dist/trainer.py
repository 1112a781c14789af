"""The training loop: check and build, then epochs of (stream -> step -> a step line every `log.every_steps`), then
export. `run_steps` is the one loop over batches; `cvae-dist bench` times it as it is."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, is_compiled_module, set_seed
from tqdm.auto import tqdm

from cvae_dist import checkpoint, distributed, evaluation
from cvae_dist.checkpoint import TrainerState
from cvae_dist.config import ConfigError, JobConfig, NonFinite, to_dict
from cvae_dist.data import Batch, DataError, RankStream, load_split, to_model_input
from cvae_dist.evaluation import fixed_noise
from cvae_dist.faults import StopSignal, run_status
from cvae_dist.images import save_grid
from cvae_dist.loss_meter import LossMeter
from cvae_dist.metrics import RankRecord, RunLogger, parameter_digest
from cvae_dist.model import CVAE, count_parameters
from cvae_dist.step import GraphStep, apply_step_mode, make_step
from cvae_dist.telemetry import Telemetry, compute_dtype


@dataclass
class TrainResult:
    run_dir: Path
    epoch_losses: list[float]
    steps: int


@dataclass
class Run:
    """One training job on this rank: its prepared parts, resumable state and outputs."""

    cfg: JobConfig
    setup: distributed.Setup  # the accelerator and what was decided with it (precision, ZeRO stage, step mode)
    dir: Path
    model: torch.nn.Module  # prepared: DDP / DeepSpeed engine
    optimizer: torch.optim.Optimizer
    stream: RankStream
    step: Callable  # step.EagerStep or step.GraphStep
    batch: int  # this rank's
    global_batch: int
    steps_per_epoch: int  # agreed: the same on every rank
    bad_records: int  # skipped in each epoch (data.on_bad_record=skip), all ranks together
    state: TrainerState
    resume_from: Path | None  # the checkpoint this run continues
    eval_pixels: torch.Tensor
    eval_labels: torch.Tensor
    prior: torch.Tensor  # fixed latent draws for the sample half of the figure
    lr: float  # this run's (after train.scale_lr), also when it resumes a checkpoint written with another
    meter: LossMeter = None  # type: ignore[assignment]  (set by `start_run`, like the three below)
    telemetry: Telemetry = None  # type: ignore[assignment]
    logger: RunLogger = None  # type: ignore[assignment]
    record: RankRecord = None  # type: ignore[assignment]
    epoch_started: float = field(default_factory=time.perf_counter)
    progress: tqdm | None = None

    @property
    def accelerator(self) -> Accelerator:
        return self.setup.accelerator

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """A decoded uint8 batch -> the model's input on this rank's device (resized there)."""
        device = self.accelerator.device
        return to_model_input(
            pixels.to(device, non_blocking=True), self.cfg.model.image_size, self.cfg.train.channels_last
        )

    def save(self, tag: str) -> Path:
        self.state.loss = self.meter.to_state()
        path = checkpoint.save_checkpoint(self.accelerator, self.dir, self.state, self.cfg.checkpoint.keep)
        self.logger.log({"step": self.state.step, "epoch": self.state.epoch, "event": f"checkpoint:{tag}",
                         "path": str(path)})  # fmt: skip
        return path


def train(cfg: JobConfig) -> TrainResult:
    """Train `cfg` on however many processes `accelerate launch` started."""
    with StopSignal() as stop:
        run = prepare_run(cfg)  # everything that can be checked is, before the run directory is written
        try:
            checkpoint.write_run_dir(run.dir, cfg, run.accelerator)
            with run_status(run.dir, run.accelerator.is_main_process):
                stop.arm()
                start_run(run)
                epoch_losses = []
                for epoch in range(run.state.epoch, cfg.train.epochs + 1):
                    train_epoch(run, epoch, stop)
                    epoch_losses.append(end_epoch(run, epoch))
                    if cfg.train.max_steps is not None and run.state.step >= cfg.train.max_steps:
                        break
                export_dir = finish_run(run)
            run.logger.summary({"final/train_loss": epoch_losses[-1] if epoch_losses else None,
                                "final/export": str(export_dir)})  # fmt: skip
            run.logger.close()
        finally:  # every way out (completed, preempted, interrupted, failed): no graph may outlive the process group
            run.step.close()
    run.accelerator.end_training()
    return TrainResult(run.dir, epoch_losses, run.state.step)


def prepare_run(cfg: JobConfig, setup: distributed.Setup | None = None) -> Run:
    """Process group, the run directory's name and the checkpoint to resume, model / AdamW / this rank's data
    stream prepared by accelerate, and the held-out digits. Writes nothing: a refusal leaves every file as it was."""
    distributed.set_determinism(cfg.train.deterministic)
    setup = setup or distributed.make_accelerator(cfg)
    accelerator = setup.accelerator
    threads = distributed.set_threads()
    run_dir, resume = _locate_run(accelerator, cfg)
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
    if cfg.train.on_nonfinite is NonFinite.skip and setup.deepspeed:
        raise ConfigError("train.on_nonfinite=skip is not available under DeepSpeed (its engine steps inside "
                          "backward); accepted there: error")  # fmt: skip
    lr = cfg.train.lr * (world if cfg.train.scale_lr else 1)
    graph = setup.graph
    # capturable and the lr's form are the step mode's: `apply_step_mode` in start_run (after any load_state) sets them
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.train.weight_decay, fused=True)
    batch = distributed.per_rank_batch_size(cfg, world, rank)
    global_batch = sum(distributed.per_rank_batch_size(cfg, world, r) for r in range(world))
    workers = distributed.data_workers(cfg.data.num_workers, accelerator.device)
    stream = RankStream(cfg.data, rank, world, batch, cfg.train.seed, workers, accelerator.device)
    steps_per_epoch, bad_records = _agree_on_steps(accelerator, stream)
    distributed.configure_deepspeed(setup, cfg, batch)
    side_stream = torch.cuda.Stream() if graph else None  # a graph's DDP is wrapped on the stream it warms up on
    with torch.cuda.stream(side_stream) if graph else contextlib.nullcontext():
        model, optimizer = accelerator.prepare(model, optimizer)
    if graph:
        torch.cuda.current_stream().wait_stream(side_stream)
    state = TrainerState(world_size=world, per_rank_batch_size=batch, model=to_dict(cfg)["model"],
                         data_workers=workers if stream.order_depends_on_workers else 0)  # fmt: skip
    resume_from = None
    if resume is not None:
        resume_from, saved = resume
        checkpoint.check_compatible(saved, resume_from, state)
        state = saved
    eval_pixels, eval_labels = load_split(cfg.data.source, cfg.data.eval_split)
    prior = torch.randn(evaluation.GRID_IMAGES, cfg.model.latent_dim,
                        generator=torch.Generator().manual_seed(cfg.train.seed))  # fmt: skip
    return Run(cfg, setup, run_dir, model, optimizer, stream,
               make_step(setup, model, optimizer, cfg, batch, side_stream), batch, global_batch, steps_per_epoch,
               bad_records, state, resume_from, eval_pixels, eval_labels, prior, lr)  # fmt: skip


def start_run(run: Run) -> None:
    """The resumed weights and state, the loss meter, telemetry and logging (the run directory exists now)."""
    accelerator, state = run.accelerator, run.state
    if run.resume_from is not None:
        accelerator.load_state(str(run.resume_from))
        accelerator.print(f"resumed from {run.resume_from}: epoch {state.epoch}, step {state.step}")
        if accelerator.is_main_process and run.resume_from.parent == run.dir / "checkpoints":
            for moved in checkpoint.set_aside_newer(run.dir, run.resume_from):
                accelerator.print(f"moved the checkpoint that failed its checks aside: {moved}")
        accelerator.wait_for_everyone()
    apply_step_mode(run.optimizer, isinstance(run.step, GraphStep), run.lr, accelerator.device)
    run.meter = LossMeter.from_state(state.loss, accelerator.device, accelerator.process_index, state.step)
    identity = distributed.rank_identity(accelerator)
    run.telemetry = Telemetry(run.setup, run.cfg, run.batch, run.global_batch, identity)
    if not isinstance(run.step, GraphStep):  # hooks do not run inside a replayed CUDA graph
        run.telemetry.instrument(run.model)
    facts = {
        "compute_dtype": run_compute_dtype(run), "compiled": is_compiled_module(run.model),
        "per_rank_batch_size": run.batch, "global_batch_size": run.global_batch, "lr_effective":
        run.lr, "steps_per_epoch": run.steps_per_epoch, "threads_per_rank":
        torch.get_num_threads(), "step_mode": type(run.step).__name__, **identity, **run.telemetry.run_facts(),
        **distributed.environment_facts(run.setup),
    }  # fmt: skip
    run.logger = RunLogger(run.dir, run.cfg, facts, rank=accelerator.process_index, resume_id=state.wandb_run_id,
                           resume_step=state.step if run.resume_from is not None else None)  # fmt: skip
    state.wandb_run_id = run.logger.run_id
    accelerator.print(
        f"run {run.dir}: {run.global_batch} images per step ({run.batch} on this rank), {run.steps_per_epoch} "
        f"steps per epoch ({run.steps_per_epoch * run.global_batch} images), {type(run.step).__name__}"
    )
    run.record = RankRecord(run.dir, facts, run.cfg.log.sample_ids)  # what it ran as, readable without W&B
    run.telemetry.restart()  # the first interval measures steps, not the set-up above


def run_compute_dtype(run: Run) -> str:
    """What the prepared model computes in (the mu head's output dtype in one probe forward, in eval mode so that
    BatchNorm's statistics stay as they are)."""
    x = run.model_input(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    run.model.eval()
    try:
        with fixed_noise(run.accelerator.device, 0), run.accelerator.autocast():
            return compute_dtype(run.model, lambda: run.model(x))
    finally:
        run.model.train()


def train_epoch(run: Run, epoch: int, stop: StopSignal) -> None:
    """One epoch of steps (a resumed one continues where its checkpoint was taken). On a signal, every rank
    checkpoints at the next step line and the run stops."""
    state = run.state
    run.model.train()
    run.epoch_started = time.perf_counter() - state.epoch_seconds
    run.progress = tqdm(
        run.stream.epoch(epoch, epoch_steps(run), skip=state.batches_done),
        total=epoch_steps(run), initial=state.batches_done, desc=f"epoch {epoch}", leave=False,
        disable=None if run.accelerator.is_local_main_process else True,
    )  # fmt: skip
    if run_steps(run, run.progress, lambda: stop.requested):
        raise stop.stopped(state.step, str(run.save("signal")))


def epoch_steps(run: Run) -> int:
    """Steps in the epoch in progress: the agreed count, or fewer where `train.max_steps` ends the run in it."""
    max_steps = run.cfg.train.max_steps
    left = run.steps_per_epoch - run.state.batches_done
    return run.state.batches_done + (left if max_steps is None else min(left, max_steps - run.state.step))


def run_steps(run: Run, batches: Iterable[Batch], stop: Callable[[], bool]) -> bool:
    """Train on `batches`, with a step line every `log.every_steps` steps; returns True when the ranks agreed at a
    step line to stop (`stop()` was true on some rank)."""
    state, every, device = run.state, run.cfg.log.every_steps, run.accelerator.device
    for batch in run.telemetry.timed(batches):
        run.step(batch.pixels.to(device, non_blocking=True), run.telemetry, run.meter)
        run.telemetry.step_done()
        run.record.batch(batch.ids)
        state.step += 1
        state.batches_done += 1
        if state.step % every == 0:
            gathered = exchange_interval(run, stop())
            log_step_line(run, gathered)
            if gathered["stop"].any():  # some rank was asked to stop: all stop here, together
                return True
            checkpoint_if_due(run)
    return False


def exchange_interval(run: Run, want_stop: bool) -> dict[str, torch.Tensor]:
    """The interval's one collective: every rank's loss sums, stop request and telemetry, by name."""
    return distributed.exchange(
        run.accelerator, {**run.meter.local(), "stop": float(want_stop), **run.telemetry.local()}
    )


def log_step_line(run: Run, gathered: dict[str, torch.Tensor]) -> None:
    """The loss check (it raises on a non-finite loss), the step line, and straggler reports."""
    state = run.state
    step_loss = run.meter.end_interval(gathered, state.step, run.cfg.log.every_steps)
    run.logger.log({"step": state.step, "epoch": state.epoch, "train/step_loss": step_loss,
                    **run.telemetry.record(gathered, state.step)})  # fmt: skip
    if run.progress is not None:
        run.progress.set_postfix(loss=f"{step_loss:,.0f}")
    report_stragglers(run, run.telemetry.stragglers(gathered))
    state.epoch_seconds = time.perf_counter() - run.epoch_started


def checkpoint_if_due(run: Run) -> None:
    """`checkpoint.every_steps` (at an epoch's last batch the epoch-end checkpoint takes its place)."""
    if _due(run.cfg.checkpoint.every_steps, run.state.step) and run.state.batches_done < epoch_steps(run):
        run.save("steps")


def report_stragglers(run: Run, ranks: list[int]) -> None:
    if not ranks:
        return
    telemetry, step = run.telemetry, run.state.step
    names = ", ".join(telemetry.describe(r) for r in ranks)
    text = (
        f"step {step}: {names} below {telemetry.cfg.straggler_fraction:.0%} of the median img/s for "
        f"{telemetry.cfg.straggler_intervals} intervals"
    )
    run.accelerator.print(f"straggler: {text}")
    run.logger.log({"step": step, "event": "straggler", "ranks": ranks})
    if telemetry.alert_due():
        run.logger.alert("cvae-dist straggler", text)


def end_epoch(run: Run, epoch: int) -> float:
    """The epoch's line (train and held-out loss, throughput), the figure when due, and the epoch-end checkpoint;
    returns the epoch's loss (mean per-batch summed loss, the Lux.jl / MLX examples' figure)."""
    cfg, state, accelerator = run.cfg, run.state, run.accelerator
    seconds, steps = time.perf_counter() - run.epoch_started, state.batches_done
    run.record.end_epoch(epoch, steps)
    skipped = run.meter.epoch_skipped
    epoch_loss = run.meter.end_epoch(distributed.exchange(accelerator, run.meter.local()), state.step, steps)
    summary = {
        "step": state.step,
        "epoch": epoch,
        "train/loss": epoch_loss,
        "train/loss_per_image": epoch_loss / run.global_batch,
        "train/img_per_s": steps * run.global_batch / seconds,
        "train/epoch_time_s": seconds,
        "train/epoch_steps": steps,
        "train/skipped_steps": skipped,
        "data/bad_records_skipped": run.bad_records,
        **evaluation.evaluate(run.model, accelerator, run.eval_pixels, run.model_input, cfg.train.seed),
    }
    last = epoch == cfg.train.epochs or (cfg.train.max_steps is not None and state.step >= cfg.train.max_steps)
    images = save_figure(run, epoch, last) if epoch % cfg.log.images_every_epochs == 0 or last else None
    run.logger.log(summary, images)
    accelerator.print(
        f"epoch {epoch}: loss {epoch_loss:,.1f} ({epoch_loss / run.global_batch:.2f} per image), "
        f"held-out {summary['eval/loss_per_image']:.2f} per image, "
        f"{summary['train/img_per_s']:,.0f} img/s, {seconds:.1f} s"
    )
    state.epoch, state.batches_done, state.epoch_seconds = epoch + 1, 0, 0.0
    if cfg.checkpoint.every_epoch or last or _due(cfg.checkpoint.every_steps, state.step):
        run.save("epoch")
    return epoch_loss


def save_figure(run: Run, epoch: int, last: bool) -> dict[str, torch.Tensor]:
    """`images/epoch_NNN.png`: reconstructions, a blank row, prior samples (and, at the end, a W&B table)."""
    pixels = run.eval_pixels[: evaluation.GRID_IMAGES]
    image, reconstructions = evaluation.figure(
        run.model, run.accelerator, pixels, run.prior, run.model_input, run.cfg.train.seed
    )
    if run.accelerator.is_main_process:
        checkpoint.write_safely(lambda path: save_grid(image, path), run.dir / "images" / f"epoch_{epoch:03d}.png")
    if last:  # a browsable table once, at the end
        run.logger.reconstruction_table(pixels, reconstructions, run.eval_labels[: evaluation.GRID_IMAGES],
                                        run.state.step)  # fmt: skip
    return {"images/grid": image}


def finish_run(run: Run) -> Path:
    """The per-rank throughput table, the exported model and this rank's record; returns the export directory."""
    accelerator = run.accelerator
    accelerator.print(f"per-rank throughput (means over log intervals):\n{run.telemetry.summary_table()}")
    export_dir = checkpoint.export_final(accelerator, run.model, run.dir, run.cfg)
    zero3 = run.setup.zero_stage == 3  # ZeRO-3 ranks hold only their parameter partition
    run.record.finish(param_sha256=None if zero3 else parameter_digest(run.model))
    return export_dir


def _due(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


def _locate_run(accelerator: Accelerator, cfg: JobConfig) -> tuple[Path, tuple[Path, TrainerState] | None]:
    """Agree on the run directory; a new run's must not exist yet (and be creatable), `resume` finds the
    checkpoint to continue. Reads only."""
    if cfg.run_name is None:
        cfg.run_name = time.strftime("run-%Y%m%d-%H%M%S")
    elif cfg.run_name.endswith("{time}"):
        cfg.run_name = cfg.run_name.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))
    name = [cfg.run_name]
    broadcast_object_list(name, from_process=0)  # ranks may have started in different seconds
    cfg.run_name = name[0]
    run_dir = checkpoint.run_dir_for(cfg)
    resume = checkpoint.resolve_resume(run_dir, cfg.resume, accelerator.print)  # every rank, same answer
    if resume is None and cfg.resume is None:
        checkpoint.check_new_run_dir(run_dir)
    checkpoint.check_writable(run_dir)
    return run_dir, resume


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
