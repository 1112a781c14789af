"""Using a trained model: `cvae-dist eval | sample | reconstruct | interpolate | export`. The model comes from a run
directory (`--run`: its `model/` export, else its newest checkpoint's weights) or from weights (`--checkpoint`)."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cvae_dist import evaluation
from cvae_dist.checkpoint import checkpoint_dirs, write_export
from cvae_dist.config import ConfigError, JobConfig, ModelConfig, Precision, load_config, model_shape
from cvae_dist.data import error_line, load_split, to_model_input
from cvae_dist.distributed import make_accelerator, set_threads
from cvae_dist.model import CVAE, WEIGHTS, portable

MAX_IMAGES = 4096  # digits in one output grid (64 x 64 digits of 64 px: a 4096 x 4096 PNG)
DECODE_BATCH = 512  # digits decoded at a time, so memory does not grow with --n
ACCEPTED = "accepted: --run <run directory>, or --checkpoint <export or checkpoint directory | .safetensors file>"


@dataclass
class Loaded:
    model: CVAE  # on the CPU, eval mode, float32
    cfg: JobConfig  # the run's (or --config's) settings; `cfg.model` is the shape of the loaded weights
    weights: Path  # the file the weights came from
    name: str  # how to call it in messages: the run directory or the weights' directory


def load_model(run: Path | None = None, checkpoint: Path | None = None, config: Path | None = None) -> Loaded:
    """Resolve `--run` / `--checkpoint` (+ `--config`) to a loaded model; a one-line ConfigError otherwise."""
    if (run is None) == (checkpoint is None):
        raise ConfigError(f"give exactly one of --run and --checkpoint ({ACCEPTED})")
    if run is not None:
        run = Path(run)
        if not run.is_dir():
            raise ConfigError(f"run directory {run} not found ({ACCEPTED})")
        if not (run / "config.yaml").is_file() and config is None:
            raise ConfigError(f"{run} has no config.yaml, so it is not a cvae-dist run directory ({ACCEPTED})")
        weights, run_cfg, name = run / "model" / WEIGHTS, run / "config.yaml", str(run)
        if not weights.is_file():  # no export (yet): the newest checkpoint's weights
            if not (saved := [d / WEIGHTS for d in checkpoint_dirs(run) if (d / WEIGHTS).is_file()]):
                raise ConfigError(
                    f"run {run} has no weights: no model/{WEIGHTS} export and no checkpoints/*/{WEIGHTS} (did it "
                    "finish? a DeepSpeed ZeRO checkpoint holds no model.safetensors; its run writes model/ at the end)"
                )
            weights = saved[-1]
    else:
        (weights, run_cfg), name = _checkpoint_weights(Path(checkpoint)), str(Path(checkpoint))

    # The model shape: --config, else an export's config.json, else the run's config.yaml, else the weights' own.
    cfg_file = Path(config) if config is not None else run_cfg
    cfg = load_config(cfg_file) if cfg_file is not None else JobConfig().validate()
    try:
        state = portable(load_file(str(weights)))
        actual = CVAE.shape_of(state)  # the ModelConfig the weights were built with
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{weights}: not a readable safetensors file ({error_line(e)})") from None
    except KeyError as e:
        raise ConfigError(f"{weights}: not the weights of a cvae-dist CVAE (no tensor {e})") from None
    export_json = weights.parent / "config.json"
    if config is None and export_json.is_file():  # an export: CVAE.from_pretrained is its loader
        try:
            fields = json.loads(export_json.read_text())
        except (ValueError, OSError) as e:
            raise ConfigError(f"{export_json}: not a readable JSON file ({error_line(e)})") from None
        cfg.model = model_shape(fields, str(export_json))  # as CVAE.from_pretrained checks it
        _check_shape(weights, actual, cfg.model, str(export_json))
        return Loaded(CVAE.from_pretrained(weights.parent), cfg, weights, name)
    if cfg_file is None:
        cfg.model = actual
    _check_shape(weights, actual, cfg.model, f"--config {config}" if config is not None else str(cfg_file))
    model = CVAE(cfg.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"{weights}: not the weights of a cvae-dist CVAE ({error_line(e)})") from None
    return Loaded(model.eval(), cfg, weights, name)


def _checkpoint_weights(path: Path) -> tuple[Path, Path | None]:
    """The weights file under --checkpoint and the config.yaml of the run it sits in (if it is inside one)."""
    if not path.exists():
        raise ConfigError(f"checkpoint {path} not found ({ACCEPTED})")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ConfigError(f"checkpoint {path} is not a .safetensors file ({ACCEPTED})")
        weights = path
    else:
        weights = path / WEIGHTS
        if not weights.is_file():
            hint = ""
            if (path / "config.yaml").is_file():
                hint = f"; {path} looks like a run directory: use --run {path}"
            elif (path / "pytorch_model").is_dir():
                hint = "; it is a DeepSpeed ZeRO checkpoint: use the run's model/ export instead"
            raise ConfigError(f"{path} holds no {WEIGHTS}{hint} ({ACCEPTED})")
    run = _run_of(weights.parent)
    return weights, run / "config.yaml" if run is not None else None


def _is_run_dir(d: Path) -> bool:
    """A trainer's run directory: its config.yaml beside the status.json or checkpoints/ every run writes."""
    return (d / "config.yaml").is_file() and ((d / "status.json").is_file() or (d / "checkpoints").is_dir())


