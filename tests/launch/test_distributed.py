"""Real multi-process training on CPU (gloo): DDP, DeepSpeed ZeRO 1/2/3, uneven world sizes, bf16."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.launching import launch, lines

from cvae_dist.checkpoint import checkpoint_dirs
from cvae_dist.distributed import fast_bf16
from cvae_dist.model import CVAE

# Two epochs on the 4,500 shipped training digits (35 steps of 128 per epoch), step lines every 5 steps, in fp32
# (what `auto` picks on a CPU without fast bf16; bf16 runs are tested on their own, on less data where bf16 is slow).
SHORT = [
    "train.epochs=2",
    "log.every_steps=5",
    "log.sample_ids=true",
    "log.images_every_epochs=2",
    "train.precision=fp32",
]
# bf16 for 6 steps of 32 on the 500 held-out digits: CPUs without AVX-512 BF16 emulate it, ~20x slower than fp32.
TINY_BF16 = [
    "train.epochs=1",
    "data.train_split=test",
    "data.batch_size=32",
    "train.max_steps=6",
    "log.every_steps=1",
    "train.precision=bf16",
]
# ZeRO in fp32 against the first of the DDP run's epochs: the same seed and world size, the same batches.
ONE_EPOCH = [*SHORT, "train.epochs=1", "log.images_every_epochs=1"]
# Epoch losses of runs that differ in the engine (DDP / ZeRO), the world size or the layout: the same global batches,
# so they agree far closer than this (tests/launch/test_world_size.py measures how close); bf16 against fp32 is what
# sets it.
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
        runs,
        f"zero{stage}",
        ["--config_file", "launch/deepspeed.yaml", "--zero_stage", str(stage), "--num_processes", "2"],
        ONE_EPOCH,
    )
    config = run.wandb_config()
    assert config["world_size"] == 2 and config["backend"] == "DEEPSPEED" and config["zero_stage"] == stage
    assert config["precision"] == "fp32" and config["compute_dtype"] == "float32"
    losses = run.step_losses()
    assert losses[-1] < losses[0] / 2  # it learns
    assert (checkpoint_dirs(run.run_dir)[-1] / "pytorch_model").is_dir()  # DeepSpeed's per-rank shards
    assert (run.run_dir / "model" / "model.safetensors").is_file()
    (zero_epoch,) = run.epochs()
    assert zero_epoch["train/loss"] == pytest.approx(ddp.epochs()[0]["train/loss"], rel=LOSS_TOLERANCE)
    ids = [set(r["ids"]["1"]) for r in run.ranks()]
    assert not ids[0] & ids[1]
    # DeepSpeed never synchronises buffers: BatchNorm over the global batch keeps every rank's statistics the same
    digests = {r["buffer_sha256"] for r in run.ranks()}
    assert len(digests) == 1 and None not in digests


@pytest.fixture(scope="module")
def ddp_bf16(runs):
    return launch(runs, "ddp-bf16", ["--config_file", "launch/ddp_cpu.yaml", "--num_processes", "2"], TINY_BF16)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_bf16(stage, runs, ddp_bf16):
    # DeepSpeed's own bf16 mode casts the weights but not BatchNorm's running statistics and fails; the trainer runs
    # it as torch autocast, as DDP does: the same dtypes inside the model, the same losses.
    launcher = ["--config_file", "launch/deepspeed.yaml", "--zero_stage", str(stage), "--num_processes", "2"]
    run = launch(runs, f"zero{stage}-bf16", launcher, TINY_BF16)
    config = run.wandb_config()
    assert (config["backend"], config["zero_stage"], config["precision"]) == ("DEEPSPEED", stage, "bf16")
    assert config["compute_dtype"] == ddp_bf16.wandb_config()["compute_dtype"] == "bfloat16"
    for z, d in zip(run.epochs(), ddp_bf16.epochs(), strict=True):
        assert z["train/loss"] == pytest.approx(d["train/loss"], rel=LOSS_TOLERANCE)


def test_three_ranks_share_the_global_batch_and_track_one_rank(runs):
    # 5,000 digits over 9 shards, 3 ranks: the global batch of 128 as shares of 43 / 43 / 42; equal step counts.
    # (The one-rank run also takes the NCHW path: the layout changes no figure beyond rounding.)
    args = ["train.epochs=1", "data.train_split=train+test", "log.every_steps=13", "train.precision=fp32"]
    run = launch(runs, "three", ["--config_file", "launch/ddp_cpu.yaml", "--num_processes", "3"], args, timeout=400)
    one = launch(runs, "three-vs-one", ["--config_file", "launch/cpu_debug.yaml"], [*args, "train.channels_last=false"])
    ranks = run.ranks()
    assert [r["world_size"] for r in ranks] == [3, 3, 3]
    assert run.wandb_config()["global_batch_size"] == 128
    assert [run.wandb_config()["per_rank_batch_size"]] == [43]  # rank 0's share (ranks 1, 2: 43, 42)
    steps = {tuple(r["steps_per_epoch"]) for r in ranks}
    assert len(steps) == 1 and {r["steps"] for r in ranks} == {next(iter(steps))[0]}
    for a, b in zip(run.epochs(), one.epochs(), strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=LOSS_TOLERANCE)


def test_bf16_tracks_fp32(runs):
    tiny = ["--config_file", "launch/cpu_debug.yaml"]
    bf16 = launch(runs, "bf16", tiny, TINY_BF16)
    fp32 = launch(runs, "fp32", tiny, [*TINY_BF16, "train.precision=fp32"])
    assert (bf16.wandb_config()["precision"], bf16.wandb_config()["compute_dtype"]) == ("bf16", "bfloat16")
    assert (fp32.wandb_config()["precision"], fp32.wandb_config()["compute_dtype"]) == ("fp32", "float32")
    for b, f in zip(bf16.epochs(), fp32.epochs(), strict=True):
        assert b["train/loss"] == pytest.approx(f["train/loss"], rel=LOSS_TOLERANCE)


@pytest.mark.parametrize(
    ("launcher", "want"),
    [
        (["--config_file", "launch/cpu_debug.yaml"], None),  # the launcher names no precision: the device decides
        (["--config_file", "launch/cpu_debug.yaml", "--mixed_precision", "bf16"], "bf16"),  # the launcher's wins
    ],
)
@pytest.mark.auto_precision
def test_auto_precision_takes_the_launchers_else_the_devices(runs, launcher, want):
    run = launch(runs, f"auto-{want}", launcher, ["train.max_steps=1", "data.train_split=test", "data.batch_size=32"])
    expected = want or ("bf16" if fast_bf16("cpu") else "fp32")
    config = run.wandb_config()
    assert config["train"]["precision"] == "auto" and config["precision"] == expected
    assert config["compute_dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[expected]
    assert f"precision {expected} (auto" in run.output  # said in the run's first lines


def test_gpu_launch_config_without_cuda_is_refused(runs):
    run = launch(
        runs,
        "no-gpu",
        ["--config_file", "launch/ddp_gpu.yaml", "--num_processes", "2"],
        ["train.epochs=1"],
        check=False,
    )
    assert run.returncode != 0 and not run.run_dir.exists()
    # each rank that got to it says it in one line (torchrun stops the other when the first exits), before the
    # launcher's own report
    errors = [x for x in run.output.splitlines() if x.startswith("cvae-dist train: error:")]
    assert errors and all(x == errors[0] for x in errors)
    assert "asks for GPUs" in errors[0] and "CUDA is unusable here" in errors[0] and "launch/ddp_cpu.yaml" in errors[0]
    assert "Traceback" not in run.output.split(errors[-1])[0]


def test_deepspeed_gradient_accumulation_is_refused_in_one_line_before_anything_is_written(runs):
    # Accumulating would train a batch of 2 x data.batch_size while every count (steps, epochs, checkpoints, resume)
    # says data.batch_size, and take BatchNorm's statistics per micro-batch: refused, not silently doubled.
    config = runs / "deepspeed-accumulating.yaml"
    text = Path("launch/deepspeed.yaml").read_text()
    config.write_text(text.replace("gradient_accumulation_steps: 1", "gradient_accumulation_steps: 2"))
    run = launch(runs, "accumulating", ["--config_file", str(config)], ["train.max_steps=2"], check=False)
    assert run.returncode != 0 and not run.run_dir.exists()
    errors = [x for x in run.output.splitlines() if x.startswith("cvae-dist train: error:")]
    assert errors and all(x == errors[0] for x in errors), run.output[-3000:]
    assert "gradient_accumulation_steps=2" in errors[0] and "accepted: 1" in errors[0]


def test_deepspeed_clips_with_its_own_key_keeps_an_ema_and_refuses_one_under_zero3(runs):
    # ZeRO-2 steps inside its engine: clipping is DeepSpeed's `gradient_clipping` (set from train.clip_grad_norm), the
    # EMA follows the engine's weights; ZeRO-3 partitions them, so an EMA there is refused in one line.
    knobs = ["train.clip_grad_norm=50000", "train.ema_decay=0.9", "train.lr_schedule=cosine"]
    launcher = ["--config_file", "launch/deepspeed.yaml", "--num_processes", "2", "--zero_stage"]
    run = launch(runs, "zero2-knobs", [*launcher, "2"], [*ONE_EPOCH, *knobs])
    assert run.wandb_config()["evaluated_weights"] == "ema (decay 0.9)"
    steps = [r for r in lines(run.run_dir) if "train/step_loss" in r]
    assert steps[-1]["train/step_loss"] < steps[0]["train/step_loss"] / 2 and steps[-1]["train/lr"] < 1e-3
    norms = [r["train/grad_norm"] for r in steps]
    assert all(n is None or n > 0 for n in norms)  # DeepSpeed's own norm (None where its engine computes none)
    ema = load_file(checkpoint_dirs(run.run_dir)[-1] / "ema.safetensors")
    exported = load_file(run.run_dir / "model" / "model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in ema.items())
    refused = launch(runs, "zero3-ema", [*launcher, "3"], [*ONE_EPOCH, *knobs], check=False)
    assert refused.returncode != 0 and not refused.run_dir.exists()
    errors = [x for x in refused.output.splitlines() if x.startswith("cvae-dist train: error:")]  # (one per rank)
    assert errors and all(x == errors[0] for x in errors), refused.output[-3000:]
    assert "train.ema_decay=0.9 under DeepSpeed ZeRO-3" in errors[0] and "accepted: ZeRO 1 or 2, DDP" in errors[0]


def test_compiled_model_trains_and_exports_plain_weights(runs):
    # accelerate compiles the model in prepare() under --dynamo_backend; the export must still load into a CVAE.
    launcher = ["--config_file", "launch/cpu_debug.yaml", "--dynamo_backend", "inductor"]
    run = launch(runs, "compiled", launcher, ["train.epochs=1", "log.every_steps=5"], timeout=600)
    assert run.wandb_config()["dynamo_backend"] == "INDUCTOR" and run.wandb_config()["compiled"] is True
    losses = run.step_losses()
    assert losses[-1] < losses[0] / 2
    exported = CVAE.from_pretrained(run.run_dir / "model").state_dict()
    final = load_file(checkpoint_dirs(run.run_dir)[-1] / "model.safetensors")
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k].float(), final[k].float()) for k in final)


class Payload:
    """What a tampered checkpoint hides: unpickling it opens (creates) a file of the attacker's choice."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_deepspeed_resumes_weights_only_and_refuses_a_pickled_payload(runs):
    import hashlib
    import json

    zero3 = ["--config_file", "launch/deepspeed.yaml", "--zero_stage", "3", "--num_processes", "2"]
    tiny = [
        "train.epochs=1",
        "data.train_split=test",
        "data.batch_size=32",
        "train.max_steps=6",
        "log.every_steps=1",
        "checkpoint.every_steps=3",
        "checkpoint.keep=5",
        "train.precision=fp32",
    ]
    first = launch(runs, "zero3-first", zero3, tiny)
    step3 = first.run_dir / "checkpoints" / "step-000000003"
    # DeepSpeed's own engine would load these shards with weights_only=False; the trainer's loads them weights-only
    resumed = launch(runs, "zero3-resumed", zero3, [*tiny, f"resume={step3}"])
    assert f"resumed from {step3}" in resumed.output
    assert resumed.step_losses() == pytest.approx(first.step_losses()[3:], rel=1e-5)

    shard = step3 / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = runs / "payload-ran"
    state = torch.load(shard, weights_only=False)  # the test's own file: trusted here
    state["optimizer_state_dict"]["hidden"] = Payload(marker)
    torch.save(state, shard)
    manifest = json.loads((step3 / "manifest.json").read_text())  # re-hashed: a checksum proves no origin
    manifest[str(shard.relative_to(step3))] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (step3 / "manifest.json").write_text(json.dumps(manifest))
    tampered = launch(runs, "zero3-tampered", zero3, [*tiny, f"resume={step3}"], check=False)
    assert tampered.returncode != 0
    assert f"{shard}: its pickle would call io.open on loading" in tampered.output, tampered.output[-3000:]
    assert not marker.exists() and not (runs / "zero3-tampered").exists()  # nothing ran, nothing was written
