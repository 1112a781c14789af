"""eval / sample / reconstruct / interpolate / export on a tiny real training run (inference.py)."""

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from support.checks import copy_of, one_line, read_only, run_cli, snapshot
from support.launching import REPO, free_port

from cvae_dist import inference
from cvae_dist.cli import main
from cvae_dist.config import ConfigError, ModelConfig, load_config
from cvae_dist.data import load_split
from cvae_dist.images import grid, recon_sample_grid
from cvae_dist.model import CVAE

SIDE = 64  # the debug recipe's image size


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from cvae_dist.train import train

    out = tmp_path_factory.mktemp("runs")
    # fp32 stated: the tests below compare against plain fp32 loops (`auto` may pick bf16 on this CPU)
    overrides = [
        "train.epochs=1",
        "data.train_split=test",
        f"output_dir={out}",
        "run_name=tiny",
        "log.wandb=disabled",
        "train.precision=fp32",
    ]
    run_dir = train(load_config(REPO / "configs" / "debug.yaml", overrides)).run_dir
    assert not (run_dir / "wandb").exists()  # log.wandb=disabled writes no W&B run at all
    return run_dir


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


HELDOUT = REPO / "cvae_dist" / "assets" / "mnist5k" / "test-00000-of-00001.parquet"  # the debug recipe's eval split


def heldout_digits() -> tuple[torch.Tensor, list[int]]:
    """The 500 held-out digits read straight from the shipped parquet file (PNG bytes decoded by PIL), file order."""
    rows = pq.read_table(HELDOUT).to_pylist()
    pixels = [torch.from_numpy(np.array(Image.open(io.BytesIO(r["image"]["bytes"])).convert("L"))) for r in rows]
    return torch.stack(pixels)[:, None], [r["label"] for r in rows]


def as_the_model_sees(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 28x28 -> [0, 1], bilinear to 64x64, in the run's memory format (channels_last, the debug recipe's)."""
    x = F.interpolate(pixels.float() / 255, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


def exported_model(run: Path) -> CVAE:
    """The run's export as a user loads it, in the memory format the run trained in."""
    return CVAE.from_pretrained(run / "model").to(memory_format=torch.channels_last)


def as_png_pixels(images: torch.Tensor) -> np.ndarray:
    """One [0, 1] image (1, H, W) as 8-bit PNG pixels: round half up, as torchvision's save_image writes them."""
    return images.float().mul(255).add(0.5).clamp(0, 255).to(torch.uint8)[0].numpy()


def trainer_weights(run: Path) -> Path:
    """The weights as accelerate saved the trained model (not the export)."""
    return sorted((run / "checkpoints").glob("*/model.safetensors"))[-1]


def test_eval_cli_reproduces_the_trainers_held_out_figures(run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--run", str(run), "--json", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and "per batch of 128" in line and "500 images" in line
    r = json.loads(out.read_text())
    assert r["images"] == 500 and r["processes"] == 1 and r["split"] == "test"
    for key in ("loss_per_image", "recon_per_image", "kl_per_image", "loss_per_batch"):
        assert math.isfinite(r[key]) and r[key] > 0
    # A plain loop of our own: the export, the 500 held-out digits in batches of 128 (the last one 116), the noise
    # seeded with the run's seed in a forked RNG, sum of squared errors and KL summed by hand in float64.
    model, seed = exported_model(run), load_config(run / "config.yaml").train.seed
    pixels, _ = heldout_digits()
    sse = kl = 0.0
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, 500, 128):
            x = as_the_model_sees(pixels[start : start + 128])
            reconstruction, mu, log_var = (t.double() for t in model(x))
            sse += (reconstruction - x.double()).square().sum().item()
            kl += (0.5 * (mu.square() + log_var.exp() - 1 - log_var)).sum().item()
    assert r["recon_per_image"] == pytest.approx(sse / 500, rel=1e-5)
    assert r["kl_per_image"] == pytest.approx(kl / 500, rel=1e-5)
    assert r["loss_per_image"] == pytest.approx((sse + kl) / 500, rel=1e-5)
    assert r["loss_per_batch"] == pytest.approx(128 * (sse + kl) / 500, rel=1e-5)
    # the same weights, noise and batches as the trainer's end-of-epoch evaluation
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval/loss" in x][-1]
    assert r["loss_per_image"] == pytest.approx(last["eval/loss_per_image"], rel=1e-5)
    assert r["kl_per_image"] == pytest.approx(last["eval/kl_per_image"], rel=1e-4)