def _run_of(directory: Path) -> Path | None:
    """The run directory that `directory` is the model/ export or a checkpoint of, if it is one."""
    d = directory.resolve()
    if d.name == "model" and (d.parent / "config.yaml").is_file():  # runs/<run>/model
        return d.parent
    if d.parent.name == "checkpoints" and (d.parent.parent / "config.yaml").is_file():  # runs/<run>/checkpoints/x
        return d.parent.parent
    return None


def _check_shape(weights: Path, actual: ModelConfig, expected: ModelConfig, source: str) -> None:
    if (want := expected.shape()) != (have := actual.shape()):
        diff = " ".join(f"model.{k}={v}" for k, v in want.items() if v != have[k])
        fits = " ".join(f"model.{k}={v}" for k, v in have.items())
        accepted = "a config with the weights' model shape, or --checkpoint without --config to read it off the weights"
        raise ConfigError(f"{weights} holds a model with {fits}, but {source} says {diff}; accepted: {accepted}")


def _device_model(loaded: Loaded, device: torch.device | str) -> CVAE:
    """The model on `device` in the memory format the trainer used, so its numbers come out the same."""
    layout = torch.channels_last if loaded.cfg.train.channels_last else torch.preserve_format
    return loaded.model.to(device, memory_format=layout).eval()


def _model_input(loaded: Loaded, pixels: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    return to_model_input(pixels.to(device), loaded.cfg.model.image_size, loaded.cfg.train.channels_last)


def model_home(run: Path | None, checkpoint: Path | None) -> Path | None:
    """The directory whose files belong to the model: its run, else the `--checkpoint` directory (None for a file)."""
    if run is not None:
        return Path(run)
    path = Path(checkpoint)
    directory = path if path.is_dir() else path.parent
    return _run_of(directory) or (directory if path.is_dir() else None)


def check_output(path: Path, suffix: str, force: bool, home: Path | None, flag: str = "--out") -> None:
    """Refuse, in one line, a file that `flag` may not name: not a `suffix` file in an existing writable directory,
    an existing file without `force`, or any existing file inside `home` (the model's run), `force` or not."""
    path = Path(path)
    accepted = f"accepted: a new {suffix} file in an existing, writable directory (an existing one with --force)"
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; {accepted}")
    if path.suffix.lower() != suffix:
        raise ConfigError(f"{flag} {path}: must end in {suffix} (any case); {accepted}")
    parent = path.parent
    if not parent.is_dir():
        there = parent if parent.exists() else next(p for p in parent.parents if p.exists())
        if not there.is_dir():
            raise ConfigError(f"{flag} {path}: {there} is a file, not a directory; {accepted}")
        raise ConfigError(f"{flag} {path}: directory {parent} does not exist (create it first); {accepted}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {parent} is not writable; {accepted}")
    if not (path.exists() or path.is_symlink()):
        return
    # The file that gets replaced is the link itself, not what it points to: compare its real directory.
    if home is not None and (parent.resolve() / path.name).is_relative_to(home.resolve()):
        raise ConfigError(
            f"{flag} {path} is a file in {home}, the model's run or checkpoint directory, whose files are never "
            "replaced, even with --force; choose a new file name or a path outside it"
        )
    if not force:
        raise ConfigError(f"{flag} {path} already exists; pass --force to replace it, or choose another path")


def check_device(name: str) -> torch.device:
    """`--device` as torch names it, if this machine has it; a one-line ConfigError saying what is accepted."""
    gpus, mps = torch.cuda.device_count(), torch.backends.mps.is_available()
    accepted = "accepted: cpu" + (f", cuda, cuda:N with N < {gpus}" if gpus else " (no CUDA device here)")
    accepted += ", mps" if mps else ""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name} is not a torch device; {accepted}") from None
    usable = {"cpu": True, "cuda": (device.index or 0) < gpus, "mps": mps}
    if not usable.get(device.type, False):
        raise ConfigError(f"--device {name} is not usable on this machine; {accepted}")
    return device


