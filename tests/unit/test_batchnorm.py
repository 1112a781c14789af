"""GlobalBatchNorm2d (batchnorm.py) in real gloo process groups on CPU: ranks with unequal shares of one batch
reproduce one process's nn.BatchNorm2d on the whole batch.

One 3-process job runs every in-group check, in its default group (world 3) and in a 2-rank group of ranks 0 and 1
(world 2): one job, not two, since starting each process costs seconds of import. Its ranks are this file run as a
script (`__main__` below), so they import the package as the test does, whatever pytest's import mode."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import cvae_dist
from cvae_dist.batchnorm import GlobalBatchNorm2d, use_global_batchnorm

C, SIDE, BATCH, STEPS = 16, 8, 128, 3
SHARES = {2: [67, 61], 3: [43, 43, 42]}  # rows per rank, by group size; unequal: the count must weigh each share
JOB = 3  # processes in the job
MOMENTA = (0.1, None)  # exponential, and the cumulative average
# Max abs diffs from the whole-batch reference, measured (both group sizes, both momenta, all 3 steps):
# outputs, grad_input ~3.3e-6, running buffers ~1.4e-6; TOL leaves a 6x margin. The parameter gradients are sums
# over 8192 positions (|values| up to ~250): measured ~9.2e-5, TOL_SUM leaves 10x. The local-statistics control
# misses by ~0.07 (running_var) to ~130 (grad_weight): over 3000x TOL and 100x TOL_SUM.
# One rank against nn.BatchNorm2d's own kernels (another summation order): y, grad_input ~5e-6, buffers ~2e-6,
# grad_weight ~4e-4.
TOL = 2e-5
TOL_SUM = 1e-3
JOB_TIMEOUT_S = 120


def batch_data() -> dict[str, torch.Tensor]:
    """STEPS batches of input and dy, and the affine parameters, from a fixed seed. Channel means and scales
    differ, and rows drift in mean along the batch, so ranks' shares have visibly different local statistics."""
    g = torch.Generator().manual_seed(1234)
    shape = (STEPS, BATCH, C, SIDE, SIDE)
    offset = torch.linspace(-2.0, 3.0, C).view(1, 1, C, 1, 1)
    scale = torch.linspace(0.5, 2.0, C).view(1, 1, C, 1, 1)
    drift = torch.linspace(-1.0, 1.0, BATCH).view(1, BATCH, 1, 1, 1)
    return {
        "x": torch.randn(shape, generator=g) * scale + offset + drift,
        "dy": torch.randn(shape, generator=g),
        "weight": 1.0 + 0.5 * torch.randn(C, generator=g),
        "bias": 0.5 * torch.randn(C, generator=g),
    }


def fresh(cls: type[nn.BatchNorm2d], data: dict, **kwargs) -> nn.BatchNorm2d:
    bn = cls(C, **kwargs)
    with torch.no_grad():
        bn.weight.copy_(data["weight"])
        bn.bias.copy_(data["bias"])
    return bn


def train_steps(bn: nn.BatchNorm2d, xs: torch.Tensor, dys: torch.Tensor) -> dict:
    """STEPS forward/backward passes; each step's output and gradients, and the buffers after the last."""
    out = {"y": [], "grad_x": [], "grad_w": [], "grad_b": []}
    for x, dy in zip(xs, dys, strict=True):
        x = x.clone().requires_grad_()
        y = bn(x)
        y.backward(dy)
        out["y"].append(y.detach())
        out["grad_x"].append(x.grad)
        out["grad_w"].append(bn.weight.grad.clone())
        out["grad_b"].append(bn.bias.grad.clone())
        bn.zero_grad()
    out["buffers"] = {k: v.clone() for k, v in bn.named_buffers()}
    return out


