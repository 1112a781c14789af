"""Process-group set-up: the Accelerator, per-rank threads, and launch sanity checks."""

from __future__ import annotations

import importlib.metadata
import os
import socket
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from cvae_dist.config import ConfigError, JobConfig


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


def make_accelerator(cfg: JobConfig) -> Accelerator:
    """An Accelerator for whatever `accelerate launch` set up; refuses launches that silently lost their peers."""
    if "WORLD_SIZE" not in os.environ and "MASTER_ADDR" in os.environ and "ACCELERATE_DYNAMO_BACKEND" in os.environ:
        # `accelerate launch --cpu --num_processes N` sets a rendezvous address for N > 1, then starts one process.
        raise LaunchError(
            "accelerate launch asked for several processes but started one (the --cpu launcher does that); "
            "use --config_file launch/ddp_cpu.yaml --num_processes N"
        )
    requested = int(os.environ.get("WORLD_SIZE", "1"))
    kwargs: dict = {}
    if requested > 1:
        cuda = torch.cuda.is_available()
        timeout = timedelta(seconds=cfg.train.collective_timeout_s)  # a dead peer fails us instead of hanging
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=timeout)]
        # Without CUDA, accelerate would let every rank train alone. DeepSpeed only needs the gloo backend
        # named; plain DDP also needs cpu=True (MULTI_CPU), which would switch DeepSpeed off.
        if not cuda and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            kwargs["cpu"] = True
    accelerator = Accelerator(mixed_precision=cfg.train.precision.value, **kwargs)
    alone = requested > 1 and accelerator.distributed_type == DistributedType.NO
    if requested != accelerator.num_processes or alone:
        raise LaunchError(
            f"launched as {requested} processes but this one runs alone (world size {accelerator.num_processes}, "
            f"{accelerator.distributed_type.value}); on a CPU-only machine use launch/ddp_cpu.yaml"
        )
    return accelerator


def per_rank_batch_size(cfg: JobConfig, world_size: int) -> int:
    """The recipe's batch is global; each rank takes an equal share (or the pinned per-rank batch)."""
    if cfg.data.per_rank_batch_size is not None:
        return cfg.data.per_rank_batch_size
    if cfg.data.batch_size % world_size:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by the world size {world_size}; "
            f"pick a multiple of {world_size} or pin data.per_rank_batch_size"
        )
    return cfg.data.batch_size // world_size


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed(accelerator: Accelerator, per_rank_batch: int) -> None:
    """Keep DeepSpeed's train_batch_size = micro batch x accumulation x world size consistent with ours."""
    if not is_deepspeed(accelerator):
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    accumulation = ds.get("gradient_accumulation_steps", 1)
    accumulation = 1 if accumulation == "auto" else int(accumulation)
    ds["train_micro_batch_size_per_gpu"] = per_rank_batch
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = per_rank_batch * accumulation * accelerator.num_processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = 0.0  # accelerate would fill in 1.0; the recipe does not clip


def input_dtype(accelerator: Accelerator) -> torch.dtype:
    """DeepSpeed bf16/fp16 casts the weights and does not autocast: the inputs must match them."""
    if is_deepspeed(accelerator) and accelerator.mixed_precision in ("bf16", "fp16"):
        return torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
    return torch.float32


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


def zero_stage(accelerator: Accelerator) -> int:
    """The DeepSpeed ZeRO stage, 0 when not under DeepSpeed."""
    return accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed(accelerator) else 0


def environment_facts(accelerator: Accelerator) -> dict:
    """Versions, precision, ZeRO stage and scheduler ids, for the W&B run config."""
    import accelerate

    facts = {
        "precision": accelerator.mixed_precision,
        "zero_stage": zero_stage(accelerator),
        "dynamo_backend": accelerator.state.dynamo_plugin.backend.value,  # "NO", or the torch.compile backend
        "torch_version": torch.__version__,
        "accelerate_version": accelerate.__version__,
        "device": str(accelerator.device),
    }
    try:
        facts["deepspeed_version"] = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        facts["deepspeed_version"] = None
    facts |= {k.lower(): v for k, v in os.environ.items() if k in SLURM_FACTS}
    return facts


SLURM_FACTS = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_NNODES", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID")
