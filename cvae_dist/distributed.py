"""Process-group set-up: the Accelerator, precision, per-rank threads and batch shares, launch checks, and the one
collective each log interval uses (`exchange`)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

from cvae_dist.config import ConfigError, JobConfig, NonFinite, Precision

SLURM_FACTS = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_NNODES", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID")


class LaunchError(RuntimeError):
    """The processes were started in a way the trainer cannot run correctly."""


def cores_per_rank() -> int:
    """This process's share of the machine's cores (its local peers get the same); at least 1."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def set_threads() -> int:
    """Give each process its share of the cores (2 processes on 2 cores -> 1 thread), unless OMP_NUM_THREADS is set."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cores_per_rank())
    return torch.get_num_threads()


def data_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader workers: as configured, else none on CPU (one took the model's core: slower), on GPU up to 4."""
    if requested is not None:
        return requested
    return 0 if device.type == "cpu" else min(4, cores_per_rank() - 1)


def check_launch() -> None:
    """Refuse launches that would run, but not as asked: a GPU launch config without a usable GPU (accelerate would
    start N CPU processes that train over gloo), and the --cpu launcher asked for several processes (it starts one)."""
    env, use = os.environ, "use --config_file launch/ddp_cpu.yaml"
    if "WORLD_SIZE" not in env and "MASTER_ADDR" in env and "ACCELERATE_DYNAMO_BACKEND" in env:
        one = "accelerate launch asked for several processes but started one (the --cpu launcher does that)"
        raise LaunchError(f"{one}; {use} --num_processes N")
    multi_gpu_launcher = "LOCAL_WORLD_SIZE" in env and env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
    gpus_hidden = env.get("CUDA_VISIBLE_DEVICES", "unset").split(",")[0] in ("", "-1")  # launch/ddp_cpu.yaml
    if not multi_gpu_launcher or gpus_hidden:
        return
    with warnings.catch_warnings(record=True) as caught:  # why CUDA cannot be used: a driver too old, say
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return
    said = next((str(w.message).strip().splitlines()[0] for w in caught), "no NVIDIA GPU or driver found")
    problem = f"no usable GPU for torch {torch.__version__} (built for CUDA {torch.version.cuda}): {said}"
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build"
    asks = "this launch asks for GPUs (accelerate's multi-GPU launcher), but CUDA is unusable here"
    raise LaunchError(f"{asks}: {problem}; for CPU processes {use} (or --gpu_ids=-1,-1)")


def set_determinism(deterministic: bool) -> None:
    """`train.deterministic`, set both ways (a process may train several runs, as the tests do). The cuBLAS
    workspace setting must be in the environment before cuBLAS starts: call this before anything runs on a GPU."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic  # graph-safe: capture follows the warm-up steps


def fast_bf16(device: str) -> bool:
    """bf16 runs at hardware speed here (CVAE_DIST_FAST_BF16=1 or 0 overrides: tests take either branch anywhere)."""
    forced = os.environ.get("CVAE_DIST_FAST_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if forced is not None:
        raise ConfigError(f"CVAE_DIST_FAST_BF16={forced!r}: accepted 1 (fast bf16), 0 (none), or unset (detect)")
    return hardware_bf16(device)


def hardware_bf16(device: str) -> bool:
    """A GPU with bf16 tensor cores, or a CPU with AVX-512 BF16 or AMX, whatever CVAE_DIST_FAST_BF16 says."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool({"avx512_bf16", "amx_bf16"} & set(_cpuinfo("flags", "").split()))


