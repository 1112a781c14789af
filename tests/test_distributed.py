"""Real multi-process training on CPU (gloo): DDP, DeepSpeed ZeRO 1/2/3, uneven world sizes, bf16."""

import pytest
import torch
from safetensors.torch import load_file

from cvae_dist.checkpoint import checkpoint_dirs, load_exported
from launch import REPO, launch

pytestmark = pytest.mark.multiprocess

# Two epochs on the 4,500 shipped training digits (35 steps of 128 per epoch), step lines every 5 steps.
SHORT = ["train.epochs=2", "log.every_steps=5", "log.sample_ids=true", "log.images_every_epochs=2"]
# Runs that differ in world size see different batches (each rank reads its own shards) and BatchNorm
# statistics over 64 instead of 128 images, so their losses agree statistically, not bit for bit.
LOSS_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def single(runs):
    return launch(runs, "single", ["--config_file", "launch/cpu_debug.yaml"], SHORT)


@pytest.fixture(scope="module")
def ddp(runs):
    return launch(runs, "ddp", ["--config_file", "launch/ddp_cpu.yaml", "--num_processes", "2"], SHORT)


def test_ddp_world_size_and_disjoint_shards(ddp):
    assert ddp.wandb_config()["world_size"] == 2
    ranks = ddp.ranks()
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    for epoch in ("1", "2"):
        ids = [set(r["ids"][epoch]) for r in ranks]
        assert len(ids[0]) == len(ids[1]) == 35 * 64
        assert not ids[0] & ids[1]  # disjoint
        assert len(ids[0] | ids[1]) == 35 * 128  # together: the epoch's examples
    assert ranks[0]["ids"]["1"] != ranks[0]["ids"]["2"]  # reshuffled each epoch


def test_ddp_ranks_end_with_identical_parameters(ddp):
    digests = {r["param_sha256"] for r in ddp.ranks()}
    assert len(digests) == 1 and None not in digests


def test_ddp_loss_matches_single_process(ddp, single):
    assert single.wandb_config()["world_size"] == 1
    for d, s in zip(ddp.epochs(), single.epochs(), strict=True):
        assert d["train/loss"] == pytest.approx(s["train/loss"], rel=LOSS_TOLERANCE)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero(stage, runs, ddp):
    run = launch(
        runs, f"zero{stage}", ["--config_file", f"launch/deepspeed_zero{stage}.yaml", "--num_processes", "2"], SHORT
    )
    config = run.wandb_config()
    assert config["world_size"] == 2 and config["backend"] == "DEEPSPEED"
    losses = run.step_losses()
    assert losses[-1] < losses[0] / 2  # it learns
    assert (checkpoint_dirs(run.run_dir)[-1] / "pytorch_model").is_dir()  # DeepSpeed's per-rank shards
    assert (run.run_dir / "model" / "model.safetensors").is_file()
    for d, z in zip(ddp.epochs(), run.epochs(), strict=True):
        assert z["train/loss"] == pytest.approx(d["train/loss"], rel=LOSS_TOLERANCE)
    ids = [set(r["ids"]["1"]) for r in run.ranks()]
    assert not ids[0] & ids[1]


def test_three_ranks_on_5000_digits_run_equal_steps(runs):
    # 5,000 digits over 9 shards: ranks hold 1,688 / 1,687 / 1,625 rows; 42 per rank per step.
    run = launch(
        runs,
        "three",
        ["--config_file", "launch/ddp_cpu.yaml", "--num_processes", "3"],
        ["train.epochs=2", "data.train_split=train+test", "data.per_rank_batch_size=42", "log.every_steps=20"],
        timeout=400,
    )
    ranks = run.ranks()
    assert len(ranks) == 3
    assert {tuple(r["steps_per_epoch"]) for r in ranks} == {(38, 38)}  # 1,625 // 42 everywhere
    assert {r["steps"] for r in ranks} == {76}
    assert [e["epoch"] for e in run.epochs()] == [1, 2]


def test_bf16_tracks_fp32(runs, single):
    run = launch(runs, "bf16", ["--config_file", "launch/cpu_debug.yaml"], [*SHORT, "train.precision=bf16"])
    assert run.wandb_config()["train"]["precision"] == "bf16"
    for b, f in zip(run.epochs(), single.epochs(), strict=True):
        assert b["train/loss"] == pytest.approx(f["train/loss"], rel=LOSS_TOLERANCE)


def test_cpu_launcher_that_would_start_one_process_is_refused(runs):
    run = launch(runs, "refused", ["--cpu", "--num_processes", "2"], ["train.epochs=1"], check=False)
    assert run.returncode != 0
    assert "asked for several processes but started one" in run.output
    assert not run.run_dir.exists()


def test_launch_configs_parse_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.name: load_config_from_file(str(p)) for p in sorted((REPO / "launch").glob("*.yaml"))}
    assert len(configs) >= 8
    assert configs["gpu_compile.yaml"].dynamo_config == {"dynamo_backend": "INDUCTOR"}
    assert {configs[f"deepspeed_zero{s}.yaml"].deepspeed_config["zero_stage"] for s in (1, 2, 3)} == {1, 2, 3}


def test_compiled_model_trains_and_exports_plain_weights(runs):
    # accelerate compiles the model in prepare() under --dynamo_backend; the export must still load into a CVAE.
    launcher = ["--config_file", "launch/cpu_debug.yaml", "--dynamo_backend", "inductor"]
    run = launch(runs, "compiled", launcher, ["train.epochs=1", "log.every_steps=5"], timeout=600)
    assert run.wandb_config()["dynamo_backend"] == "INDUCTOR"
    losses = run.step_losses()
    assert losses[-1] < losses[0] / 2
    exported = load_exported(run.run_dir / "model").state_dict()
    final = load_file(checkpoint_dirs(run.run_dir)[-1] / "model.safetensors")
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k].float(), final[k].float()) for k in final)
