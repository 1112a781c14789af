"""On a CUDA GPU only (skipped elsewhere): the whole-step CUDA graph, the resident data on the device, DeepSpeed in
bf16 / fp16 and `auto` precision. Every path these tests cover that also runs on a CPU is tested there as well."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from support.checks import step_losses
from support.launching import DEBUG, launch
from support.wandb_offline import read_run

from cvae_dist.config import DataConfig, load_config
from cvae_dist.data import RankStream
from cvae_dist.trainer import train

pytestmark = pytest.mark.gpu

# 20 steps of the debug recipe, a step line every 5, fp32, deterministic kernels (cuDNN may otherwise pick
# non-deterministic backward convolutions, and no two runs would agree bit for bit).
STEPS = ["train.max_steps=20", "log.every_steps=5", "log.wandb=disabled", "train.precision=fp32",
         "train.deterministic=true"]  # fmt: skip
TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2}  # graph vs eager, per step line (relative): the same kernels, reordered


def test_cuda_graph_is_the_default_and_matches_eager_steps(tmp_path):
    graph = train(load_config(DEBUG, [*STEPS, f"output_dir={tmp_path}", "run_name=graph", "log.wandb=offline"]))
    eager = train(load_config(DEBUG, [*STEPS, f"output_dir={tmp_path}", "run_name=eager", "train.cuda_graph=false"]))
    assert read_run(graph.run_dir).config["step_mode"] == "GraphStep"
    a, b = step_losses(graph.run_dir), step_losses(eager.run_dir)
    assert list(a) == list(b) == [5, 10, 15, 20]
    assert list(a.values()) == pytest.approx(list(b.values()), rel=TOLERANCE["fp32"])
    wa, wb = load_file(graph.run_dir / "model/model.safetensors"), load_file(eager.run_dir / "model/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-3, atol=1e-4) for k in wa)


def test_resume_with_cuda_graphs_continues_the_trajectory(tmp_path):
    """A resumed run warms up with eager steps again before it captures: within graph-vs-eager tolerance."""
    common = ["train.max_steps=40", "log.every_steps=10", "checkpoint.every_steps=20", "checkpoint.keep=5",
              "log.wandb=disabled", "train.precision=bf16", "train.deterministic=true",
              f"output_dir={tmp_path}"]  # fmt: skip
    full = train(load_config(DEBUG, [*common, "run_name=full"]))
    cut = tmp_path / "cut"
    shutil.copytree(full.run_dir, cut)
    for ckpt in (cut / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > 20:
            shutil.rmtree(ckpt)
    shutil.rmtree(cut / "model")
    resumed = train(load_config(DEBUG, [*common, "run_name=cut", "resume=auto"]))
    assert resumed.steps == full.steps == 40
    a, b = step_losses(cut), step_losses(full.run_dir)
    assert list(a) == list(b) and list(a.values()) == pytest.approx(list(b.values()), rel=TOLERANCE["bf16"])


@pytest.mark.parametrize("world", [1, 2])
def test_resident_digits_on_the_device_are_the_hosts_global_batches(world):
    on_host = RankStream(DataConfig(), 0, 1, seed=0)
    on_gpu = [RankStream(DataConfig(), r, world, seed=0, device=torch.device("cuda")) for r in range(world)]
    assert all(s.resident and s.table.pixels.is_cuda for s in on_gpu)
    for epoch in (1, 2):
        ranks = [s.epoch(epoch, on_host.local_steps) for s in on_gpu]
        for whole, *shares in zip(on_host.epoch(epoch, on_host.local_steps), *ranks, strict=True):
            assert torch.equal(torch.cat([x.pixels.cpu() for x in shares]), whole.pixels)
            assert torch.equal(torch.cat([x.ids for x in shares]), whole.ids)


def test_auto_picks_bf16_on_a_gpu_that_has_it(tmp_path):
    run = train(load_config(DEBUG, ["train.max_steps=5", "log.every_steps=5", "log.wandb=offline",
                                    f"output_dir={tmp_path}", "run_name=auto"]))  # fmt: skip
    config = read_run(run.run_dir).config
    want = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    assert config["precision"] == want and config["step_mode"] == "GraphStep"


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepspeed_zero_trains_in_half_precision(tmp_path, stage, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no bf16")
    launcher = ["--config_file", "launch/deepspeed.yaml", "--zero_stage", str(stage), "--num_processes", "1"]
    run = launch(tmp_path, f"zero{stage}-{precision}", launcher, ["train.epochs=2", f"train.precision={precision}"])
    config = run.wandb_config()
    assert (config["zero_stage"], config["precision"]) == (stage, precision)
    assert config["compute_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[precision]
    losses = [e["train/loss"] for e in run.epochs()]
    assert len(losses) == 2 and losses[1] < losses[0]
