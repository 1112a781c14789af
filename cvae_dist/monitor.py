"""Everything a run reports, behind one object the loop calls at a few events: `start`, each step (`batches`, `step`,
`stepped`), each exchange (`local` adds this rank's figures to it, `exchanged` reads every rank's), `epoch_line`,
`finish`. Behind it: the step timer and straggler detector (telemetry.py), the profiler (profiling.py), and the
sinks (metrics.py: metrics.jsonl, W&B, this rank's record)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from cvae_dist import telemetry
from cvae_dist.config import JobConfig
from cvae_dist.files import write_safely
from cvae_dist.images import save_grid
from cvae_dist.metrics import RankRecord, RunLogger
from cvae_dist.profiling import Profiler


class Monitor:
    """The run's observability. Built with the other parts (nothing written); `start` opens the sinks."""

    def __init__(self, cfg: JobConfig, accelerator: Accelerator, run_dir: Path, facts: dict, identities, timer, *steps):
        """`steps`: the run's next and last step (profile windows fall between)."""
        self.cfg, self.accelerator, self.dir, self.facts = cfg, accelerator, run_dir, facts
        self.identities, self.timer = identities, timer
        self.stragglers = telemetry.StragglerDetector(cfg.log, accelerator.num_processes)
        self.table = telemetry.RankTable(identities)
        where, graph = (
            (cfg.log, run_dir, accelerator.process_index, accelerator.device),
            facts["step_mode"] == "GraphStep",
        )
        self.profiler = Profiler(*where, *steps, gather=_gather, logger=self, say=accelerator.print, graph=graph)
        self.logger: RunLogger | None = None
        self.record: RankRecord | None = None
        self.progress: tqdm | None = None

    # ---- the sinks, once the run directory exists

    def start(self, state, resume, changed: dict) -> str | None:
        """Open metrics.jsonl and W&B (a resumed run continues both), note how this launch began; the W&B run's id."""
        # resume=auto with nothing to resume yet (a restart before the first checkpoint) starts at step 0: the lost
        # attempt's lines go too
        resume_step = None if self.cfg.resume is None else state.step
        rank = self.accelerator.process_index
        self.logger = RunLogger(self.dir, self.cfg, self.facts, rank, state.wandb_run_id, resume_step)
        event = {"step": state.step, "epoch": state.epoch, "event": "resumed" if resume else "started"}
        event |= {"from": str(resume.path) if resume else None, "changed": {k: list(v) for k, v in changed.items()}}
        self.note(event | {"wandb_run_id": self.logger.run_id, "world_size": self.accelerator.num_processes})
        self.record = RankRecord(self.dir, self.facts, self.cfg.log.sample_ids, state)
        self.timer.restart()  # the first interval measures steps, not the set-up
        return self.logger.run_id

    def log(self, record: dict, images: dict | None = None, at: float | None = None) -> None:
        self.logger.log(record, images, at)

    def note(self, record: dict) -> None:
        self.logger.note(record)

    def artifact(self, kind: str, files: dict, metadata: dict, aliases=()) -> None:
        self.logger.artifact(kind, files, metadata, aliases)

    # ---- each step

    def batches(self, batches: Iterable, epoch: int, total: int, done: int) -> Iterable:
        """The epoch's batches, with a progress bar (local main process) and the data wait timed."""
        bar = {"total": total, "initial": done, "desc": f"epoch {epoch}", "leave": False}
        self.progress = tqdm(batches, disable=None if self.accelerator.is_local_main_process else True, **bar)
        return self.timer.timed(self.progress)

    def step(self, n: int):
        """The context step `n` runs in (a profile window's, or nothing)."""
        return self.profiler.step(n)

    def stepped(self, ids: torch.Tensor) -> None:
        self.timer.step_done()
        self.record.batch(ids)

    # ---- each exchange

    def local(self, line: bool) -> dict:
        """This rank's fields for the exchange: SIGUSR2 requests, and at a step line the interval's timings."""
        return self.profiler.local() | (self.timer.local() if line else {})

    def exchanged(self, gathered: dict[str, torch.Tensor], step: int, line: dict | None) -> None:
        """Every rank's fields, read at `step`: profile requests agreed; at a step line (`line`: its loss and place)
        the line written, the table's means, and stragglers named."""
        if line is not None:
            line |= telemetry.summarise(gathered, line["step"], self.cfg.data.batch_size)
            at = line.pop("time")
            self.log(line, at=at)  # (stamped with its interval's end, not the later moment it is read)
            self.table.add(gathered)
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{line['train/step_loss']:,.0f}")
            if ranks := self.stragglers.update(gathered):
                text = self.stragglers.describe(ranks, line["step"], self.identities)
                self.accelerator.print(f"straggler: {text}")
                self.log({"step": line["step"], "event": "straggler", "ranks": ranks})
        self.profiler.agree(gathered, step)

    # ---- the epoch's end and the run's

    def epoch_cut(self, epoch: int, steps: int) -> None:
        """`train.max_steps` ended the run inside `epoch`, after `steps` of its steps: no epoch line."""
        self.record.end_epoch(epoch, steps)

    def epoch_line(self, summary: dict, images: dict | None) -> None:
        self.record.end_epoch(summary["epoch"], summary["train/epoch_steps"])
        self.log(summary, images)
        self.accelerator.print(
            f"epoch {summary['epoch']}: loss {summary['train/loss']:,.1f} "
            f"({summary['train/loss_per_image']:.2f} per image), held-out {summary['eval/loss_per_image']:.2f} per "
            f"image, {summary['train/img_per_s']:,.0f} img/s, {summary['train/epoch_time_s']:.1f} s"
        )

    def figure(self, epoch: int, step: int, last: bool, image: torch.Tensor, *table: torch.Tensor) -> dict:
        """`images/epoch_NNN.png`; at the end, W&B's table of `table` (originals, reconstructions, labels)."""
        if self.logger.enabled:
            write_safely(lambda path: save_grid(image, path), self.dir / "images" / f"epoch_{epoch:03d}.png")
        if last:
            self.logger.reconstruction_table(*table, step)
        return {"images/grid": image}

    def finish(self, export_dir: Path, final_loss: float | None, provenance: dict, **record) -> None:
        """The per-rank table, this rank's record, the W&B summary and the model artifact; the sinks closed."""
        self.accelerator.print(f"per-rank throughput (means over log intervals):\n{self.table.render()}")
        self.record.finish(**record)
        self.logger.summary({"final/train_loss": final_loss, "final/export": str(export_dir)})
        if self.logger.enabled:  # (other ranks may not see the export: a machine of their own)
            self.artifact("model", {p.name: p for p in sorted(export_dir.iterdir())}, provenance)
        self.logger.close()

    def close(self) -> None:
        """On every way out: no profiler outlives the run."""
        self.profiler.close()


def _gather(obj) -> list:
    return gather_object([obj])
