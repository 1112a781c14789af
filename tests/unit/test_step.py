"""The steps: eager (one AdamW update on the summed loss), the noise by place in the global batch, the optimizer's
settings by step mode, and a CUDA graph that proves itself on its first replay or falls back to eager (driven on a CPU
with stand-in captures through the same code)."""

import copy

import pytest
import torch
from accelerate import Accelerator

from cvae_dist.config import LRSchedule, ModelConfig, TrainConfig
from cvae_dist.data import batch_share, to_model_input
from cvae_dist.ema import EMA
from cvae_dist.loss_meter import LossMeter
from cvae_dist.model import CVAE, vae_loss
from cvae_dist.schedule import Schedule
from cvae_dist.step import EagerStep, GraphStep, SampleNoise, _finite_gradients, apply_step_mode


def prepared_adamw():
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def one_step(model, optimizer):
    model(torch.ones(4, 3)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("written_in_graph_mode", [False, True], ids=["eager-ckpt-into-graph", "graph-ckpt-into-eager"])
def test_the_runs_step_mode_decides_capturable_and_lr_after_load_state(tmp_path, written_in_graph_mode):
    accelerator, model, optimizer = prepared_adamw()
    apply_step_mode(optimizer, written_in_graph_mode, 1e-3, accelerator.device)
    one_step(model, optimizer)
    accelerator.save_state(str(tmp_path / "ckpt"))

    resumed_in_graph_mode = not written_in_graph_mode
    apply_step_mode(optimizer, resumed_in_graph_mode, 2e-3, accelerator.device)
    accelerator.load_state(str(tmp_path / "ckpt"))
    # torch keeps only `params` of the live groups: every other setting is the checkpoint's
    assert [g["capturable"] for g in optimizer.param_groups] == [written_in_graph_mode]
    apply_step_mode(optimizer, resumed_in_graph_mode, 2e-3, accelerator.device)
    for group in optimizer.param_groups:
        assert group["capturable"] is resumed_in_graph_mode
        if resumed_in_graph_mode:
            assert isinstance(group["lr"], torch.Tensor) and group["lr"].device == accelerator.device
        else:
            assert isinstance(group["lr"], float)
        assert float(group["lr"]) == pytest.approx(2e-3)  # this run's lr, not the checkpoint's
    one_step(model, optimizer)  # and it steps


def test_a_graphs_lr_is_a_tensor_that_every_step_reads():
    """A captured step replays its kernels with the arguments it was captured with: a float lr would be baked in.
    The graph mode's lr is a tensor, changed in place, so the same kernels see the new value."""
    finals = []
    for change in (False, True):
        accelerator, model, optimizer = prepared_adamw()
        apply_step_mode(optimizer, True, 1e-3, accelerator.device)
        lr = optimizer.param_groups[0]["lr"]
        one_step(model, optimizer)
        if change:
            lr.fill_(1e-1)
        one_step(model, optimizer)
        assert optimizer.param_groups[0]["lr"] is lr  # the very tensor a captured graph would read
        finals.append(model.weight.detach().clone())
    assert not torch.equal(*finals)


SIZE = 16


def tiny_cvae_step(skip_nonfinite: bool, clip: float | None = None, ema_decay: float | None = None):
    """An EagerStep on a small CVAE, prepared by a one-process CPU Accelerator, and a copy of its start. With `clip`
    or `ema_decay`, as a graph's: the lr a tensor (fused AdamW reads it)."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    cfg = ModelConfig(latent_dim=2, filters=8, image_size=SIZE)
    model = CVAE(cfg)
    start = copy.deepcopy(model)
    knobs = clip is not None or ema_decay is not None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-5, fused=knobs or None)
    model, optimizer = accelerator.prepare(model, optimizer)
    if knobs:
        optimizer.param_groups[0]["lr"] = torch.tensor(1e-2)
    noise = SampleNoise(3, 6, 2, slice(0, 6), accelerator.device)
    ema = EMA(model, cfg, ema_decay, accelerator.device, False) if ema_decay else None
    step = EagerStep(accelerator, model, optimizer, noise, SIZE, False, skip_nonfinite, clip, ema)
    return step, start


def pixels() -> torch.Tensor:
    return torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_an_eager_step_is_one_adamw_update_on_the_summed_loss():
    step, start = tiny_cvae_step(skip_nonfinite=False)
    meter = LossMeter(torch.device("cpu"), rank=0, step=0)
    # by hand, on a copy, with the same noise: resize, forward, summed loss, backward, AdamW
    model = copy.deepcopy(start)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-5)
    x = to_model_input(pixels(), SIZE, channels_last=False)
    loss = vae_loss(model(x, SampleNoise(3, 6, 2, slice(0, 6), torch.device("cpu")).draw()), x).total
    loss.backward()
    optimizer.step()
    step(pixels(), meter)
    assert meter.local()["loss/epoch"].item() == pytest.approx(loss.item(), rel=1e-6)
    trained = dict(step.model.named_parameters())
    for (name, p), p0 in zip(model.named_parameters(), start.parameters(), strict=True):
        assert torch.allclose(trained[name], p, rtol=1e-5, atol=1e-7), name
        assert not torch.equal(trained[name], p0), name  # and every parameter moved
    assert all(p.grad is None for p in step.model.parameters())  # set to none for the next step


def poison(step: EagerStep) -> dict[str, torch.Tensor]:
    """A NaN in one weight: the loss and every gradient upstream of it are NaN. Returns the weights before."""
    with torch.no_grad():
        step.model.decoder.linear.weight[0, 0] = float("nan")
    return {n: p.detach().clone() for n, p in step.model.named_parameters()}


def test_skip_mode_drops_a_step_whose_gradients_are_not_finite():
    step, _ = tiny_cvae_step(skip_nonfinite=True)
    before = poison(step)
    meter = LossMeter(torch.device("cpu"), rank=0, step=0)
    step(pixels(), meter)
    for name, p in step.model.named_parameters():
        assert torch.equal(p.nan_to_num(7.0), before[name].nan_to_num(7.0)), name  # not updated
    assert meter.epoch_skipped == 1 and meter.local()["loss/first_bad"].item() < 0
    assert all(p.grad is None for p in step.model.parameters())  # the NaN gradients do not reach the next step


def test_error_mode_takes_the_step_and_the_meter_sees_the_bad_loss():
    step, _ = tiny_cvae_step(skip_nonfinite=False)
    before = poison(step)
    meter = LossMeter(torch.device("cpu"), rank=0, step=4)
    step(pixels(), meter)
    assert meter.epoch_skipped == 0 and meter.local()["loss/first_bad"].item() == 5  # for the check at the step line
    assert step.model.encoder.mu.weight.isnan().all() and not before["encoder.mu.weight"].isnan().any()


def test_finite_gradients_is_false_when_any_gradient_is_not_finite():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert _finite_gradients(optimizer)  # no gradients yet
    model(torch.ones(1, 3)).sum().backward()
    assert _finite_gradients(optimizer)
    for bad in (float("inf"), float("nan")):
        grad = model[1].bias.grad
        grad[0] = bad
        assert not _finite_gradients(optimizer)
        grad[0] = 0.0


@pytest.mark.parametrize("world", [2, 3])
def test_a_digits_noise_is_its_place_in_the_global_batch_at_any_world_size(world):
    cpu = torch.device("cpu")
    whole = SampleNoise(0, 7, 4, slice(0, 7), cpu)
    ranks = [SampleNoise(0, 7, 4, batch_share(7, world, r), cpu) for r in range(world)]
    for epoch in (1, 2):
        for noise in (whole, *ranks):
            noise.start_epoch(epoch)
        for _ in range(3):
            assert torch.equal(torch.cat([n.draw() for n in ranks]), whole.draw())


def test_a_resumed_epoch_continues_its_noise_and_epochs_differ():
    cpu = torch.device("cpu")
    noise = SampleNoise(0, 8, 2, slice(0, 8), cpu)
    noise.start_epoch(3)
    draws = [noise.draw() for _ in range(4)]
    noise.start_epoch(3, steps_done=2)  # a checkpoint after the epoch's second step
    assert torch.equal(noise.draw(), draws[2])
    noise.start_epoch(4)
    assert not torch.equal(noise.draw(), draws[0])
    assert not torch.equal(SampleNoise(1, 8, 2, slice(0, 8), cpu).draw(), SampleNoise(0, 8, 2, slice(0, 8), cpu).draw())


class Replays:
    """A stand-in for `cuda_graph` on a CPU: capture records the step's body without running it (as CUDA capture
    does) and a replay runs it, gradients written afresh (as a captured backward does); `wrong`: every replay also
    nudges the weights (a graph that trains wrongly); `fails`: capture raises."""

    def __init__(self, wrong: bool = False, fails: bool = False):
        self.wrong, self.fails, self.replays, self.weights = wrong, fails, 0, []

    def __call__(self, body, _stream, _generator):
        if self.fails:
            raise RuntimeError("operation not permitted when stream is capturing\n(the rest of the message)")
        replays = self

        class Graph:
            def replay(self):
                replays.replays += 1
                for w in replays.weights:
                    w.grad = None
                body()
                if replays.wrong:
                    with torch.no_grad():
                        for w in replays.weights:
                            w.mul_(1.01)

            def reset(self):
                pass

        return Graph()


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8, generator=g) for _ in range(n)]


def train_five(step, model, schedule=None) -> tuple[dict[str, torch.Tensor], LossMeter]:
    meter = LossMeter(torch.device("cpu"), rank=0, step=0)
    for i, b in enumerate(batches(5)):
        step(b, meter, schedule.at(i + 1) if schedule else None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, meter


@pytest.mark.parametrize(
    ("capture", "mode", "said"),
    [
        (Replays(), "GraphStep", "CUDA graph: the first replay matches the eager step"),
        (Replays(wrong=True), "EagerStep", "CUDA graph: not used, its first replay differs from the eager step by"),
        (
            Replays(fails=True),
            "EagerStep",
            "CUDA graph: not used, capture failed: RuntimeError: operation not permitted "
            "when stream is capturing; training on with eager steps",
        ),
    ],
    ids=["agrees", "disagrees", "capture-raises"],
)
def test_a_graph_proves_itself_on_its_first_replay_or_the_run_trains_on_eagerly(capsys, capture, mode, said):
    eager, _ = tiny_cvae_step(skip_nonfinite=False)
    eager_weights, eager_meter = train_five(eager, eager.model)
    inner, _ = tiny_cvae_step(skip_nonfinite=False)
    step = GraphStep(inner, batch=6, warmup=2, side_stream=None, tolerance=1e-3, capture=capture)
    capture.weights = list(inner.model.parameters())
    weights, meter = train_five(step, inner.model)
    assert step.mode == mode and said in capsys.readouterr().out
    if mode == "GraphStep":  # captured at step 3, checked, replayed for steps 3-5
        assert step.check["max_rel_diff"] <= 1e-6 and capture.replays == 3
    else:
        assert step.check["fallback"].startswith(said.split("not used, ")[1][:20])
    # whatever happened, the run trained as the eager step does: a bad replay's result is never kept
    for name, w in eager_weights.items():
        assert torch.allclose(weights[name], w, rtol=1e-5, atol=1e-6), name
    assert meter.local()["loss/epoch"].item() == pytest.approx(eager_meter.local()["loss/epoch"].item(), rel=1e-6)
    assert int(meter.step) == 5


def test_a_graph_with_a_schedule_kl_warmup_clipping_and_an_ema_trains_as_eager_steps_do():
    # the lr and KL weight change every step: a replay reads them from the same tensors, set in place between replays
    # (never a recapture); clipping and the EMA's update are inside the captured body, without a host sync
    train = TrainConfig(lr=1e-2, lr_schedule=LRSchedule.cosine, warmup_images=12, kl_warmup_images=60, ema_decay=0.5)
    schedule = Schedule(train, 6, 10)
    eager, _ = tiny_cvae_step(False, clip=1.0, ema_decay=0.5)
    eager_weights, eager_meter = train_five(eager, eager.model, schedule)
    inner, _ = tiny_cvae_step(False, clip=1.0, ema_decay=0.5)
    lr, kl_weight = inner.optimizer.param_groups[0]["lr"], inner.kl_weight
    capture = Replays()
    step = GraphStep(inner, batch=6, warmup=2, side_stream=None, tolerance=1e-3, capture=capture)
    capture.weights = list(inner.model.parameters())
    weights, meter = train_five(step, inner.model, schedule)
    assert step.mode == "GraphStep" and capture.replays == 3 and step.check["max_rel_diff"] <= 1e-6
    assert inner.optimizer.param_groups[0]["lr"] is lr and inner.kl_weight is kl_weight  # the tensors a graph reads
    assert lr.item() == pytest.approx(schedule.at(5).lr) and kl_weight.item() == schedule.at(5).kl_weight < 1
    for name, w in eager_weights.items():
        assert torch.allclose(weights[name], w, rtol=1e-5, atol=1e-6), name
    for mine, theirs in zip(inner.ema.tensors(), eager.ema.tensors(), strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(inner.ema.averaged[0], inner.model.encoder.down1.conv.weight)  # an average, not a copy
    assert meter.local()["grad/norm"].item() == pytest.approx(eager_meter.local()["grad/norm"].item(), rel=1e-5)


def test_clipping_scales_the_global_gradient_to_the_bound_and_reports_the_norm_before():
    step, _ = tiny_cvae_step(False, clip=0.5)
    step.forward_backward(pixels())
    grads = [p.grad.clone() for p in step.model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > 0.5  # (a summed loss: its gradient is far above the bound)
    assert step.clip_gradients().item() == pytest.approx(norm.item(), rel=1e-5)
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in step.model.parameters()]))
    assert after.item() == pytest.approx(0.5, rel=1e-4)
    off, _ = tiny_cvae_step(False)
    off.forward_backward(pixels())
    before = [p.grad.clone() for p in off.model.parameters()]
    off.clip_gradients()  # no clipping: the gradients stay as they are, bit for bit
    assert all(torch.equal(p.grad, g) for p, g in zip(off.model.parameters(), before, strict=True))
