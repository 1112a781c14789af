"""`build(cfg)`: every check, then every part of a run, each from its config section, in one place. Nothing is
written here (a refusal leaves every file as it was); `Run.opened` starts writing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime  # (TIME_FORMAT counts microseconds, which time.strftime cannot)
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, is_compiled_module, set_seed

from cvae_dist import checkpoint, distributed, evaluation, faults, files, telemetry
from cvae_dist.batchnorm import use_global_batchnorm
from cvae_dist.checkpoint import Checkpointer, TrainerState
from cvae_dist.config import TIME_FORMAT, ConfigError, JobConfig, flat_settings
from cvae_dist.data import DataError, RankStream, batch_share, load_split, to_model_input
from cvae_dist.ema import EMA
from cvae_dist.faults import StopPoll, StopSignal
from cvae_dist.loss_meter import LossMeter
from cvae_dist.model import CVAE, count_parameters
from cvae_dist.monitor import Monitor
from cvae_dist.schedule import Schedule
from cvae_dist.step import EagerStep, GraphStep, apply_step_mode, make_step


@dataclass
class Run:
    """One run on this rank: its parts, built and checked; `state` is changed by the loop alone."""

    cfg: JobConfig
    setup: distributed.Setup  # the accelerator and what was decided with it (precision, ZeRO stage, step mode)
    dir: Path
    lock: files.RunLock  # held from the first check to the run's end: no other launch trains into `dir`
    model: torch.nn.Module  # prepared: DDP / DeepSpeed engine (compiled where accelerate compiles)
    optimizer: torch.optim.Optimizer
    stream: RankStream
    step: EagerStep | GraphStep  # holds the same prepared model
    state: TrainerState  # at the resumed checkpoint's place in training, where it continues one
    resume: checkpoint.Resume | None
    changed: dict[str, tuple[object, object]]  # settings the resume changes: {key: (as trained, now)}
    meter: LossMeter
    exchange: distributed.Exchange
    poll: StopPoll
    checkpointer: Checkpointer
    monitor: Monitor
    steps_per_epoch: int  # agreed: the same on every rank
    last_step: int  # the epochs' steps, or train.max_steps where fewer
    bad_records: int  # skipped in each epoch (data.on_bad_record=skip), all ranks together
    eval_pixels: torch.Tensor
    eval_labels: torch.Tensor
    prior: torch.Tensor  # fixed latent draws for the sample half of the figure
    schedule: Schedule  # each step's lr and KL weight
    ema: EMA | None  # train.ema_decay's average of the weights: what is evaluated, pictured and exported

    def weights(self) -> torch.nn.Module:
        """The model evaluated, pictured and exported: the EMA where there is one (BatchNorm's statistics re-estimated
        for its weights, once per step; every rank calls this at the same points)."""
        if self.ema is None:
            return self.model
        with self.accelerator.autocast():
            self.ema.refresh(self.model_input, self.state.step, self.cfg.train.seed)
        return self.ema.model

    @property
    def accelerator(self) -> Accelerator:
        return self.setup.accelerator

    def epoch_steps(self) -> int:
        """Steps in the epoch in progress: the agreed count, or fewer where the run's last step falls in it."""
        done = self.state.batches_done
        return done + min(self.steps_per_epoch - done, self.last_step - self.state.step)

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Decoded uint8 digits -> the model's input on this rank's device (resized there)."""
        x = pixels.to(self.accelerator.device, non_blocking=True)
        return to_model_input(x, self.cfg.model.image_size, self.cfg.train.channels_last)

    @contextlib.contextmanager
    def opened(self, stop: StopSignal) -> Iterator[None]:
        """The run directory and status.json written, the resumed weights loaded, the sinks opened; on every way out
        (completed, stopped, failed) no graph outlives the process group and the lock is released."""
        accelerator, main = self.accelerator, self.accelerator.is_main_process
        try:
            files.write_run_dir(self.dir, self.cfg, accelerator)
            if main:
                faults.tell_wrapper(self.dir)
            with faults.run_status(self.dir, main), self._out_of_memory_named():
                stop.arm(faults.resume_command(self.cfg))
                self._load_resumed()
                # after load_state, which brings back the settings the checkpoint was written with
                train = self.cfg.train
                apply_step_mode(self.optimizer, self.setup.graph, train.lr, accelerator.device, train.weight_decay)
                self.state.wandb_run_id = self.monitor.start(self.state, self.resume, self.changed)
                try:
                    yield
                finally:
                    self.monitor.close()
        finally:
            try:
                self.step.close()  # (bounded, and it never raises: the error that ended the run is the one to see)
            finally:
                self.lock.release()

    def _load_resumed(self) -> None:
        accelerator, resume = self.accelerator, self.resume
        if resume is not None:
            accelerator.load_state(str(resume.path))
            if self.ema is not None:
                self.ema.start()  # at the resumed weights, unless the checkpoint holds an average
                if not self.ema.load(resume.path):
                    accelerator.print("train.ema_decay: the checkpoint holds no EMA; it starts at the resumed weights")
            accelerator.print(f"resumed from {resume.path}: epoch {self.state.epoch}, step {self.state.step}")
            if accelerator.is_main_process and resume.own:
                for moved in checkpoint.set_aside_newer(self.dir, resume.state.step):
                    why = "failed its checks" if moved.name.endswith(".corrupt") else "is newer than the one resumed"
                    accelerator.print(f"set aside a checkpoint that {why}: {moved}")
            accelerator.wait_for_everyone()
        for key, (before, now) in self.changed.items():
            accelerator.print(f"resume changes {key}: {before!r} -> {now!r}")

    @contextlib.contextmanager
    def _out_of_memory_named(self) -> Iterator[None]:
        """A CUDA out-of-memory error as one line that says where."""
        try:
            yield
        except torch.OutOfMemoryError as e:
            said = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            rank = self.accelerator.process_index
            raise faults.OutOfMemory(f"CUDA out of memory at step {self.state.step} on rank {rank}: {said}") from e


def build(cfg: JobConfig, setup: distributed.Setup | None = None) -> Run:
    """The process group, the run directory's name and the checkpoint to resume, then every part of the run."""
    distributed.set_determinism(cfg.train.deterministic)
    setup = setup or distributed.make_accelerator(cfg)
    accelerator = setup.accelerator
    threads = distributed.set_threads()
    run_dir, lock, resume = _locate_run(accelerator, cfg)
    with lock.released_on_error():
        return _parts(cfg, setup, threads, run_dir, lock, resume)


