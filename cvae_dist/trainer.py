"""The training loop: set up, then epochs of (stream -> forward -> loss -> backward -> step), then save."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from cvae_dist import checkpoint, distributed
from cvae_dist.checkpoint import TrainerState
from cvae_dist.config import ConfigError, JobConfig, NonFinite, to_dict
from cvae_dist.data import DataError, RankStream, load_split, to_model_input
from cvae_dist.faults import NonFiniteLoss, Preempted, StopSignal, run_status
from cvae_dist.images import save_grid, seed_grid
from cvae_dist.metrics import RankRecord, RunLogger, parameter_digest
from cvae_dist.model import CVAE, count_parameters, vae_loss
from cvae_dist.telemetry import Telemetry

log = logging.getLogger(__name__)
GRID_IMAGES = 128
EVAL_BATCH = 128


@dataclass
class TrainResult:
    run_dir: Path
    epoch_losses: list[float]
    steps: int


@dataclass
class Parts:
    """The prepared pieces of a training job on this rank."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stream: RankStream
    batch: int  # per rank
    bad_records: int  # skipped in each epoch (data.on_bad_record=skip), all ranks together
    skip_nonfinite: bool  # train.on_nonfinite=skip
    lr: float
    image_size: int
    channels_last: bool
    input_dtype: torch.dtype

    @property
    def steps_per_epoch(self) -> int:
        """The same on every rank (agreed in `build`)."""
        return self.stream.steps_per_epoch

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """A decoded uint8 batch -> the model's input on this rank's device (resized there)."""
        x = to_model_input(pixels.to(self.accelerator.device, non_blocking=True), self.image_size, self.channels_last)
        return x.to(self.input_dtype)


def build(cfg: JobConfig, accelerator: Accelerator) -> Parts:
    """Model, AdamW and this rank's data stream, prepared by accelerate (DDP / DeepSpeed) for the launch."""
    world, rank = accelerator.num_processes, accelerator.process_index
    set_seed(cfg.train.seed)  # same initial weights on every rank
    model = CVAE(cfg.model)
    accelerator.print(f"trainable parameters: {count_parameters(model):,}")
    if cfg.train.channels_last and not distributed.is_deepspeed(accelerator):
        # DeepSpeed broadcasts parameters as flat bytes and needs them contiguous; inputs stay channels_last.
        model = model.to(memory_format=torch.channels_last)
    skip_nonfinite = cfg.train.on_nonfinite is NonFinite.skip
    if skip_nonfinite and distributed.is_deepspeed(accelerator):
        raise ConfigError(
            "train.on_nonfinite=skip is not available under DeepSpeed (its engine steps inside "
            "backward); accepted there: error"
        )
    lr = cfg.train.lr * (world if cfg.train.scale_lr else 1)
    # fused: one kernel over all parameters; on a 2-core CPU 0.27 ms a step against foreach's 0.95 ms.
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.train.weight_decay, fused=True)
    batch = distributed.per_rank_batch_size(cfg, world)
    d = cfg.data
    stream = RankStream(
        d.source,
        d.train_split,
        rank,
        world,
        batch,
        d.shuffle_buffer,
        cfg.train.seed,
        distributed.data_workers(d.num_workers, accelerator.device),
        d.on_bad_record.value,
    )
    bad_records = _agree_on_steps(accelerator, stream)
    distributed.configure_deepspeed(accelerator, batch)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Parts(
        accelerator, model, optimizer, stream, batch, bad_records, skip_nonfinite, lr,
        cfg.model.image_size,
        cfg.train.channels_last, distributed.input_dtype(accelerator),
    )  # fmt: skip


def train_step(parts: Parts, x: torch.Tensor, telemetry: Telemetry, poison: bool = False) -> torch.Tensor | None:
    """One optimisation step on a model-ready batch; returns the batch's summed loss (detached, on the device),
    or None when `train.on_nonfinite=skip` dropped the step for non-finite gradients."""
    telemetry.forward_starts()
    with parts.accelerator.autocast():
        out = parts.model(x)
    loss = vae_loss(out, x).total
    if poison:  # test-only (train.debug_nan_step): a non-finite loss on purpose
        loss = loss * float("nan")
    # Each rank's loss sums its share of the global batch; DDP/DeepSpeed average gradients over ranks,
    # so scale by the world size to keep the recipe's "summed over the batch" gradient.
    parts.accelerator.backward(loss * parts.accelerator.num_processes)
    telemetry.backward_done()
    # The gradients are already averaged over ranks, so every rank reaches the same verdict (one sync per step,
    # paid only in skip mode).
    skip = parts.skip_nonfinite and not _finite_gradients(parts.optimizer)
    if not skip:
        parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    telemetry.step_done()
    return None if skip else loss.detach()


