"""`train(cfg)`: one run, every event of it in order, on however many processes `accelerate launch` started."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cvae_dist import checkpoint, distributed, evaluation
from cvae_dist.build import Run, build
from cvae_dist.config import JobConfig, to_dict
from cvae_dist.data import decoded_cache
from cvae_dist.faults import StopSignal
from cvae_dist.metrics import buffer_digest, code_commit, parameter_digest


@dataclass
class TrainResult:
    run_dir: Path
    epoch_losses: list[float]
    steps: int


@dataclass(frozen=True)
class Sent:
    """What an exchange was sent at: its step and epoch, whether it is a step line's, and when."""

    step: int
    epoch: int
    line: bool
    time: float


def train(cfg: JobConfig) -> TrainResult:
    """Train `cfg`. On a signal every rank checkpoints at the same step, about a second later, and stops (`Stopped`)."""
    with StopSignal() as stop:
        run = build(cfg)  # every check and every part; nothing written yet
        state, meter, monitor, exchange, poll = run.state, run.meter, run.monitor, run.exchange, run.poll
        accelerator, losses = run.accelerator, []
        with run.opened(stop):  # run directory, status.json, resumed weights, sinks; graph and lock released after
            while state.step < run.last_step:
                epoch, started = state.epoch, time.perf_counter() - state.epoch_seconds
                run.model.train()
                run.step.noise.start_epoch(epoch, state.batches_done)
                batches = run.stream.epoch(epoch, run.epoch_steps(), skip=state.batches_done)
                for batch in monitor.batches(batches, epoch, run.epoch_steps(), state.batches_done):
                    with monitor.step(state.step + 1):
                        knobs = run.schedule.at(state.step + 1)
                        run.step(batch.pixels.to(accelerator.device, non_blocking=True), meter, knobs)
                    monitor.stepped(batch.ids)
                    state.step, state.batches_done = state.step + 1, state.batches_done + 1
                    line = state.step % cfg.log.every_steps == 0
                    if not line and not poll.due(state.step):  # (a stop poll about once a second between lines)
                        continue
                    # The one exchange, double-buffered: the previous one is read (done by now), this one sent.
                    stopping = read(run, exchange.settle(), started)
                    values = meter.local() | poll.local(stop.requested, state.step) | monitor.local(line)
                    exchange.send(values, Sent(state.step, epoch, line, time.time()))
                    if line:
                        meter.start_interval()
                    epoch_over = state.batches_done >= run.epoch_steps()
                    saving = line and run.checkpointer.due_at_step_line(state, epoch_over)
                    if stopping or saving:
                        stopping |= read(run, exchange.settle(), started)  # the sums as of this step
                    if stopping:  # some rank was asked to stop: every rank stops here, together
                        raise stop.stopped(state.step, str(run.checkpointer.save(state, "signal")))
                    if saving:
                        run.checkpointer.save(state, "steps")
                stopping = read(run, exchange.settle(), started)  # the epoch's last exchange
                if state.batches_done < run.steps_per_epoch:  # train.max_steps ends the run inside this epoch
                    monitor.epoch_cut(epoch, state.batches_done)
                    saved = run.checkpointer.save(state, "max_steps")
                    if stopping:
                        raise stop.stopped(state.step, str(saved))
                    break
                # The epoch's end: its loss over all ranks, the held-out loss (the best kept), its line, a checkpoint.
                summary = epoch_summary(run, time.perf_counter() - started)
                if state.best_loss is None or summary["eval/loss_per_image"] < state.best_loss:
                    state.best_loss, state.best_epoch, state.best_step = (
                        summary["eval/loss_per_image"],
                        epoch,
                        state.step,
                    )
                    if cfg.checkpoint.keep_best:
                        checkpoint.export_final(accelerator, run.weights(), run.dir, cfg, "model-best")
                if stop_early(run, epoch):
                    run.last_step = state.step
                last = state.step >= run.last_step
                images = None
                if epoch % cfg.log.images_every_epochs == 0 or last:
                    images = monitor.figure(epoch, state.step, last, *figure(run))
                monitor.epoch_line(summary | {"eval/best_loss_per_image": state.best_loss}, images)
                losses.append(summary["train/loss"])
                state.epoch, state.batches_done, state.epoch_seconds = epoch + 1, 0, 0.0
                run.checkpointer.at_epoch_end(state, last)
                # asked since the epoch's last line (the evaluation included): the next epoch does not start
                stopping |= poll.polled(distributed.exchange(accelerator, poll.local(stop.requested, state.step)))
                if stopping and not last:
                    raise stop.stopped(state.step, str(run.checkpointer.save(state, "signal")))
            # The finish: the exported model, this rank's record, the run's summary and artifacts.
            export_dir = checkpoint.export_final(accelerator, run.weights(), run.dir, cfg)
            monitor.finish(export_dir, losses[-1] if losses else None, provenance(run), **digests(run))
    accelerator.end_training()
    return TrainResult(run.dir, losses, state.step)


