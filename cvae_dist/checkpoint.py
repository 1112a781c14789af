"""Run directories, accelerate checkpoints and the safetensors export of the final weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from cvae_dist.config import ConfigError, JobConfig, ModelConfig, to_dict, to_yaml
from cvae_dist.model import CVAE


def run_dir_for(cfg: JobConfig) -> Path:
    return Path(cfg.output_dir) / cfg.run_name


def check_new_run_dir(path: Path) -> None:
    """Refuse to write into a run someone already made, or into a directory we cannot write."""
    if path.exists() and any(path.iterdir()):
        raise ConfigError(
            f"run directory {path} already exists and is not empty; pick another run_name "
            "(the trainer never overwrites a run)"
        )
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"output directory {parent} is not writable")


def create_run_dir(path: Path, cfg: JobConfig) -> None:
    (path / "images").mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(to_yaml(cfg))


def save_final(accelerator: Accelerator, model: torch.nn.Module, run_dir: Path, cfg: JobConfig) -> Path:
    """Full training state via accelerate (every rank takes part) plus a safetensors export of the weights."""
    state_dir = run_dir / "checkpoints" / "final"
    accelerator.save_state(str(state_dir))
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; call on every rank
    export_dir = run_dir / "model"
    if accelerator.is_main_process:
        export(state_dict, cfg.model, export_dir)
    accelerator.wait_for_everyone()
    return export_dir


def export(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, out: Path) -> None:
    """`model.safetensors` + `config.json`, loadable with `load_exported`."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(to_dict(JobConfig(model=model_cfg))["model"], indent=2) + "\n")


def load_exported(path: Path) -> CVAE:
    """Rebuild the model from an `export` directory (safetensors only: nothing is unpickled)."""
    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise ConfigError(f"{path}: expected config.json and model.safetensors (a `cvae-dist` export)")
    model = CVAE(ModelConfig(**json.loads(cfg_file.read_text())))
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise ConfigError(
            f"{weights}: weights do not fit the model in config.json ({str(e).splitlines()[0]})"
        ) from None
    return model.eval()
