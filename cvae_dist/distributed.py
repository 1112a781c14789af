"""Process-group set-up: the Accelerator, precision, per-rank threads and batch shares, launch checks, and the one
collective each log interval uses (`exchange`)."""

from __future__ import annotations

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


class LaunchError(RuntimeError):
    """The processes were started in a way the trainer cannot run correctly."""


def cores_per_rank() -> int:
    """This process's share of the machine's cores (its local peers get the same); at least 1."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, len(os.sched_getaffinity(0)) // local_world)


def set_threads() -> int:
    """Give each process its share of the cores (2 processes on 2 cores -> 1 thread), unless OMP_NUM_THREADS is set."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    threads = cores_per_rank()
    torch.set_num_threads(threads)
    return threads


def data_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader workers for this rank: as configured, or 0 on CPU (`cvae-dist bench` measured one worker slower
    there: it takes a core from the model) and on GPU up to 4 from this rank's share of the cores, one kept back."""
    if requested is not None:
        return requested
    if device.type == "cpu":
        return 0
    return min(4, cores_per_rank() - 1)


# ---------------------------------------------------------------------------------------------- devices, precision


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here (a CPU build of torch, no GPU, a driver too old for the build), or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return None
    said = next((str(w.message).strip().splitlines()[0] for w in caught), "no NVIDIA GPU or driver found")
    return f"no usable GPU for torch {torch.__version__} (built for CUDA {torch.version.cuda}): {said}"


def check_launch() -> None:
    """Refuse launches that would run, but not as asked: a GPU launch config without a usable GPU (accelerate would
    start N CPU processes that train over gloo), and the --cpu launcher asked for several processes (it starts one)."""
    env = os.environ
    if "WORLD_SIZE" not in env and "MASTER_ADDR" in env and "ACCELERATE_DYNAMO_BACKEND" in env:
        raise LaunchError(
            "accelerate launch asked for several processes but started one (the --cpu launcher does that); "
            "use --config_file launch/ddp_cpu.yaml --num_processes N"
        )
    multi_gpu_launcher = "LOCAL_WORLD_SIZE" in env and env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
    gpus_hidden = env.get("CUDA_VISIBLE_DEVICES", "unset").split(",")[0] in ("", "-1")  # launch/ddp_cpu.yaml
    problem = cuda_problem() if multi_gpu_launcher and not gpus_hidden else None
    if problem:
        raise LaunchError(
            f"this launch asks for GPUs (accelerate's multi-GPU launcher), but CUDA is unusable here: {problem}; "
            "for CPU processes use --config_file launch/ddp_cpu.yaml (or --gpu_ids=-1,-1)"
        )


def set_determinism(deterministic: bool) -> None:
    """`train.deterministic`, set both ways (a process may train several runs, as the tests do). The cuBLAS
    workspace setting must be in the environment before cuBLAS starts: call this before anything runs on a GPU."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic  # graph-safe: capture follows the warm-up steps


def device_type() -> str:
    """'cuda' where this process will train on a GPU, else 'cpu' (decided before the Accelerator exists)."""
    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


FAST_BF16_ENV = "CVAE_DIST_FAST_BF16"  # 1 / 0: what `auto` believes of this device (tests run both ways)


def fast_bf16(device: str) -> bool:
    """bf16 runs at hardware speed here: a GPU with bf16 tensor cores, or a CPU with AVX-512 BF16 or AMX
    (CVAE_DIST_FAST_BF16=1 or 0 overrides the detection, so a test run can take either branch on any machine)."""
    forced = os.environ.get(FAST_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    if forced is not None:
        raise ConfigError(f"{FAST_BF16_ENV}={forced!r}: accepted 1 (fast bf16), 0 (none), or unset (detect)")
    return hardware_bf16(device)


def hardware_bf16(device: str) -> bool:
    """What the hardware has, whatever CVAE_DIST_FAST_BF16 says (for timing it: emulated bf16 is slow)."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (/proc/cpuinfo; empty where there is none)."""
    line = next((line for line in _cpuinfo().splitlines() if line.startswith("flags")), "flags:")
    return set(line.split(":", 1)[1].split())


def resolve_precision(requested: Precision, device: str) -> tuple[str, str]:
    """The precision to train in (fp32 | bf16 | fp16) and why. An explicit train.precision wins; `auto` takes the
    launcher's mixed_precision when it names bf16 or fp16 (accelerate launch always passes one, 'no' when its
    config names none, so 'no' is read as no preference), else bf16 where it is fast, else fp32."""
    if requested is not Precision.auto:
        chosen, why = requested.value, "train.precision"
    else:
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        if launcher in ("bf16", "fp16"):
            chosen, why = launcher, "auto: the launcher's mixed_precision"
        elif launcher != "no":
            raise ConfigError(f"the launcher's mixed_precision={launcher} is not supported; accepted: no, bf16, fp16")
        elif fast_bf16(device):
            chosen, why = "bf16", f"auto: this {'GPU' if device == 'cuda' else 'CPU'} has fast bf16"
        else:
            chosen, why = "fp32", f"auto: no fast bf16 on this {'GPU' if device == 'cuda' else 'CPU'}"
    if chosen == "fp16" and device != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU (it uses loss scaling); on a CPU use bf16 or fp32")
    return chosen, why