def read(run: Run, seen: tuple[Sent, dict] | None, started: float) -> bool:
    """An exchange read: a step line's loss checked and its line written, or a poll's sums kept for a checkpoint;
    SIGUSR2 requests agreed. True where some rank asked to stop."""
    if seen is None:
        return False
    sent, gathered = seen
    line = None
    if sent.line:
        loss = run.meter.end_interval(gathered, sent.step, run.cfg.log.every_steps)
        line = {"time": sent.time, "step": sent.step, "epoch": sent.epoch, "train/step_loss": loss}
        line |= run.schedule.at(sent.step).logged() | {"train/grad_norm": gathered["grad/norm"][0].item()}
        run.state.epoch_seconds = time.perf_counter() - started
    else:
        run.meter.note(gathered)
    run.monitor.exchanged(gathered, run.state.step, line)
    return run.poll.polled(gathered)


def epoch_summary(run: Run, seconds: float) -> dict:
    """The epoch's figures: its loss over every rank's steps, its speed, the held-out loss of the evaluated weights."""
    state, meter, batch_size = run.state, run.meter, run.cfg.data.batch_size
    steps, skipped = state.batches_done, meter.epoch_skipped
    loss = meter.end_epoch(distributed.exchange(run.accelerator, meter.local()), state.step, steps)
    return {
        "step": state.step,
        "epoch": state.epoch,
        "train/loss": loss,
        "train/loss_per_image": loss / batch_size,
        "train/img_per_s": steps * batch_size / seconds,
        "train/epoch_time_s": seconds,
        "train/epoch_steps": steps,
        "train/skipped_steps": skipped,
        "data/bad_records_skipped": run.bad_records,
        **evaluation.evaluate(run.weights(), run.accelerator, run.eval_pixels, run.model_input, run.cfg.train.seed),
    }


def stop_early(run: Run, epoch: int) -> bool:
    """Whether `train.early_stop_epochs` epochs have passed without a better held-out loss (saying so)."""
    patience, state = run.cfg.train.early_stop_epochs, run.state
    if patience is None or epoch - state.best_epoch < patience or state.step >= run.last_step:
        return False
    best = f"its best, {state.best_loss:.2f} per image, at epoch {state.best_epoch}"
    run.accelerator.print(f"early stop after epoch {epoch}: no better held-out loss for {patience} epochs ({best})")
    run.monitor.note({"step": state.step, "epoch": epoch, "event": "early_stop", "best_epoch": state.best_epoch})
    return True


def figure(run: Run) -> tuple:
    """The figure of a fixed held-out batch (reconstructions, a blank row, prior samples), and its table's columns."""
    pixels = run.eval_pixels[: evaluation.GRID_IMAGES]
    image, reconstructions = evaluation.figure(
        run.weights(), run.accelerator, pixels, run.prior, run.model_input, run.cfg.train.seed
    )
    return image, pixels, reconstructions, run.eval_labels[: evaluation.GRID_IMAGES]


def provenance(run: Run) -> dict:
    """What made the final model (its W&B artifact's metadata): the config, the code's commit, the data's digest."""
    cache = decoded_cache(run.stream.files, run.cfg.data.on_bad_record.value)
    return {
        "config": to_dict(run.cfg),
        **code_commit(),
        "step": run.state.step,
        "data": {
            "source": run.cfg.data.source,
            "split": run.cfg.data.train_split,
            "digest": cache.stem.removeprefix("decoded-") if cache else None,
        },
    }


def digests(run: Run) -> dict:
    """This rank's record of what it ran and holds (ZeRO-3 ranks hold only their parameter partition)."""
    zero3 = run.setup.zero_stage == 3
    return {
        "param_sha256": None if zero3 else parameter_digest(run.model),
        "buffer_sha256": buffer_digest(run.model),
        "step_mode": run.step.mode,
        "graph_check": run.step.check,
    }
