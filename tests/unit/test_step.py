"""The step's optimizer settings: the run's step mode decides them, also after a checkpoint brings back its own."""

import pytest
import torch
from accelerate import Accelerator

from cvae_dist.step import apply_step_mode


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