@dataclass(frozen=True)
class Setup:
    """This process as launched, decided once by `make_accelerator`: the rest of the package reads these fields and
    never derives them again."""

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
    """An Accelerator for whatever `accelerate launch` set up, in the precision `resolve_precision` picks, and the
    decisions that follow from it."""
    check_launch()
    requested = int(os.environ.get("WORLD_SIZE", "1"))
    device = device_type()
    precision, why = resolve_precision(cfg.train.precision, device)
    # Autocast's weight-cast cache must be off for CUDA-graph capture (see step.py); one cast per weight per step
    # is all this model does anyway.
    handlers: list = [AutocastKwargs(cache_enabled=False)]
    kwargs: dict = {}
    if requested > 1:
        timeout = timedelta(seconds=cfg.train.collective_timeout_s)  # a dead peer fails us instead of hanging
        backend = "nccl" if device == "cuda" else "gloo"
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timeout))
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            join_this_attempt(backend, timeout)  # (accelerate then keeps the process group it finds)
        # Without CUDA, accelerate would let every rank train alone. DeepSpeed only needs the gloo backend
        # named; plain DDP also needs cpu=True (MULTI_CPU), which would switch DeepSpeed off.
        if device == "cpu" and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            kwargs["cpu"] = True
    global_batchnorm = requested > 1 and cfg.model.batchnorm == "global"
    if global_batchnorm:  # every rank's running statistics are the same already: DDP need not broadcast rank 0's
        handlers.append(DistributedDataParallelKwargs(broadcast_buffers=False))
    accelerate_name = "no" if precision == "fp32" else precision
    accelerator = Accelerator(mixed_precision=accelerate_name, kwargs_handlers=handlers, **kwargs)
    alone = requested > 1 and accelerator.distributed_type == DistributedType.NO
    if requested != accelerator.num_processes or alone:
        raise LaunchError(
            f"launched as {requested} processes but this one runs alone (world size {accelerator.num_processes}, "
            f"{accelerator.distributed_type.value}); on a CPU-only machine use launch/ddp_cpu.yaml"
        )
    deepspeed = is_deepspeed(accelerator)
    if deepspeed and cfg.train.on_nonfinite is NonFinite.skip:
        raise ConfigError("train.on_nonfinite=skip is not available under DeepSpeed (its engine steps inside "
                          "backward); accepted there: error")  # fmt: skip
    zero = accelerator.state.deepspeed_plugin.zero_stage if deepspeed else 0
    dynamo = accelerator.state.dynamo_plugin.backend.value
    eager_reason = _eager_reason(cfg, accelerator.device.type, deepspeed, precision, dynamo)
    return Setup(accelerator, precision, why, deepspeed, zero, eager_reason, global_batchnorm)