def in_group(rank: int, world: int, group: dist.ProcessGroup | None, data: dict) -> dict:
    """This rank's results of every check in a group of `world` ranks (`group` None: the default one)."""
    lo = sum(SHARES[world][:rank])
    rows = slice(lo, lo + SHARES[world][rank])
    xs, dys = data["x"][:, rows], data["dy"][:, rows]

    def ours(**kwargs) -> GlobalBatchNorm2d:
        return fresh(GlobalBatchNorm2d, data, process_group=group, **kwargs)

    res: dict = {"global": {m: train_steps(ours(momentum=m), xs, dys) for m in MOMENTA}}
    res["local"] = train_steps(fresh(nn.BatchNorm2d, data), xs, dys)  # the negative control

    x_cl = xs[0].contiguous(memory_format=torch.channels_last).requires_grad_()
    y_cl = ours()(x_cl)
    y_cl.backward(dys[0])  # a contiguous dy: grad_input still follows the input's format
    res["channels_last"] = {
        "y_is_cl": y_cl.is_contiguous(memory_format=torch.channels_last),
        "grad_is_cl": x_cl.grad.is_contiguous(memory_format=torch.channels_last),
        "y": y_cl.detach().contiguous(),
        "grad_x": x_cl.grad.contiguous(),
    }

    x_bf = xs[0].bfloat16().requires_grad_()
    bn_bf, bn_32 = ours(), ours()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf = bn_bf(x_bf)
    y_bf.backward(dys[0].bfloat16())
    y_32 = bn_32(x_bf.detach().float())  # the same values in float32: the statistics bf16 input must give
    res["bf16"] = {
        "y_dtype": y_bf.dtype,
        "grad_dtype": x_bf.grad.dtype,
        "y": y_bf.detach().float(),
        "y_32": y_32.detach(),
        "buffers": dict(bn_bf.named_buffers()),
        "buffers_32": dict(bn_32.named_buffers()),
    }

    # eval mode: plain nn.BatchNorm2d on the running buffers
    eval_bn = ours()
    train_steps(eval_bn, xs, dys)
    ref_bn = fresh(nn.BatchNorm2d, data)
    ref_bn.load_state_dict(eval_bn.state_dict())
    eval_bn.eval()
    ref_bn.eval()
    res["eval_equal"] = torch.equal(eval_bn(xs[0]), ref_bn(xs[0]))
    return res