def resolve_precision(requested: Precision, device: str) -> tuple[str, str]:
    """The precision to train in (fp32 | bf16 | fp16) and why: train.precision, else the launcher's bf16 or fp16
    (accelerate launch passes 'no' where its config names none), else bf16 where it is fast, else fp32."""
    launcher, here = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower(), "GPU" if device == "cuda" else "CPU"
    if requested is not Precision.auto:
        chosen, why = requested.value, "train.precision"
    elif launcher in ("bf16", "fp16"):
        chosen, why = launcher, "auto: the launcher's mixed_precision"
    elif launcher != "no":
        raise ConfigError(f"the launcher's mixed_precision={launcher} is not supported; accepted: no, bf16, fp16")
    elif fast_bf16(device):
        chosen, why = "bf16", f"auto: this {here} has fast bf16"
    else:
        chosen, why = "fp32", f"auto: no fast bf16 on this {here}"
    if chosen == "fp16" and device != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU (it uses loss scaling); on a CPU use bf16 or fp32")
    return chosen, why


@dataclass(frozen=True)
class Setup:
    """This process as launched, decided once by `make_accelerator`: the package reads it, never derives it again."""

    accelerator: Accelerator
    precision: str  # fp32 | bf16 | fp16: what the model computes in (autocast; under DeepSpeed its torch_autocast)
    precision_reason: str  # train.precision, or the `auto` rule's answer (printed in the run's first lines)
    deepspeed: bool
    zero_stage: int  # 0 when not under DeepSpeed
    eager_reason: str | None  # why steps are eager rather than one CUDA graph; None: a CUDA graph
    global_batchnorm: bool  # BatchNorm statistics over every rank's images (model.batchnorm=global, world > 1)

    @property
    def graph(self) -> bool:
        return self.eager_reason is None


def make_accelerator(cfg: JobConfig) -> Setup:
    """An Accelerator for whatever `accelerate launch` set up, and the decisions that follow from it."""
    check_launch()
    requested = int(os.environ.get("WORLD_SIZE", "1"))
    cpu_asked = os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true"
    device = "cpu" if cpu_asked or not torch.cuda.is_available() else "cuda"
    precision, why = resolve_precision(cfg.train.precision, device)
    # autocast's weight-cast cache must be off for CUDA-graph capture; this model casts each weight once a step anyway
    handlers: list = [AutocastKwargs(cache_enabled=False)]
    multi_cpu = False
    if requested > 1:
        timeout = timedelta(seconds=cfg.train.collective_timeout_s)  # a dead peer fails us instead of hanging
        backend = "nccl" if device == "cuda" else "gloo"
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timeout))
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            join_this_attempt(backend, timeout)  # (accelerate then keeps the process group it finds)
        # Without CUDA, accelerate would let every rank train alone. DeepSpeed only needs the gloo backend
        # named; plain DDP also needs cpu=True (MULTI_CPU), which would switch DeepSpeed off.
        multi_cpu = device == "cpu" and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
    global_batchnorm = requested > 1 and cfg.model.batchnorm == "global"
    if global_batchnorm:  # every rank's running statistics are the same already: DDP need not broadcast rank 0's
        handlers.append(DistributedDataParallelKwargs(broadcast_buffers=False))
    accelerate_name = "no" if precision == "fp32" else precision
    accelerator = Accelerator(mixed_precision=accelerate_name, kwargs_handlers=handlers, cpu=multi_cpu)
    world, kind = accelerator.num_processes, accelerator.distributed_type
    if requested != world or (requested > 1 and kind == DistributedType.NO):
        alone = f"launched as {requested} processes but this one runs alone (world size {world}, {kind.value})"
        raise LaunchError(f"{alone}; on a CPU-only machine use launch/ddp_cpu.yaml")
    deepspeed = is_deepspeed(accelerator)
    if deepspeed and cfg.train.on_nonfinite is NonFinite.skip:
        engine = "(its engine steps inside backward); accepted there: error"
        raise ConfigError(f"train.on_nonfinite=skip is not available under DeepSpeed {engine}")
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config if deepspeed else {}
    if (steps := ds_config.get("gradient_accumulation_steps", 1)) not in (1, "auto"):
        doubled = f"it would train batches of {steps} x data.batch_size while every count says data.batch_size"
        raise LaunchError(
            f"gradient_accumulation_steps={steps} in the DeepSpeed config: {doubled}, with BatchNorm's statistics "
            "per micro-batch; accepted: 1 (give the batch as data.batch_size)"
        )
    zero = accelerator.state.deepspeed_plugin.zero_stage if deepspeed else 0
    if zero == 3 and cfg.train.ema_decay is not None:
        partition = "each ZeRO-3 rank holds a partition of the weights, and the EMA needs them whole"
        raise LaunchError(
            f"train.ema_decay={cfg.train.ema_decay} under DeepSpeed ZeRO-3: {partition}; accepted: ZeRO 1 or 2, DDP"
        )
    dynamo = accelerator.state.dynamo_plugin.backend.value
    eager_reason = _eager_reason(cfg, accelerator.device.type, deepspeed, precision, dynamo)
    return Setup(accelerator, precision, why, deepspeed, zero, eager_reason, global_batchnorm)


