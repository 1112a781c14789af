"""BatchNorm over the global batch of a data-parallel job: per-rank statistics make the trained model depend on how
the batch is split, and torch's SyncBatchNorm refuses CPU tensors, so gloo (CPU) and NCCL (GPU) jobs need one
pure-torch version, capturable in a CUDA graph (no host syncs), with float32 statistics under autocast."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

_DIMS = (0, 2, 3)  # every dimension but the channel


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def _all_reduce(packed: torch.Tensor, group, on_collective) -> None:
    with on_collective() if on_collective is not None else contextlib.nullcontext():  # telemetry: time it
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    # A (N, 1, H, W) or (N, C, 1, 1) tensor is both; contiguous wins then, as for any elementwise op.
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class _GlobalBatchNormFn(torch.autograd.Function):
    """Normalisation by the statistics of every rank's share; updates the running buffers in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps, group, on_collective):
        fmt = _memory_format(x)
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # float32, or float64 for float64 input
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
            running_var.lerp_((var * n / (n - 1)).to(running_var.dtype), factor)  # unbiased
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
        acc = torch.promote_types(x.dtype, torch.float32)
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
    """nn.BatchNorm2d whose training statistics cover every rank of `process_group` (None: the world) once
    torch.distributed is initialised, one rank too; `on_collective`: a context around each all-reduce (telemetry's)."""

    def __init__(self, *args, process_group: dist.ProcessGroup | None = None, on_collective=None, **kwargs):
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
        running = (self.running_mean, self.running_var) if tracked else (None, None)
        args = (*running, factor, self.eps, self.process_group, self.on_collective)
        return _GlobalBatchNormFn.apply(input, self.weight, self.bias, *args)


def use_global_batchnorm(module: nn.Module, on_collective=None) -> nn.Module:
    """`module` with every nn.BatchNorm2d in it replaced in place by a GlobalBatchNorm2d sharing its tensors."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        args = (module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new = GlobalBatchNorm2d(*args, device="meta", on_collective=on_collective)  # tensors: the old module's, below
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