def join_this_attempt(backend: str, timeout: timedelta) -> None:
    """The process group of a group torchrun restarted (`--max_restarts`), on keys of this attempt's own. torchrun's
    agent keeps one store for every attempt, and torch's env:// set-up reads it without an attempt prefix, so a
    restarted rank can find the dead attempt's gloo addresses (connection refused) or wait forever."""
    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    attempt = dist.PrefixStore(f"attempt-{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    dist.init_process_group(backend, store=attempt, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)  # fmt: skip


def _eager_reason(cfg: JobConfig, device: str, deepspeed: bool, precision: str, dynamo_backend: str) -> str | None:
    """Why this run takes eager steps rather than a CUDA graph (None: it uses one)."""
    if not cfg.train.cuda_graph:
        return "train.cuda_graph=false"
    if device != "cuda":
        return "not on CUDA"
    if deepspeed:
        return "DeepSpeed steps inside its engine"
    if precision == "fp16":
        return "fp16 loss scaling syncs with the host"
    if cfg.train.on_nonfinite is NonFinite.skip:
        return "train.on_nonfinite=skip syncs with the host every step"
    if dynamo_backend != "NO":
        return "the model is compiled (torch.compile)"
    return None


# ---------------------------------------------------------------------------------------------- batches, DeepSpeed


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def load_deepspeed_weights_only(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint shards with `torch.load(weights_only=True)`, allowing just the
    classes its optimizer state holds (its own engine loads with weights_only=False: a `__reduce__` payload in a shard
    would run). `checkpoint.check_pickles` has refused anything else before this loads."""
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
    """DeepSpeed's batch fields from ours, no gradient clipping, and mixed precision as torch autocast.

    DeepSpeed's own bf16/fp16 modes cast the parameters but keep buffers in fp32, which BatchNorm's running
    statistics cannot take (the kernel wants them in the input's dtype); its `torch_autocast` mode keeps fp32 master
    weights and autocasts the forward, exactly as DDP's mixed precision does (and scales fp16 losses)."""
    if not setup.deepspeed:
        return
    accelerator = setup.accelerator
    if cfg.data.batch_size % accelerator.num_processes:
        raise ConfigError(
            f"DeepSpeed needs an equal micro-batch on every rank: data.batch_size={cfg.data.batch_size} does not "
            f"divide by the world size {accelerator.num_processes}; accepted: a multiple of it"
        )
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    accumulation = ds.get("gradient_accumulation_steps", 1)
    accumulation = 1 if accumulation == "auto" else int(accumulation)
    ds["train_micro_batch_size_per_gpu"] = per_rank_batch
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = per_rank_batch * accumulation * accelerator.num_processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = 0.0  # accelerate would fill in 1.0; the recipe does not clip
    mixed = setup.precision
    ds["bf16"], ds["fp16"] = {"enabled": False}, {"enabled": False}
    if mixed != "fp32":
        # lower_precision_safe_modules=[]: gradients are reduced in fp32, as DDP reduces them
        ds["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16" if mixed == "bf16" else "float16",
            "lower_precision_safe_modules": [],
        }


# ---------------------------------------------------------------------------------------------- the interval gather


def exchange(accelerator: Accelerator, values: dict[str, torch.Tensor | float]) -> dict[str, torch.Tensor]:
    """All-gather named scalars in one collective and wait for it: {name: this rank's value} -> {name: (world,)
    float64 CPU tensor, indexed by rank}. Every rank must pass the same names in the same order."""
    return send(accelerator, values)()


def send(accelerator: Accelerator, values: dict[str, torch.Tensor | float]) -> Callable[[], dict[str, torch.Tensor]]:
    """`exchange`, in two halves: the all-gather is enqueued now, before anything waits for the device, and the
    returned `read()` waits for it and returns what `exchange` returns.

    Device tensors are stacked where they are; the host's numbers go over from pinned memory without a sync. So a
    rank that reads only gathers it sent earlier never waits for the device without a deadline: a peer that dies
    leaves that gather incomplete, and NCCL's watchdog (train.collective_timeout_s) ends the wait. A pageable copy or
    an event's synchronize before the gather would wait on a graph's collectives, which no watchdog sees."""
    device = accelerator.device
    on_device = [name for name, v in values.items() if isinstance(v, torch.Tensor)]
    on_host = [name for name in values if name not in on_device]
    parts = []
    if on_device:
        parts.append(torch.stack([values[n].detach().to(device, torch.float32).reshape(()) for n in on_device]))
    if on_host:
        host = torch.tensor([float(values[n]) for n in on_host], dtype=torch.float32, pin_memory=device.type == "cuda")
        parts.append(host.to(device, non_blocking=True))
    gathered = accelerator.gather(torch.cat(parts)[None])
    names = on_device + on_host

    def read() -> dict[str, torch.Tensor]:
        host = gathered.double().cpu()
        return {name: host[:, i] for i, name in enumerate(names)}

    return read


class Exchange:
    """The interval's one collective, double-buffered: `send` enqueues this interval's figures and `settle` reads
    the last one sent (by the next interval its gather has completed while the device kept working), with the tags
    it was sent with."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator, self.pending = accelerator, None

    def send(self, values: dict[str, torch.Tensor | float], tags) -> None:
        self.pending = (tags, send(self.accelerator, values))

    def settle(self):
        """(tags, every rank's figures) of the exchange on its way, or None where none is."""
        pending, self.pending = self.pending, None
        return None if pending is None else (pending[0], pending[1]())


# ---------------------------------------------------------------------------------------------- who and where


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
    model = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")), "CPU"
    )
    return f"cpu ({model}, {torch.get_num_threads()} thread(s))"


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def environment_facts(setup: Setup) -> dict:
    """Versions, precision, ZeRO stage and scheduler ids, for the W&B run config."""
    import accelerate

    accelerator = setup.accelerator
    facts = {
        "precision": setup.precision,
        "precision_reason": setup.precision_reason,
        "zero_stage": setup.zero_stage,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "dynamo_backend": accelerator.state.dynamo_plugin.backend.value,  # "NO", or the torch.compile backend
        "torch_version": torch.__version__,
        "accelerate_version": accelerate.__version__,
        "device": str(accelerator.device),
        "device_name": describe_device(accelerator),
    }
    try:
        facts["deepspeed_version"] = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        facts["deepspeed_version"] = None
    facts |= {k.lower(): v for k, v in os.environ.items() if k in SLURM_FACTS}
    return facts


SLURM_FACTS = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_NNODES", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID")