def worker(rank: int, workdir: Path) -> None:
    """One rank of the gloo job: every check's results, to `workdir/rank<r>.pt`."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=JOB, timeout=timedelta(seconds=60)
    )  # a rank that dies fails its peers' collectives within the job's timeout, not gloo's 30 minutes
    pair = dist.new_group([0, 1])  # new_group: every rank creates every group, in one order
    own = [dist.new_group([r]) for r in range(JOB)][rank]
    data = batch_data()
    res = {3: in_group(rank, 3, None, data)}
    if rank < 2:
        res[2] = in_group(rank, 2, pair, data)

    # a one-rank group (the global path, all-reduces of one) against plain nn.BatchNorm2d
    solo = train_steps(fresh(GlobalBatchNorm2d, data, process_group=own), data["x"], data["dy"])
    ref = train_steps(fresh(nn.BatchNorm2d, data), data["x"], data["dy"])
    res["one_rank_group"] = diffs(solo, ref), solo["buffers"]["num_batches_tracked"].item()

    torch.save(res, workdir / f"rank{rank}.pt")
    dist.destroy_process_group()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> list[dict]:
    """The 3-process gloo job; each rank's results."""
    workdir = tmp_path_factory.mktemp("gloo")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = str(Path(cvae_dist.__file__).resolve().parents[1])  # the ranks import this checkout's package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(workdir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(JOB)
    ]
    failures = []
    for rank, p in enumerate(ranks):
        try:
            output, _ = p.communicate(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for q in ranks:
                q.kill()
            output, _ = p.communicate()
            failures.append(f"rank {rank} timed out:\n{output}")
            break
        if p.returncode != 0:
            failures.append(f"rank {rank} exited {p.returncode}:\n{output}")
    assert not failures, "\n".join(failures)
    return [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(JOB)]


def by_group(job: list[dict], world: int) -> list[dict]:
    """The results of the group of `world` ranks, by rank."""
    return [r[world] for r in job[:world]]


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, nn.BatchNorm2d, the whole batch."""
    data = batch_data()
    return {m: train_steps(fresh(nn.BatchNorm2d, data, momentum=m), data["x"], data["dy"]) for m in MOMENTA}


def gathered(ranks: list[dict]) -> dict:
    """Outputs and grad_input concatenated over ranks, parameter gradients summed."""
    return {
        "y": [torch.cat(step) for step in zip(*(r["y"] for r in ranks), strict=True)],
        "grad_x": [torch.cat(step) for step in zip(*(r["grad_x"] for r in ranks), strict=True)],
        "grad_w": [sum(step) for step in zip(*(r["grad_w"] for r in ranks), strict=True)],
        "grad_b": [sum(step) for step in zip(*(r["grad_b"] for r in ranks), strict=True)],
    }


def diffs(job: dict, ref: dict) -> dict[str, float]:
    """Max abs diff of each gathered quantity from the whole-batch reference, over all steps."""
    out = {k: max(max_diff(a, b) for a, b in zip(job[k], ref[k], strict=True)) for k in job if k != "buffers"}
    for k in ("running_mean", "running_var"):
        out[k] = max_diff(job["buffers"][k], ref["buffers"][k])
    return out


def assert_within_tolerance(measured: dict[str, float]) -> None:
    for k, d in measured.items():
        assert d < (TOL_SUM if k in ("grad_w", "grad_b") else TOL), (k, measured)


@pytest.mark.parametrize("world", sorted(SHARES))
@pytest.mark.parametrize("momentum", MOMENTA, ids=["momentum0.1", "cumulative"])
def test_ranks_reproduce_one_process_on_the_whole_batch(job, reference, world, momentum):
    ranks = [r["global"][momentum] for r in by_group(job, world)]
    ref = reference[momentum]
    assert_within_tolerance(diffs(gathered(ranks) | {"buffers": ranks[0]["buffers"]}, ref))
    assert ranks[0]["buffers"]["num_batches_tracked"].item() == ref["buffers"]["num_batches_tracked"].item() == STEPS
    for other in ranks[1:]:  # bit-identical: every rank computes them from the same reduced tensor
        for k, v in ranks[0]["buffers"].items():
            assert torch.equal(other["buffers"][k], v), k


@pytest.mark.parametrize("world", sorted(SHARES))
def test_local_statistics_miss_the_whole_batch_reference(job, reference, world):
    """The control: per-rank nn.BatchNorm2d is far outside the tolerances, so the test above can fail."""
    ranks = [r["local"] for r in by_group(job, world)]
    measured = diffs(gathered(ranks) | {"buffers": ranks[0]["buffers"]}, reference[0.1])
    for k in ("y", "grad_x", "running_mean", "running_var"):
        assert measured[k] > 100 * TOL, (k, measured)
    assert measured["grad_w"] > 100 * TOL_SUM, measured  # grad_bias, sum(dy), does not depend on statistics


@pytest.mark.parametrize("world", sorted(SHARES))
def test_channels_last_stays_channels_last(job, world):
    for r in by_group(job, world):
        cl, contiguous = r["channels_last"], r["global"][0.1]
        assert cl["y_is_cl"] and cl["grad_is_cl"]
        # the same arithmetic in the other layout: only the reduction order differs (measured ~3e-6)
        assert max_diff(cl["y"], contiguous["y"][0]) < TOL
        assert max_diff(cl["grad_x"], contiguous["grad_x"][0]) < TOL


@pytest.mark.parametrize("world", sorted(SHARES))
def test_bf16_in_bf16_out_with_float32_statistics(job, world):
    for r in by_group(job, world):
        bf = r["bf16"]
        assert bf["y_dtype"] == bf["grad_dtype"] == torch.bfloat16
        # float32 arithmetic on the same values as the float32 run: bit-identical statistics
        for k in ("running_mean", "running_var"):
            assert torch.equal(bf["buffers"][k], bf["buffers_32"][k]), k
        # so the output is the float32 output rounded once to bf16: within half a bf16 ulp, 2^-8 relative
        # (measured 3.87e-3 = 0.99 of it)
        assert ((bf["y"] - bf["y_32"]).abs() <= 2**-8 * bf["y_32"].abs()).all()
        # and against the unrounded float32 input's output, input rounding too: measured 5.5e-2 (|y| up to ~6)
        assert max_diff(bf["y"], r["global"][0.1]["y"][0]) < 0.2


@pytest.mark.parametrize("world", sorted(SHARES))
def test_eval_mode_is_plain_batchnorm(job, world):
    assert all(r["eval_equal"] for r in by_group(job, world))


def test_a_one_rank_group_matches_plain_batchnorm(job):
    for r in job:
        measured, tracked = r["one_rank_group"]
        assert_within_tolerance(measured)
        assert tracked == STEPS


def plain_twins(data: dict) -> tuple[nn.BatchNorm2d, nn.BatchNorm2d]:
    return fresh(GlobalBatchNorm2d, data), fresh(nn.BatchNorm2d, data)


def assert_same_steps(a: dict, b: dict) -> None:
    for k in ("y", "grad_x", "grad_w", "grad_b"):
        assert all(torch.equal(u, v) for u, v in zip(a[k], b[k], strict=True)), k
    for k, v in a["buffers"].items():
        assert torch.equal(v, b["buffers"][k]), k


def test_without_a_process_group_it_is_plain_batchnorm():
    if dist.is_initialized():
        pytest.skip("another test left a default process group in this process")
    data = batch_data()
    ours, plain = plain_twins(data)
    assert_same_steps(train_steps(ours, data["x"], data["dy"]), train_steps(plain, data["x"], data["dy"]))


@pytest.mark.parametrize("momentum", MOMENTA, ids=["momentum0.1", "cumulative"])
def test_a_world_of_one_takes_the_global_path_and_matches_batchnorm(tmp_path, monkeypatch, momentum):
    """At world 1 the all-reduces run (what the GPU check captures in a CUDA graph on one GPU), and outputs, input,
    weight and bias gradients and running statistics are nn.BatchNorm2d's."""
    if dist.is_initialized():
        pytest.skip("another test left a default process group in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    calls, all_reduce = [], dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: calls.append(t.numel()) or all_reduce(t, *a, **k))
    try:
        data = batch_data()
        ours, plain = fresh(GlobalBatchNorm2d, data, momentum=momentum), fresh(nn.BatchNorm2d, data, momentum=momentum)
        got, want = train_steps(ours, data["x"], data["dy"]), train_steps(plain, data["x"], data["dy"])
    finally:
        dist.destroy_process_group()
    assert calls == [2 * C + 1, 2 * C] * STEPS  # each step's forward (sums, squares, count) and backward
    assert_within_tolerance(diffs(got, want))
    assert got["buffers"]["num_batches_tracked"].item() == want["buffers"]["num_batches_tracked"].item() == STEPS


def test_use_global_batchnorm_swaps_the_class_and_keeps_every_tensor():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.BatchNorm2d(4, affine=False)),
    )
    model[1].weight.requires_grad_(False)
    model[3][1].eval()
    before = model.state_dict(keep_vars=True)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        want = model(x)

    assert use_global_batchnorm(model) is model
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k] is v, k  # the same tensor objects, so the same storage
    bns = [model[1], model[3][1], model[3][2]]
    assert all(type(m) is GlobalBatchNorm2d for m in bns)
    assert model[1].weight.requires_grad is False and model[1].bias.requires_grad is True
    assert [m.training for m in bns] == [True, False, True]
    assert model[3][1].momentum is None and model[3][2].weight is None
    with torch.no_grad():
        assert torch.equal(model(x), want)  # no process group: the same module as before

    converted = model[1]
    assert use_global_batchnorm(model)[1] is converted  # an already global one stays
    alone = nn.BatchNorm2d(5)
    swapped = use_global_batchnorm(alone)  # a root BatchNorm2d cannot be swapped in place: a new module
    assert type(swapped) is GlobalBatchNorm2d and swapped.weight is alone.weight


if __name__ == "__main__":
    worker(int(sys.argv[1]), Path(sys.argv[2]))