@torch.no_grad()
def evaluate(loaded: Loaded, source=None, split=None, seed: int | None = None, precision: str = "fp32") -> dict:
    """Held-out loss as the trainer reports it (under `accelerate launch`, each rank a strided share)."""
    cfg = copy.deepcopy(loaded.cfg)
    cfg.train.precision = Precision[precision]
    accelerator = make_accelerator(cfg).accelerator
    set_threads()
    source, split = source or cfg.data.source, split or cfg.data.eval_split
    seed = cfg.train.seed if seed is None else seed
    pixels, _ = load_split(source, split)
    model, device = _device_model(loaded, accelerator.device), accelerator.device
    figures = evaluation.evaluate(model, accelerator, pixels, lambda p: _model_input(loaded, p, device), seed)
    world, batch = accelerator.num_processes, evaluation.EVAL_BATCH
    accelerator.end_training()  # destroy the process group: left to exit, gloo can abort (terminate, -6)
    r = dict(model=loaded.name, weights=str(loaded.weights), source=source, split=split, images=len(pixels))
    r |= dict(processes=world, seed=seed, precision=precision, batch_size=batch)
    r |= {f"{k}_per_image": figures[f"eval/{k}_per_image"] for k in ("loss", "recon", "kl")}
    return r | {"loss_per_batch": r["loss_per_image"] * batch}  # the unit of the training loss curve


@torch.no_grad()
def sample(loaded: Loaded, n: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """`n` decoded draws from the N(0, I) prior, drawn on the CPU from `seed` (as the trainer's figure draws them)."""
    z = torch.randn(n, loaded.cfg.model.latent_dim, generator=torch.Generator().manual_seed(seed))
    return _decode(_device_model(loaded, device), z.to(device))


def _decode(model: CVAE, z: torch.Tensor) -> torch.Tensor:
    """Latents -> images on the CPU, DECODE_BATCH at a time (memory bounded by the output)."""
    return torch.cat([model(z=chunk).cpu() for chunk in z.split(DECODE_BATCH)])


@torch.no_grad()
def latent_grid(loaded: Loaded, side: int = 16, limit: float = 3.0, device: str = "cpu") -> torch.Tensor:
    """Decode a side x side grid over [-limit, limit]^2 (x left to right, y top to bottom from +limit)."""
    if (dim := loaded.cfg.model.latent_dim) != 2:
        fix = "train one with model.latent_dim=2"
        raise ConfigError(f"--latent-grid needs a 2-D latent space; {loaded.name} has model.latent_dim={dim} ({fix})")
    xs, ys = torch.linspace(-limit, limit, side), torch.linspace(limit, -limit, side)
    z = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1).reshape(-1, 2)
    return _decode(_device_model(loaded, device), z.to(device))