def join_this_attempt(backend: str, timeout: timedelta) -> None:
    """The process group of a group torchrun restarted (`--max_restarts`), on keys of this attempt's own. torchrun's
    agent keeps one store for every attempt, and torch's env:// set-up reads it without an attempt prefix, so a
    restarted rank can find the dead attempt's gloo addresses (connection refused) or wait forever."""
    import torch.distributed as dist

    env = os.environ
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout)
    attempt = dist.PrefixStore(f"attempt-{env['TORCHELASTIC_RESTART_COUNT']}", store)
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    dist.init_process_group(backend, store=attempt, rank=rank, world_size=world, timeout=timeout)


def _eager_reason(cfg: JobConfig, device: str, deepspeed: bool, precision: str, dynamo_backend: str) -> str | None:
    """Why this run takes eager steps rather than a CUDA graph (None: it uses one)."""
    reasons = {
        "train.cuda_graph=false": not cfg.train.cuda_graph,
        "not on CUDA": device != "cuda",
        "DeepSpeed steps inside its engine": deepspeed,
        "fp16 loss scaling syncs with the host": precision == "fp16",
        "train.on_nonfinite=skip syncs with the host every step": cfg.train.on_nonfinite is NonFinite.skip,
        "the model is compiled (torch.compile)": dynamo_backend != "NO",
    }
    return next((reason for reason, applies in reasons.items() if applies), None)


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def load_deepspeed_weights_only(engine) -> None:
    """Make DeepSpeed read its checkpoint shards with `torch.load(weights_only=True)` (its own load would run any
    pickle's `__reduce__`), allowing just the classes its optimizer state holds."""
    import deepspeed.runtime.fp16.loss_scaler as loss_scaler
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [loss_scaler.LossScaler, ZeroStageEnum, fragment_address]

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine = WeightsOnly(engine._config)


def configure_deepspeed(setup: Setup, cfg: JobConfig, per_rank_batch: int) -> None:
    """DeepSpeed's batch fields and clipping from ours, and mixed precision as torch autocast (its own bf16/fp16 modes
    keep buffers in fp32, which BatchNorm's kernel cannot take; `torch_autocast` does as DDP's mixed precision does)."""
    if not setup.deepspeed:
        return
    world, batch = setup.accelerator.num_processes, cfg.data.batch_size
    if batch % world:
        unequal = f"data.batch_size={batch} does not divide by the world size {world}; accepted: a multiple of it"
        raise ConfigError(f"DeepSpeed needs an equal micro-batch on every rank: {unequal}")
    ds = setup.accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = per_rank_batch, 1  # (more: refused)
    ds["train_batch_size"] = per_rank_batch * world
    clip = cfg.train.clip_grad_norm or 0.0  # (accelerate would fill in 1.0 for auto)
    if ds.get("gradient_clipping", "auto") not in ("auto", clip):
        given = f"gradient_clipping={ds['gradient_clipping']} in the DeepSpeed config"
        raise ConfigError(
            f"{given}, train.clip_grad_norm={cfg.train.clip_grad_norm}: the recipe's decides; accepted: auto"
        )
    ds["gradient_clipping"] = clip
    ds["bf16"], ds["fp16"] = {"enabled": False}, {"enabled": False}
    if setup.precision != "fp32":  # lower_precision_safe_modules=[]: gradients reduced in fp32, as DDP reduces them
        dtype = "bfloat16" if setup.precision == "bf16" else "float16"
        ds["torch_autocast"] = {"enabled": True, "dtype": dtype, "lower_precision_safe_modules": []}