def _finite_gradients(optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad.detach().abs().sum() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return bool(torch.stack(grads).isfinite().all()) if grads else True


def train(cfg: JobConfig) -> TrainResult:
    """Train `cfg` on however many processes `accelerate launch` started; returns the run directory."""
    with StopSignal() as stop:
        run = start_run(cfg)
        epoch_losses = []
        with run_status(run.dir, run.accelerator.is_main_process):
            for epoch in range(run.state.epoch, cfg.train.epochs + 1):
                sums, seconds = train_epoch(run, epoch, stop)
                epoch_losses.append(end_epoch(run, epoch, sums, seconds))
            export_dir = finish_run(run)
        run.logger.summary(
            {"final/train_loss": epoch_losses[-1] if epoch_losses else None, "final/export": str(export_dir)}
        )
        run.logger.close()
    run.accelerator.end_training()
    return TrainResult(run.dir, epoch_losses, run.state.step)


@dataclass
class Run:
    """One training job on this rank: its prepared parts, resumable state and outputs."""

    cfg: JobConfig
    dir: Path
    parts: Parts
    state: TrainerState
    telemetry: Telemetry
    logger: RunLogger
    record: RankRecord
    eval_pixels: torch.Tensor
    eval_labels: torch.Tensor
    prior: torch.Tensor  # fixed latent draws for the sample half of the seed's figure

    @property
    def accelerator(self) -> Accelerator:
        return self.parts.accelerator

    def save(self, tag: str) -> Path:
        path = checkpoint.save_checkpoint(self.accelerator, self.dir, self.state, self.cfg.checkpoint.keep)
        self.logger.log(
            {"step": self.state.step, "epoch": self.state.epoch, "event": f"checkpoint:{tag}", "path": str(path)}
        )
        return path


def start_run(cfg: JobConfig) -> Run:
    """Process group, run directory, model / optimizer / data, the state to start (or resume) from, and logging."""
    accelerator = distributed.make_accelerator(cfg)
    threads = distributed.set_threads()
    run_dir, resume_from = _prepare_run_dir(accelerator, cfg)
    parts = build(cfg, accelerator)
    world, batch = accelerator.num_processes, parts.batch
    state = TrainerState(
        world_size=world, per_rank_batch_size=batch, data_workers=parts.stream.num_workers, model=to_dict(cfg)["model"]
    )
    if resume_from is not None:
        path, saved = resume_from
        checkpoint.check_compatible(saved, path, state)
        state = saved
        accelerator.load_state(str(path))
        accelerator.print(f"resumed from {path}: epoch {state.epoch}, step {state.step}")

    eval_pixels, eval_labels = load_split(cfg.data.source, cfg.data.eval_split)
    prior = torch.randn(GRID_IMAGES, cfg.model.latent_dim, generator=torch.Generator().manual_seed(cfg.train.seed))
    identity = distributed.rank_identity(accelerator)
    telemetry = Telemetry(accelerator, cfg, batch, identity)
    telemetry.instrument(parts.model)
    run_facts = {
        "per_rank_batch_size": batch,
        "global_batch_size": batch * world,
        "lr_effective": parts.lr,
        "steps_per_epoch": parts.steps_per_epoch,
        "threads_per_rank": threads,
        **identity,
        **telemetry.run_facts(),
        **distributed.environment_facts(accelerator),
    }
    logger = RunLogger(run_dir, cfg, run_facts, rank=accelerator.process_index, resume_id=state.wandb_run_id)
    state.wandb_run_id = logger.run_id
    accelerator.print(
        f"run {run_dir}: {world} process(es), {batch} images per rank per step, "
        f"{parts.steps_per_epoch} steps per epoch ({parts.steps_per_epoch * batch * world} images)"
    )
    record = RankRecord(run_dir, identity, cfg.log.sample_ids)
    return Run(cfg, run_dir, parts, state, telemetry, logger, record, eval_pixels, eval_labels, prior)


def train_epoch(run: Run, epoch: int, stop: StopSignal) -> tuple[torch.Tensor, float]:
    """One epoch of steps (a resumed one continues where its checkpoint was taken), with a step line every
    `log.every_steps`. Returns each rank's [epoch loss sum, loss since the last step line, first bad step] and the
    epoch's seconds."""
    parts, state, cfg = run.parts, run.state, run.cfg
    accelerator, rank = parts.accelerator, parts.accelerator.process_index
    parts.model.train()
    # Sums stay on the device (no sync per step); a resumed epoch starts from the saved partial sums.
    loss_sum = torch.tensor(state.rank_sum("epoch_loss_sums", rank), device=accelerator.device)
    interval_sum = torch.tensor(state.rank_sum("interval_loss_sums", rank), device=accelerator.device)
    # the first step whose loss was not finite on this rank (-1: none), tracked on the device
    first_bad, step_counter = torch.full_like(loss_sum, -1.0), torch.full_like(loss_sum, float(state.step))
    start = time.perf_counter() - state.epoch_seconds
    batches = tqdm(
        parts.stream.epoch(epoch, skip=state.batches_done),
        total=parts.steps_per_epoch,
        initial=state.batches_done,
        desc=f"epoch {epoch}",
        leave=False,
        disable=None if accelerator.is_local_main_process else True,
    )
    for batch in run.telemetry.timed(batches):
        poison = state.step + 1 == cfg.train.debug_nan_step and rank == cfg.train.debug_nan_rank
        loss = train_step(parts, parts.model_input(batch.pixels), run.telemetry, poison)
        step_counter += 1
        if loss is None:
            state.epoch_skipped += 1
            state.interval_skipped += 1
            accelerator.print(f"step {state.step + 1}: non-finite gradients, step skipped (train.on_nonfinite)")
        else:
            first_bad = torch.where((first_bad < 0) & ~loss.isfinite(), step_counter, first_bad)
            loss_sum += loss
            interval_sum += loss
        run.record.batch(batch.ids)
        state.step += 1
        state.batches_done += 1
        if state.step % cfg.log.every_steps == 0:
            step_loss = step_line(run, epoch, start, stop, [interval_sum, loss_sum, first_bad])
            batches.set_postfix(loss=f"{step_loss:,.0f}")
            interval_sum.zero_()
    seconds = time.perf_counter() - start
    return accelerator.gather(torch.stack([loss_sum, interval_sum, first_bad])[None]).cpu(), seconds


def step_line(run: Run, epoch: int, start: float, stop: StopSignal, sums: list[torch.Tensor]) -> float:
    """Every `log.every_steps`: one small collective (each rank's [interval, epoch] loss sums, first bad step, stop
    request and throughput figures), the step line, straggler reports, then a checkpoint or a stop if one is due.
    Returns the step line's loss: the mean summed loss of the interval's trained steps."""
    state, every = run.state, run.cfg.log.every_steps
    interval_sum, loss_sum, first_bad = sums
    stop_flag = torch.tensor(float(stop.requested), device=loss_sum.device)
    interval = run.telemetry.interval([interval_sum, stop_flag, loss_sum, first_bad], state.step)
    per_rank = interval.per_rank
    _check_finite(per_rank[:, 0], per_rank[:, 3], state.step - every + 1, state.step)
    step_loss = per_rank[:, 0].sum().item() / max(every - state.interval_skipped, 1)
    stragglers = interval.record.pop("stragglers")
    run.logger.log({"step": state.step, "epoch": epoch, "train/step_loss": step_loss, **interval.record})
    if stragglers:
        _report_stragglers(stragglers, run.telemetry, run.logger, state.step)
    state.epoch_loss_sums, state.interval_loss_sums, state.interval_skipped = per_rank[:, 2].tolist(), [], 0
    state.epoch_seconds = time.perf_counter() - start
    if per_rank[:, 1].any():  # any rank signalled: all save together, then stop
        raise Preempted(state.step, str(run.save("signal")))
    if _due(run.cfg.checkpoint.every_steps, state.step) and state.batches_done < run.parts.steps_per_epoch:
        run.save("steps")  # (at an epoch's last batch the epoch-end checkpoint takes its place)
    return step_loss


def end_epoch(run: Run, epoch: int, sums: torch.Tensor, seconds: float) -> float:
    """The epoch's line (train and held-out loss, throughput), the seed's figure when due, and the epoch-end
    checkpoint; returns the epoch's loss (mean per-batch summed loss, the seed's figure)."""
    cfg, state, parts, accelerator = run.cfg, run.state, run.parts, run.accelerator
    steps, global_batch = parts.steps_per_epoch, parts.batch * accelerator.num_processes
    run.record.end_epoch(epoch, steps)
    _check_finite(sums[:, 0], sums[:, 2], state.step - steps + 1, state.step)
    epoch_loss = sums[:, 0].sum().item() / max(steps - state.epoch_skipped, 1)
    summary = {
        "step": state.step,
        "epoch": epoch,
        "train/loss": epoch_loss,
        "train/loss_per_image": epoch_loss / global_batch,
        "train/img_per_s": steps * global_batch / seconds,
        "train/epoch_time_s": seconds,
        "train/skipped_steps": state.epoch_skipped,
        "data/bad_records_skipped": parts.bad_records,
        **evaluate(parts.model, accelerator, run.eval_pixels, parts.model_input, cfg.train.seed),
    }
    last = epoch == cfg.train.epochs
    images = seed_figure(run, epoch) if epoch % cfg.log.images_every_epochs == 0 or last else None
    run.logger.log(summary, images)
    accelerator.print(
        f"epoch {epoch}: loss {epoch_loss:,.1f} ({epoch_loss / global_batch:.2f} per image), "
        f"held-out {summary['eval/loss_per_image']:.2f} per image, "
        f"{summary['train/img_per_s']:,.0f} img/s, {seconds:.1f} s"
    )
    state.epoch, state.batches_done = epoch + 1, 0
    state.epoch_loss_sums, state.epoch_seconds, state.epoch_skipped = [], 0.0, 0
    state.interval_loss_sums = sums[:, 1].tolist()  # steps since the last step line carry into the next epoch
    if cfg.checkpoint.every_epoch or last or _due(cfg.checkpoint.every_steps, state.step):
        run.save("epoch")
    return epoch_loss


def seed_figure(run: Run, epoch: int) -> dict[str, torch.Tensor]:
    """Save the seed's figure as `images/epoch_NNN.png` (and, at the last epoch, log a reconstruction table)."""
    parts, pixels = run.parts, run.eval_pixels[:GRID_IMAGES]
    grid, reconstructions = make_seed_grid(
        parts.model, parts.accelerator, pixels, run.prior, parts.model_input, run.cfg.train.seed
    )
    if parts.accelerator.is_main_process:
        save_grid(grid, run.dir / "images" / f"epoch_{epoch:03d}.png")
    if epoch == run.cfg.train.epochs:  # a browsable table once, at the end
        run.logger.reconstruction_table(pixels, reconstructions, run.eval_labels[:GRID_IMAGES], run.state.step)
    return {"images/grid": grid}


def finish_run(run: Run) -> Path:
    """The per-rank throughput table, the exported model and this rank's record; returns the export directory."""
    accelerator, model = run.accelerator, run.parts.model
    accelerator.print(f"per-rank throughput (means over log intervals):\n{run.telemetry.summary_table()}")
    export_dir = checkpoint.export_final(accelerator, model, run.dir, run.cfg)
    zero3 = distributed.zero_stage(accelerator) == 3  # ZeRO-3 ranks hold only their parameter partition
    run.record.finish(param_sha256=None if zero3 else parameter_digest(accelerator.unwrap_model(model)))
    return export_dir


def _report_stragglers(ranks: list[int], telemetry: Telemetry, logger: RunLogger, step: int) -> None:
    names = ", ".join(telemetry.describe(r) for r in ranks)
    text = (
        f"step {step}: {names} below {telemetry.cfg.straggler_fraction:.0%} of the median img/s for "
        f"{telemetry.cfg.straggler_intervals} intervals"
    )
    telemetry.accelerator.print(f"straggler: {text}")
    logger.log({"step": step, "event": "straggler", "ranks": ranks})
    if telemetry.alert_due():
        logger.alert("cvae-dist straggler", text)


def _due(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


def _check_finite(per_rank_sums: torch.Tensor, first_bad: torch.Tensor, first_step: int, last_step: int) -> None:
    """Stop on a non-finite loss, naming where it started (it spreads to every rank through the gradients)."""
    bad = [r for r, v in enumerate(per_rank_sums.tolist()) if not math.isfinite(v)]
    if not bad:
        return
    starts = {r: int(s) for r, s in enumerate(first_bad.tolist()) if s >= 0}
    origin = ""
    if starts:
        step = min(starts.values())
        origin = f"first at step {step} on rank(s) {[r for r, s in starts.items() if s == step]}; "
    raise NonFiniteLoss(
        f"non-finite loss in steps {first_step}-{last_step} ({origin}then on rank(s) {bad}); "
        "the last checkpoint is kept as it was"
    )


@torch.no_grad()
def evaluate(model, accelerator: Accelerator, pixels: torch.Tensor, model_input, seed: int) -> dict[str, float]:
    """Held-out loss: each rank a strided share, equal batch counts everywhere, sums reduced over ranks.
    (Also `cvae-dist eval`'s, so that its figures are the trainer's.)"""
    was_training = model.training
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = pixels[rank::world]
    n_batches = math.ceil(math.ceil(len(pixels) / world) / EVAL_BATCH)  # same on every rank
    totals = torch.zeros(3, device=accelerator.device)  # reconstruction, KL, images
    with _fixed_noise(accelerator, seed):
        for i in range(n_batches):
            chunk = mine[i * EVAL_BATCH : (i + 1) * EVAL_BATCH]
            weight = 1.0
            if len(chunk) == 0:  # keep collective-driven wrappers (ZeRO-3) in step with the other ranks
                chunk, weight = pixels[:1], 0.0
            x = model_input(chunk)
            with accelerator.autocast():
                out = model(x)
            parts = vae_loss(out, x)
            n = torch.tensor(float(len(chunk)), device=totals.device)
            totals += weight * torch.stack([parts.reconstruction, parts.kl, n])
    recon, kl, n = accelerator.reduce(totals, "sum").tolist()
    model.train(was_training)
    per_image = (recon + kl) / n
    return {
        "eval/loss_per_image": per_image,
        "eval/loss": per_image * EVAL_BATCH,
        "eval/recon_per_image": recon / n,
        "eval/kl_per_image": kl / n,
    }


@torch.no_grad()
def make_seed_grid(model, accelerator: Accelerator, pixels, prior, model_input, seed: int):
    """The seed's figure (reconstructions of a fixed held-out batch, a blank row, decoded prior draws) and the
    reconstructions themselves."""
    model.eval()
    with _fixed_noise(accelerator, seed):
        x = model_input(pixels)
        reconstructions = model(x).reconstruction
        samples = model(z=prior.to(x.device, x.dtype))
    model.train()
    return seed_grid(reconstructions, samples), reconstructions


@contextlib.contextmanager
def _fixed_noise(accelerator: Accelerator, seed: int):
    """Seeded noise for evaluation that leaves the training RNG streams exactly where they were."""
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _prepare_run_dir(accelerator: Accelerator, cfg: JobConfig) -> tuple[Path, tuple[Path, TrainerState] | None]:
    """Agree on the run directory; a new run gets a fresh one, `resume` finds the checkpoint to continue."""
    if cfg.run_name is None:
        cfg.run_name = time.strftime("run-%Y%m%d-%H%M%S")
    elif cfg.run_name.endswith("{time}"):
        cfg.run_name = cfg.run_name.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))
    name = [cfg.run_name]
    broadcast_object_list(name, from_process=0)  # ranks may have started in different seconds
    cfg.run_name = name[0]
    run_dir = checkpoint.run_dir_for(cfg)
    resume_from = checkpoint.resolve_resume(run_dir, cfg.resume, accelerator.print)  # every rank, same answer
    if resume_from is None and cfg.resume is None:
        checkpoint.check_new_run_dir(run_dir)  # every rank checks before anyone creates it
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.create_run_dir(run_dir, cfg)
    accelerator.wait_for_everyone()
    return run_dir, resume_from


def _agree_on_steps(accelerator: Accelerator, stream: RankStream) -> int:
    """Every rank runs the smallest rank's step count (set on `stream`), so no rank waits alone in a collective.
    Returns the number of bad records skipped per epoch over all ranks."""
    local = torch.tensor([stream.steps_per_epoch, stream.bad_rows], device=accelerator.device)
    counts = accelerator.gather(local[None]).cpu()
    steps, bad = int(counts[:, 0].min()), int(counts[:, 1].sum())
    if steps == 0:
        raise DataError(f"a rank has fewer usable rows ({stream.local_rows}) than one batch ({stream.batch_size})")
    if bad:
        accelerator.print(f"data: {bad} bad record(s) in {stream.files or 'the training split'}, skipped every epoch")
    stream.steps_per_epoch = steps
    return bad