@torch.no_grad()
def reconstruct(loaded: Loaded, pixels, seed: int | None = None, mean=False, device="cpu") -> tuple[torch.Tensor, ...]:
    """(model inputs, reconstructions) of `pixels`; noise seeded as the trainer's figure, or z = mu if `mean`."""
    model = _device_model(loaded, device)
    seed = loaded.cfg.train.seed if seed is None else seed
    inputs, reconstructions = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for chunk in pixels.split(DECODE_BATCH):
            x = _model_input(loaded, chunk, device)
            recon = model(z=model.encoder(x)[0]) if mean else model(x).reconstruction
            inputs.append(x.cpu())
            reconstructions.append(recon.cpu())
    return torch.cat(inputs), torch.cat(reconstructions)


@torch.no_grad()
def interpolate(loaded: Loaded, pixels, labels: torch.Tensor, pairs: int, steps: int, device="cpu") -> torch.Tensor:
    """One row per pair (`pair_indices`): the first digit, `steps` decodes along mu_a -> mu_b, the second digit."""
    a_idx, b_idx = pair_indices(labels, pairs)
    model = _device_model(loaded, device)
    x = _model_input(loaded, pixels[a_idx + b_idx], device)
    mu_a, mu_b = model.encoder(x)[0].split(pairs)
    t = torch.linspace(0, 1, steps, device=mu_a.device).view(1, steps, 1)
    z = (mu_a.unsqueeze(1) * (1 - t) + mu_b.unsqueeze(1) * t).reshape(pairs * steps, -1)
    walk = _decode(model, z).to(x.device).reshape(pairs, steps, *x.shape[1:])
    rows = torch.cat([x[:pairs].unsqueeze(1), walk, x[pairs:].unsqueeze(1)], dim=1)
    return rows.reshape(pairs * (steps + 2), *x.shape[1:]).cpu()


def pair_indices(labels: torch.Tensor, pairs: int) -> tuple[list[int], list[int]]:
    """Pair i: the (i // 5)-th digits of classes 2i and 2i+1 (mod 10); consecutive digits where a class has too few."""
    by_class = [(labels == c).nonzero().flatten().tolist() for c in range(10)]
    a_idx, b_idx = [], []
    for i in range(pairs):
        a, b, k = by_class[(2 * i) % 10], by_class[(2 * i + 1) % 10], i // 5
        a_idx.append(a[k] if len(a) > k and len(b) > k else (2 * i) % len(labels))
        b_idx.append(b[k] if len(a) > k and len(b) > k else (2 * i + 1) % len(labels))
    return a_idx, b_idx


def export(loaded: Loaded, out: Path, push_to_hub: str | None = None, private: bool = False) -> Path:
    """`save_pretrained`: model.safetensors + config.json (+ a model card); optionally pushed to the hub."""
    out = Path(out)
    check_export_dir(out)
    write_export(loaded.model, out)  # (moves it to the CPU, in eval mode)
    if push_to_hub:
        try:
            loaded.model.push_to_hub(push_to_hub, private=private or None)
        except Exception as e:  # network, auth, repo name: one line, the local export stays
            raise ConfigError(
                f"wrote {out}, but pushing it to the hub as {push_to_hub!r} failed ({error_line(e)}); log in "
                f"(`hf auth login` or HF_TOKEN) and run: hf upload {push_to_hub} {out}"
            ) from None
    return out


def check_export_dir(out: Path) -> None:
    """export's --out: a new or empty directory outside every run directory (whose files a run replaces)."""
    out = Path(out)
    run = next((d for d in (out.resolve(), *out.resolve().parents) if _is_run_dir(d)), None)
    if run is not None:
        raise ConfigError(
            f"export --out {out} is inside run directory {run}, where the trainer deletes, renames and replaces "
            "what it wrote (checkpoint rotation, resumes, the final export); accepted: a new or empty directory "
            "outside every run directory"
        )
    new = "--out names a new or empty directory"
    if out.is_symlink() and not out.exists():  # (the export cannot create a directory there)
        raise ConfigError(f"export --out {out} is a symbolic link to {os.readlink(out)}, which does not exist; {new}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export --out {out} is a file; {new}")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"export directory {out} already exists and is not empty; pick a new or empty directory")