def test_eval_is_deterministic_and_seeded(run):
    loaded = inference.load_model(run=run)
    a, b = inference.evaluate(loaded), inference.evaluate(loaded)
    other = inference.evaluate(loaded, seed=1)
    assert a == b
    assert other["recon_per_image"] != a["recon_per_image"] and other["kl_per_image"] == a["kl_per_image"]


def test_sample_png_size_and_byte_identical_for_a_seed(run, tmp_path):
    paths = [tmp_path / f"s{i}.png" for i in range(3)]
    for path, seed in zip(paths, [0, 0, 1], strict=True):
        assert main(["sample", "--run", str(run), "--n", "64", "--seed", str(seed), "--out", str(path)]) == 0
    assert Image.open(paths[0]).size == (8 * SIDE, 8 * SIDE)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()
    assert main(["sample", "--run", str(run), "--n", "10", "--columns", "5", "--out", str(paths[2]), "--force"]) == 0
    assert Image.open(paths[2]).size == (5 * SIDE, 2 * SIDE)


def test_reconstruct_png(run, tmp_path):
    out = tmp_path / "recon.png"
    assert main(["reconstruct", "--run", str(run), "--n", "32", "--out", str(out)]) == 0
    img = png(out)
    assert img.shape == (4 * SIDE, (8 + 1 + 8) * SIDE)  # originals | blank column | reconstructions
    assert img[:, 8 * SIDE : 9 * SIDE].max() == 0
    # the left half is the first 32 held-out digits as the model sees them
    x, _ = inference.reconstruct(inference.load_model(run=run), load_split("shipped", "test")[0][:32])
    left = grid(x, 8).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)[0].numpy()
    assert np.array_equal(img[:, : 8 * SIDE], left)


def test_interpolate_png(run, tmp_path):
    out = tmp_path / "interp.png"
    assert main(["interpolate", "--run", str(run), "--pairs", "3", "--steps", "5", "--out", str(out)]) == 0
    img = png(out)
    assert img.shape == (3 * SIDE, (5 + 2) * SIDE)  # one row per pair: digit, 5 decodes, digit
    pixels, labels = heldout_digits()
    first = {}  # the first held-out digit of each class, by a plain scan
    for i, label in enumerate(labels):
        first.setdefault(label, i)
    a, b = [first[0], first[2], first[4]], [first[1], first[3], first[5]]
    assert inference.pair_indices(torch.tensor(labels), 3) == (a, b)  # pair i joins classes 2i and 2i+1

    def tile(row: int, column: int) -> np.ndarray:
        return img[row * SIDE : (row + 1) * SIDE, column * SIDE : (column + 1) * SIDE]

    model = exported_model(run)
    with torch.no_grad():
        for row, (i, j) in enumerate(zip(a, b, strict=True)):
            x_a, x_b = as_the_model_sees(pixels[[i]]), as_the_model_sees(pixels[[j]])
            assert np.array_equal(tile(row, 0), as_png_pixels(x_a[0]))  # the ends: the digits, resized
            assert np.array_equal(tile(row, 6), as_png_pixels(x_b[0]))
            # the walk's ends (t = 0 and t = 1) are the decodes of the two digits' mu
            assert np.array_equal(tile(row, 1), as_png_pixels(model(z=model(x_a).mu)[0]))
            assert np.array_equal(tile(row, 5), as_png_pixels(model(z=model(x_b).mu)[0]))
            assert not np.array_equal(tile(row, 1), tile(row, 5))  # two different digits: the walk goes somewhere


def test_latent_grid_needs_two_latent_dims(run, tmp_path, capsys):
    assert main(["sample", "--run", str(run), "--latent-grid", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.latent_dim=8" in err and "2-D" in err
    # a 2-D model decodes the [-3, 3]^2 grid
    small = tmp_path / "small"
    CVAE(ModelConfig(latent_dim=2, filters=8, image_size=16)).save_pretrained(small)
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(small), "--latent-grid", "5", "--out", str(out)]) == 0
    assert png(out).shape == (5 * 16, 5 * 16)


