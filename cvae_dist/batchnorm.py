"""BatchNorm over the global batch of a data-parallel job: per-rank statistics make the trained model depend on how
the batch is split, and torch's SyncBatchNorm refuses CPU tensors, so gloo (CPU) and NCCL (GPU) jobs need one
pure-torch version, capturable in a CUDA graph (no host syncs), with float32 statistics under autocast."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

import torch
import torch.distributed as dist
from torch import nn

_DIMS = (0, 2, 3)  # every dimension but the channel


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 input


def _all_reduce(packed: torch.Tensor, group, on_collective: Callable[[], ContextManager] | None) -> None:
    with on_collective() if on_collective is not None else contextlib.nullcontext():  # telemetry: time it
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    # A (N, 1, H, W) or (N, C, 1, 1) tensor is both; contiguous wins then, as for any elementwise op.
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _GlobalBatchNormFn(torch.autograd.Function):
    """Normalisation by the statistics of every rank's share; updates the running buffers in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps, group, on_collective):
        fmt = _memory_format(x)
        x32 = x.to(_acc_dtype(x))
        c = x.shape[1]
        # count as a tensor (a shape, not a value: no sync): ranks with unequal shares weigh by their rows
        count = torch.full((1,), x.numel() // c, dtype=x32.dtype, device=x.device)
        packed = torch.cat([x32.sum(_DIMS), x32.square().sum(_DIMS), count])
        _all_reduce(packed, group, on_collective)
        total_sum, total_sq, n = packed[:c], packed[c : 2 * c], packed[2 * c :]
        mean = total_sum / n
        var = (total_sq / n - mean.square()).clamp_min(0.0)  # E[x^2] - mean^2 can round below zero
        invstd = torch.rsqrt(var + eps)

        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), factor)
            unbiased = var * n / (n - 1)
            running_var.lerp_(unbiased.to(running_var.dtype), factor)

        scale = invstd if weight is None else invstd * weight.to(x32.dtype)
        y = (x32 - _per_channel(mean)) * _per_channel(scale)
        if bias is not None:
            y = y + _per_channel(bias.to(x32.dtype))
        ctx.save_for_backward(x, weight, mean, invstd, n)
        ctx.group, ctx.on_collective, ctx.bias_dtype = group, on_collective, None if bias is None else bias.dtype
        return y.to(x.dtype).contiguous(memory_format=fmt)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, n = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _acc_dtype(x)
        dy32 = dy.to(acc)
        # xhat is recomputed, not saved: a saved float32 copy would double a bf16 activation's memory
        xhat = (x.to(acc) - _per_channel(mean)) * _per_channel(invstd)
        sum_dy = dy32.sum(_DIMS)
        sum_dy_xhat = (dy32 * xhat).sum(_DIMS)

        grad_x = None
        if need_x:
            c = x.shape[1]
            packed = torch.cat([sum_dy, sum_dy_xhat])
            _all_reduce(packed, ctx.group, ctx.on_collective)
            mean_dy, mean_dy_xhat = packed[:c] / n, packed[c:] / n
            scale = invstd if weight is None else invstd * weight.to(acc)
            g = (dy32 - _per_channel(mean_dy) - xhat * _per_channel(mean_dy_xhat)) * _per_channel(scale)
            grad_x = g.to(x.dtype).contiguous(memory_format=_memory_format(x))
        # The parameters' gradients stay local sums: DDP / DeepSpeed reduce parameter gradients themselves.
        grad_w = sum_dy_xhat.to(weight.dtype) if need_w and weight is not None else None
        grad_b = sum_dy.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics cover every rank of `process_group` (None: the world).

    Same parameters, buffers and state-dict keys as nn.BatchNorm2d; outside training or without an initialised
    torch.distributed it is nn.BatchNorm2d. A one-rank group takes the global path too (its all-reduces are sums of
    one), so that path can be tested, and captured in a CUDA graph, on one device; training runs are unchanged by it,
    as the trainer converts a model only at world > 1 (`Setup.global_batchnorm`)."""

    def __init__(self, *args, process_group: dist.ProcessGroup | None = None,
                 on_collective: Callable[[], ContextManager] | None = None, **kwargs):  # fmt: skip
        """`on_collective`: a context around each all-reduce (telemetry times what this rank waits in)."""
        super().__init__(*args, **kwargs)
        self.process_group, self.on_collective = process_group, on_collective

    def _global(self) -> bool:
        return self.training and dist.is_available() and dist.is_initialized()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._global():
            return super().forward(input)
        self._check_input_dim(input)
        tracked = self.track_running_stats and self.running_mean is not None
        factor: float | torch.Tensor = 0.0 if self.momentum is None else self.momentum
        if tracked and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as a tensor: float(num_batches_tracked) would sync
                factor = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
        return _GlobalBatchNormFn.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            factor,
            self.eps,
            self.process_group,
            self.on_collective,
        )


def use_global_batchnorm(module: nn.Module, on_collective: Callable[[], ContextManager] | None = None) -> nn.Module:
    """Replace every nn.BatchNorm2d under `module` in place by a GlobalBatchNorm2d sharing its parameter and buffer
    tensors; returns `module` (a new GlobalBatchNorm2d if `module` itself is one nn.BatchNorm2d)."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        new = GlobalBatchNorm2d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device="meta",  # every tensor is replaced by the old module's below
            on_collective=on_collective,
        )
        for name, tensor in (*module._parameters.items(), *module._buffers.items()):
            setattr(new, name, tensor)
        new.train(module.training)
        if hasattr(module, "qconfig"):
            new.qconfig = module.qconfig
        return new
    for name, child in module.named_children():
        converted = use_global_batchnorm(child, on_collective)
        if converted is not child:
            setattr(module, name, converted)
    return module