def exchange(accelerator: Accelerator, values: dict[str, torch.Tensor | float]) -> dict[str, torch.Tensor]:
    """All-gather named scalars in one collective and wait: {name: (world,) float64 CPU tensor} (same names on all)."""
    return send(accelerator, values)()


def send(accelerator: Accelerator, values: dict[str, torch.Tensor | float]) -> Callable[[], dict[str, torch.Tensor]]:
    """`exchange` in two halves: the all-gather is enqueued now, before anything waits for the device; `read()` waits
    for it. Device tensors are stacked where they are, host numbers sent from pinned memory: so a rank never waits for
    the device without a deadline (NCCL's watchdog ends a wait on a dead peer's gather; a pageable copy or an event's
    synchronize before the gather would wait on a graph's collectives, which no watchdog sees)."""
    device = accelerator.device
    on_device = [name for name, v in values.items() if isinstance(v, torch.Tensor)]
    on_host = [name for name in values if name not in on_device]
    parts = []
    if on_device:
        parts.append(torch.stack([values[n].detach().to(device, torch.float32).reshape(()) for n in on_device]))
    if on_host:
        host = torch.tensor([float(values[n]) for n in on_host], dtype=torch.float32, pin_memory=device.type == "cuda")
        parts.append(host.to(device, non_blocking=True))
    gathered = accelerator.gather(torch.cat(parts)[None])  # (world, names): each name's values are a column
    return lambda: dict(zip(on_device + on_host, gathered.double().cpu().T, strict=True))


class Exchange:
    """The interval's one collective, double-buffered: `settle` reads (with its tags) what `send` enqueued before."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator, self.pending = accelerator, None

    def send(self, values: dict[str, torch.Tensor | float], tags) -> None:
        self.pending = (tags, send(self.accelerator, values))

    def settle(self):
        """(tags, every rank's figures) of the exchange on its way, or None where none is."""
        pending, self.pending = self.pending, None
        return None if pending is None else (pending[0], pending[1]())


def rank_identity(accelerator: Accelerator) -> dict:
    """Who this process is: for per-rank records and W&B config."""
    return {
        "rank": accelerator.process_index,
        "local_rank": accelerator.local_process_index,
        "machine_rank": int(os.environ.get("GROUP_RANK", os.environ.get("SLURM_NODEID", "0"))),
        "host": socket.gethostname(),
        "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
        "world_size": accelerator.num_processes,
        "backend": accelerator.distributed_type.value,
    }


def describe_device(accelerator: Accelerator) -> str:
    """'cuda:0 (NVIDIA H200)' or 'cpu (<model name>, N threads)'."""
    device = accelerator.device
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({_cpuinfo('model name', 'CPU')}, {torch.get_num_threads()} thread(s))"


def _cpuinfo(field: str, default: str) -> str:
    """The value of the first `field` line of /proc/cpuinfo (`default` where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    return default


def environment_facts(setup: Setup) -> dict:
    """Versions, precision, ZeRO stage and scheduler ids, for the W&B run config."""
    accelerator = setup.accelerator
    return {
        **{name: getattr(setup, name) for name in ("precision", "precision_reason", "zero_stage")},
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "dynamo_backend": accelerator.state.dynamo_plugin.backend.value,  # "NO", or the torch.compile backend
        "torch_version": torch.__version__,
        "accelerate_version": importlib.metadata.version("accelerate"),
        "deepspeed_version": next((d.version for d in importlib.metadata.distributions(name="deepspeed")), None),
        "device": str(accelerator.device),
        "device_name": describe_device(accelerator),
        **{k.lower(): v for k, v in os.environ.items() if k in SLURM_FACTS},
    }