def test_export_round_trip_is_bit_exact(run, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    assert {"model.safetensors", "config.json"} <= {p.name for p in out.iterdir()}
    assert json.loads(out.joinpath("config.json").read_text()) == json.loads((run / "model/config.json").read_text())

    cfg = load_config(run / "config.yaml")
    trained = CVAE(cfg.model)
    trained.load_state_dict(load_file(str(trainer_weights(run))))
    models = [trained.eval(), CVAE.from_pretrained(out), CVAE.from_pretrained(run / "model")]
    x = torch.rand(16, 1, SIDE, SIDE)
    outputs = []
    for model in models:
        torch.manual_seed(0)
        outputs.append(model(x))
    for o in outputs[1:]:
        for got, want in zip(o, outputs[0], strict=True):
            assert torch.equal(got, want)
    # ... in the trainer's memory format too
    cl = torch.channels_last
    xc = x.contiguous(memory_format=cl)
    recon = []
    for model in models[:2]:
        torch.manual_seed(0)
        recon.append(model.to(memory_format=cl)(xc).reconstruction)
    assert torch.equal(*recon)


def test_export_redraws_the_trainers_figure(run):
    """Reconstructions and prior samples from the loaded export give the trainer's PNG, pixel for pixel."""
    cfg = load_config(run / "config.yaml")
    loaded = inference.load_model(run=run)
    pixels, _ = load_split(cfg.data.source, cfg.data.eval_split)
    _, recon = inference.reconstruct(loaded, pixels[:128])
    samples = inference.sample(loaded, 128, seed=cfg.train.seed)
    figure = recon_sample_grid(recon, samples).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)[0].numpy()
    trainer_png = png(sorted((run / "images").glob("epoch_*.png"))[-1])
    assert figure.shape == trainer_png.shape
    assert np.array_equal(figure, trainer_png)  # same weights, memory format, noise and draws: same pixels


def test_checkpoint_sources_agree(run, tmp_path):
    """--run, --checkpoint <export dir>, <checkpoint dir> and <.safetensors file> load the same model."""
    loaded = [
        inference.load_model(run=run),
        inference.load_model(checkpoint=run / "model"),
        inference.load_model(checkpoint=trainer_weights(run).parent),
        inference.load_model(checkpoint=trainer_weights(run)),
    ]
    bare = tmp_path / "bare"  # weights alone: the shape is read off them
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((run / "model" / "model.safetensors").read_bytes())
    loaded.append(inference.load_model(checkpoint=bare))
    reference = loaded[0].model.state_dict()
    for item in loaded[1:]:
        assert item.cfg.model == loaded[0].cfg.model
        for k, v in item.model.state_dict().items():
            assert torch.equal(v.float(), reference[k].float()), k


def test_shape_mismatch_is_one_clear_line(run, tmp_path, capsys):
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  filters: 32\n")
    ckpt = str(trainer_weights(run).parent)
    assert main(["eval", "--checkpoint", ckpt, "--config", str(wrong)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model.filters=64" in err and "says model.filters=32" in err and "accepted" in err

    edited = tmp_path / "edited"  # an export whose config.json lies about the weights
    edited.mkdir()
    (edited / "model.safetensors").write_bytes((run / "model" / "model.safetensors").read_bytes())
    (edited / "config.json").write_text(json.dumps({"latent_dim": 4, "filters": 64, "image_size": 64}))
    with pytest.raises(ConfigError, match=r"holds a model with model.latent_dim=8 .* says model.latent_dim=4"):
        inference.load_model(checkpoint=edited)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--run", "{tmp}/nope"], "run directory .*nope not found"),
        (["--checkpoint", "{tmp}/nope"], "checkpoint .*nope not found"),
        (["--checkpoint", "{tmp}/empty"], "empty holds no model.safetensors .*accepted"),
        (["--run", "{tmp}/empty"], "has no config.yaml"),
        (["--checkpoint", "{tmp}/junk.safetensors"], "not the weights of a cvae-dist CVAE"),
    ],
)
def test_missing_or_wrong_weights_are_one_line(tmp_path, capsys, args, expected):
    (tmp_path / "empty").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "junk.safetensors"))
    argv = ["eval", *(a.format(tmp=tmp_path) for a in args)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cvae-dist eval: error:")
    assert re.search(expected, err), err


def test_run_without_weights(tmp_path, run):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="has no weights"):
        inference.load_model(run=broken)