def _parts(
    cfg: JobConfig,
    setup: distributed.Setup,
    threads: int,
    run_dir: Path,
    lock: files.RunLock,
    resume: checkpoint.Resume | None,
) -> Run:
    accelerator, graph = setup.accelerator, setup.graph
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    accelerator.print(
        f"device {distributed.describe_device(accelerator)}, {world} process(es), precision "
        f"{setup.precision} ({setup.precision_reason}), {threads} thread(s) each"
    )
    # Data first: the steps per epoch are agreed before anything is sized by them.
    share = batch_share(cfg.data.batch_size, world, rank)  # this rank's rows of every global batch
    batch = share.stop - share.start
    workers = distributed.data_workers(cfg.data.num_workers, device)
    stream = RankStream(cfg.data, rank, world, cfg.train.seed, workers, device, accelerator.local_main_process_first)
    steps_per_epoch, bad_records = _agree_on_steps(accelerator, stream)
    eval_pixels, eval_labels = load_split(cfg.data.source, cfg.data.eval_split)

    blocked_unknown = _blocked_unknown(setup, world)
    mfu = {}
    if cfg.log.telemetry:
        peak, source = telemetry.peak_flops(device, setup.precision, cfg.log.peak_tflops)
        mfu = {
            "flops_per_image": telemetry.count_flops_per_image(cfg.model),
            "peak_flops": peak,
            "peak_flops_source": source,
        }
        timer = telemetry.StepTimer(device, batch, mfu["flops_per_image"], peak, blocked_unknown)
    else:  # images over wall time only: no hooks, no FLOP count
        timer = telemetry.NoTimer(batch)
    if cfg.log.telemetry and blocked_unknown:
        accelerator.print(f"straggler detection: off ({blocked_unknown}); busy img/s and sync wait are n/a")

    set_seed(cfg.train.seed)  # the same initial weights on every rank
    model = CVAE(cfg.model)
    accelerator.print(f"trainable parameters: {count_parameters(model):,}")
    if cfg.train.channels_last and not setup.deepspeed:  # DeepSpeed broadcasts parameters as flat, contiguous bytes
        model = model.to(memory_format=torch.channels_last)
    if setup.global_batchnorm:  # the same statistics on every rank: the global batch's
        timed = cfg.log.telemetry and not blocked_unknown  # (the time this rank waits in its all-reduces)
        model = use_global_batchnorm(model, timer.waiting if timed else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
    distributed.configure_deepspeed(setup, cfg, batch)
    side_stream = torch.cuda.Stream() if graph else None  # a graph's DDP is wrapped on the stream it warms up on
    with torch.cuda.stream(side_stream) if graph else contextlib.nullcontext():
        model, optimizer = accelerator.prepare(model, optimizer)
    if graph:
        torch.cuda.current_stream().wait_stream(side_stream)
    if setup.deepspeed:
        distributed.load_deepspeed_weights_only(model)
    ema = None
    if cfg.train.ema_decay is not None:  # after prepare: an engine may have moved the weights
        layout = cfg.train.channels_last and not setup.deepspeed
        ema = EMA(accelerator.unwrap_model(model), cfg.model, cfg.train.ema_decay, device, layout)
        if setup.global_batchnorm:  # its statistics re-estimated over the global batches, as the live model's
            use_global_batchnorm(ema.model)
    step = make_step(setup, model, optimizer, cfg, share, side_stream, ema)
    if not graph and cfg.log.telemetry:  # hooks do not run inside a replayed CUDA graph
        timer.instrument(model, optimizer)

    state = TrainerState(
        world_size=world,
        per_rank_batch_size=batch,
        global_batch_size=cfg.data.batch_size,
        data_path="resident" if stream.resident else "streamed",
        zero_stage=setup.zero_stage,
        model=cfg.model.shape(),
        engine="deepspeed" if setup.deepspeed else "ddp",
        data_workers=workers if stream.order_depends_on_workers else 0,
        settings=flat_settings(cfg),
    )
    changed = {}
    if resume is not None:
        changed = checkpoint.check_compatible(resume.state, resume.path, state)
        checkpoint.check_pickles(resume.path)
        state = state.continued(resume.state)
        if not resume.own:  # a new run from another run's checkpoint: its own W&B run
            state.wandb_run_id = None
    steps = cfg.train.epochs * steps_per_epoch
    last_step = min(steps, cfg.train.max_steps or steps)
    if last_step <= state.step and cfg.train.max_steps is not None:
        accelerator.print(f"train.max_steps={cfg.train.max_steps}: nothing left to train (at step {state.step})")

    identity = distributed.rank_identity(accelerator)
    identities = gather_object([identity])  # once, at start: host and machine of every rank
    facts = {
        "compute_dtype": _compute_dtype(model, accelerator, cfg),
        "compiled": is_compiled_module(model),
        "per_rank_batch_size": batch,
        "global_batch_size": cfg.data.batch_size,
        "steps_per_epoch": steps_per_epoch,
        "threads_per_rank": torch.get_num_threads(),
        "step_mode": type(step).__name__,
        "evaluated_weights": f"ema (decay {cfg.train.ema_decay})" if ema else "live",
        "global_batchnorm": setup.global_batchnorm,
        "straggler_detection": (blocked_unknown or "on") if cfg.log.telemetry else "off (log.telemetry=false)",
        "data_path": state.data_path,
        "data_table": stream.table.source if stream.resident else None,
        **identity,
        **mfu,
        "hosts": [i["host"] for i in identities],
        "nodes": [i["node"] for i in identities],
        **distributed.environment_facts(setup),
    }
    monitor = Monitor(cfg, accelerator, run_dir, facts, identities, timer, state.step + 1, last_step)
    meter = LossMeter.from_state(state.loss, device, rank, state.step, world)
    checkpointer = Checkpointer(
        accelerator,
        run_dir,
        cfg.checkpoint,
        meter,
        monitor.log,
        ema,
        saved_step=resume.state.step if resume and resume.own else None,
    )
    prior = torch.randn(
        evaluation.GRID_IMAGES, cfg.model.latent_dim, generator=torch.Generator().manual_seed(cfg.train.seed)
    )
    accelerator.print(
        f"run {run_dir}: {cfg.data.batch_size} images per step ({batch} on this rank), "
        f"{steps_per_epoch} steps per epoch ({steps_per_epoch * cfg.data.batch_size} images), "
        f"{type(step).__name__}"
    )
    return Run(
        cfg,
        setup,
        run_dir,
        lock,
        model,
        optimizer,
        stream,
        step,
        state,
        resume,
        changed,
        meter,
        distributed.Exchange(accelerator),
        StopPoll(state.step),
        checkpointer,
        monitor,
        steps_per_epoch,
        last_step,
        bad_records,
        eval_pixels,
        eval_labels,
        prior,
        Schedule(cfg.train, cfg.data.batch_size, steps),
        ema,
    )


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
    name = expanded() if timed else cfg.run_name
    while timed and (Path(cfg.output_dir) / name).exists():  # never a name a directory has
        name = expanded()
    names = [name]
    broadcast_object_list(names, from_process=0)  # rank 0's: ranks start at different moments
    cfg.run_name = names[0]  # (the resolved name: written to config.yaml, named in resume commands)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    files.check_writable(run_dir)
    lock = files.RunLock(accelerator, run_dir)
    with lock.released_on_error():
        resume = checkpoint.resolve_resume(run_dir, cfg.resume, accelerator.print)  # every rank, same answer
        if cfg.resume is None or (resume is not None and not resume.own):
            files.check_new_run_dir(run_dir)  # a new run, or one started from another run's checkpoint
        else:
            files.check_config_file(run_dir, cfg)
    return run_dir, lock, resume


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


def _blocked_unknown(setup: distributed.Setup, world: int) -> str | None:
    """Why the time this rank waits for its peers cannot be timed (None: it can, or it has none): hooks time it,
    and they run only in DDP's eager step."""
    if world == 1:
        return None
    if setup.graph:
        return "a replayed CUDA graph runs no hooks to time its collectives; train.cuda_graph=false times them"
    return "DeepSpeed's engine has no hook to time its collectives" if setup.deepspeed else None


def _compute_dtype(model: torch.nn.Module, accelerator: Accelerator, cfg: JobConfig) -> str:
    """What the prepared model computes in: one probe forward in eval mode (BatchNorm's statistics stay)."""
    x = to_model_input(
        torch.zeros(2, 1, 28, 28, dtype=torch.uint8, device=accelerator.device),
        cfg.model.image_size,
        cfg.train.channels_last,
    )
    model.eval()
    try:
        with evaluation.fixed_noise(accelerator.device, 0), accelerator.autocast():
            return telemetry.compute_dtype(model, lambda: model(x))
    finally:
        model.train()