def test_export_refuses_a_non_empty_directory(run, tmp_path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        inference.export(inference.load_model(run=run), tmp_path)


def test_export_push_to_hub_without_a_hub_keeps_the_local_export(run, tmp_path):
    """The hub unreachable (HF_ENDPOINT on a closed local port): one line that says the export was written and how to
    upload it later; the export itself is complete and loads."""
    out, repo_id = tmp_path / "pushed", "someone/cvae"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_TOKEN": "hf_" + "x" * 34}  # a token: reach the net
    cvae_dist = str(Path(sys.executable).parent / "cvae-dist")
    cmd = [cvae_dist, "export", "--run", str(run), "--out", str(out), "--push-to-hub", repo_id]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cvae-dist export: error: "), err
    assert f"wrote {out}, but pushing it to the hub as '{repo_id}' failed" in err
    assert f"hf upload {repo_id} {out}" in err and "hf auth login" in err
    assert "exported" not in proc.stdout  # no success line
    assert {"model.safetensors", "config.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text()) == json.loads((run / "model" / "config.json").read_text())
    want = load_file(str(run / "model" / "model.safetensors"))
    got = CVAE.from_pretrained(out).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--n", "100000"],
        ["sample", "--latent-grid", "100"],
        ["reconstruct", "--n", "5000"],
        ["interpolate", "--pairs", "1000"],
    ],
    ids=["sample", "latent-grid", "reconstruct", "interpolate"],
)
def test_too_many_images_are_refused_at_once(finished, tmp_path, capsys, argv):
    # A typo of a few zeros: refused in one line before anything is decoded (it took 46 s and 21.8 GB, then died).
    started = time.monotonic()
    code, err = run_cli(capsys, [*argv, "--run", finished, "--out", tmp_path / "x.png"])
    assert code == 2 and time.monotonic() - started < 5
    one_line(err, "at most 4,096")
    assert not list(tmp_path.iterdir())


def test_a_run_without_export_is_sampled_from_its_newest_good_checkpoint(finished, tmp_path, capsys):
    # A run stopped before its export, whose newest checkpoint failed its checksum and was set aside by a resume
    # (`step-N.corrupt`, written last): `sample --run` takes the newest good checkpoint, not the corrupt one.
    run = copy_of(finished, tmp_path)
    shutil.rmtree(run / "model")
    newest = run / "checkpoints" / "step-000000006"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    newest.rename(newest.with_name(newest.name + ".corrupt"))
    code, err = run_cli(capsys, ["sample", "--run", run, "--n", "4", "--out", tmp_path / "samples.png"])
    assert code == 0, err
    assert (tmp_path / "samples.png").is_file()


# ---- where the outputs go: checked before the model loads, never over a file without --force, never over the run's

# How each command is told where to write: its arguments before the path, the path's option and its suffix.
OUTPUTS = {
    "sample": (["sample", "--n", "4"], "--out", ".png"),
    "reconstruct": (["reconstruct", "--n", "4"], "--out", ".png"),
    "interpolate": (["interpolate", "--pairs", "1", "--steps", "2"], "--out", ".png"),
    "eval": (["eval"], "--json", ".json"),
}


def writing(command: str, source: Path, path: Path, *extra: str) -> list:
    """`command` on the run `source` writing to `path`."""
    args, flag, _ = OUTPUTS[command]
    return [*args, "--run", source, flag, path, *extra]


@pytest.fixture
def no_loading(monkeypatch):
    """A refusal must come before the model loads: loading it fails the test."""

    def load_model(*args, **kwargs):
        pytest.fail("the model was loaded before the output or device was checked")

    monkeypatch.setattr(inference, "load_model", load_model)


@pytest.mark.parametrize("command", OUTPUTS)
def test_an_existing_output_is_refused_without_force(finished, tmp_path, capsys, no_loading, command):
    path = tmp_path / f"mine{OUTPUTS[command][2]}"
    path.write_bytes(b"keep me")
    code, err = run_cli(capsys, writing(command, finished, path))
    assert code == 2
    one_line(err, str(path), "already exists", "--force")
    assert path.read_bytes() == b"keep me"


@pytest.mark.parametrize("command", OUTPUTS)
def test_force_replaces_an_existing_output_atomically(finished, tmp_path, capsys, command):
    path = tmp_path / f"MINE{OUTPUTS[command][2].upper()}"  # the suffix in any case
    path.write_bytes(b"replace me")
    code, err = run_cli(capsys, writing(command, finished, path, "--force"))
    assert code == 0, err
    if command == "eval":
        assert json.loads(path.read_text())["images"] == 500
    else:
        assert Image.open(path).format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left beside it


# Files of the run: never replaced, --force or not (config.yaml is also refused for its suffix; the run's JSON and
# PNG files pass that check and meet the run rule). `--checkpoint` inside a run protects the same run.
RUN_FILES = [
    ("sample", "config.yaml", "--run", ".png"),
    ("eval", "config.yaml", "--run", ".json"),
    ("eval", "status.json", "--run", "never replaced"),
    ("sample", "images/epoch_002.png", "--run", "never replaced"),
    ("eval", "checkpoints/step-000000006/trainer_state.json", "--run", "never replaced"),
    ("eval", "status.json", "--checkpoint", "never replaced"),
]


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
@pytest.mark.parametrize(("command", "target", "source", "said"), RUN_FILES)
def test_a_file_of_the_run_is_never_replaced(finished, tmp_path, capsys, command, target, source, said, force):
    run = copy_of(finished, tmp_path)
    assert (run / target).is_file()
    before = snapshot(run)
    args, flag, _ = OUTPUTS[command]
    where = run if source == "--run" else run / "model"
    code, err = run_cli(capsys, [*args, source, where, flag, run / target, *force])
    assert code == 2
    one_line(err, str(run / target), said)
    assert snapshot(run) == before


def bad_paths(tmp_path: Path, suffix: str) -> dict[str, tuple[Path, str]]:
    """Output paths that are refused, each with what the message says."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / f"a-dir{suffix}").mkdir()
    (tmp_path / "read-only").mkdir()
    wrong = ".jpg" if suffix == ".png" else ".txt"
    return {
        "suffix": (tmp_path / f"out{wrong}", f"must end in {suffix}"),
        "missing-parent": (tmp_path / "nope" / f"out{suffix}", f"{tmp_path / 'nope'} does not exist"),
        "parent-is-a-file": (tmp_path / "a-file" / f"out{suffix}", f"{tmp_path / 'a-file'} is a file"),
        "is-a-directory": (tmp_path / f"a-dir{suffix}", "is a directory"),
        "read-only-parent": (tmp_path / "read-only" / f"out{suffix}", f"{tmp_path / 'read-only'} is not writable"),
    }


@pytest.mark.parametrize("case", ["suffix", "missing-parent", "parent-is-a-file", "is-a-directory", "read-only-parent"])
@pytest.mark.parametrize("command", OUTPUTS)
def test_a_bad_output_path_is_refused_before_loading(finished, tmp_path, capsys, no_loading, command, case):
    path, said = bad_paths(tmp_path, OUTPUTS[command][2])[case]
    before = snapshot(tmp_path)
    with read_only(tmp_path / "read-only"):
        code, err = run_cli(capsys, writing(command, finished, path, "--force"))
    assert code == 2
    one_line(err, said)
    assert snapshot(tmp_path) == before


DEVICES = [
    "banana",
    "cuda:99",
    pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is usable here")),
    pytest.param("mps", marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is usable here")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("command", ["sample", "reconstruct", "interpolate"])
def test_a_bad_device_is_refused_before_loading(finished, tmp_path, capsys, no_loading, command, device):
    code, err = run_cli(capsys, writing(command, finished, tmp_path / "out.png", "--device", device))
    assert code == 2
    one_line(err, f"--device {device}", "accepted: cpu")
    assert not list(tmp_path.iterdir())


def test_cuda_devices_are_accepted_below_the_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a machine with 2 GPUs, wherever this runs
    for name in ("cpu", "cuda", "cuda:0", "cuda:1"):
        assert inference.check_device(name) == torch.device(name)
    with pytest.raises(ConfigError, match=r"--device cuda:2 is not usable .*accepted: cpu, cuda, cuda:N with N < 2"):
        inference.check_device("cuda:2")


def test_export_onto_a_file_says_it_is_a_file(finished, tmp_path, capsys):
    path = tmp_path / "export"
    path.write_text("keep me")
    code, err = run_cli(capsys, ["export", "--run", finished, "--out", path])
    assert code == 2
    one_line(err, f"{path} is a file", "new or empty directory")
    assert path.read_text() == "keep me"
