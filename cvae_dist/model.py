"""The convolutional VAE of the Lux.jl / MLX `cvae` example, and its loss."""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from cvae_dist.config import ConfigError, ModelConfig, model_shape

WEIGHTS = "model.safetensors"
_upsample = partial(F.interpolate, scale_factor=2, mode="nearest")


class ConvBlock(nn.Sequential):
    """Conv 3x3 (pad 1) -> BatchNorm -> leaky ReLU 0.01."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        super().__init__(OrderedDict(conv=conv, norm=nn.BatchNorm2d(c_out), act=nn.LeakyReLU(0.01)))


class Encoder(nn.Module):
    """3x (conv 3x3 stride 2 -> BatchNorm -> leaky ReLU), then linear heads for mu and log sigma^2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        f = cfg.filters
        self.down1, self.down2 = ConvBlock(1, f // 4, 2), ConvBlock(f // 4, f // 2, 2)
        self.down3 = ConvBlock(f // 2, f, 2)
        flat = f * (cfg.image_size // 8) ** 2
        self.mu = nn.Linear(flat, cfg.latent_dim)
        self.log_var = nn.Linear(flat, cfg.latent_dim)
        nn.init.zeros_(self.mu.bias)
        nn.init.zeros_(self.log_var.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.down3(self.down2(self.down1(x))).flatten(1)
        return self.mu(h), self.log_var(h).clamp(-20.0, 10.0)


class Decoder(nn.Module):
    """Linear -> (F, H/8, W/8) -> 2x (nearest upsample -> conv -> BN -> leaky ReLU) -> upsample -> conv -> sigmoid."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        f, side = cfg.filters, cfg.image_size // 8
        self.shape = (f, side, side)
        self.linear = nn.Linear(cfg.latent_dim, f * side * side)
        self.up1, self.up2 = ConvBlock(f, f // 2, 1), ConvBlock(f // 2, f // 4, 1)
        self.out = nn.Conv2d(f // 4, 1, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.linear(z).view(-1, *self.shape)
        h = self.up2(_upsample(self.up1(_upsample(h))))
        return torch.sigmoid(self.out(_upsample(h)))


class VAEOutput(NamedTuple):
    reconstruction: torch.Tensor
    mu: torch.Tensor
    log_var: torch.Tensor


HUB_CARD = dict(library_name="cvae-dist", tags=["vae", "mnist", "image-generation"], license="mit")


class CVAE(nn.Module, PyTorchModelHubMixin, **HUB_CARD):
    """Encoder + reparameterisation + decoder. `CVAE.from_pretrained(dir_or_repo_id)` loads an export (as the trainer
    writes `runs/<run>/model/`: `model.safetensors` + `config.json`, the ModelConfig's fields)."""

    def __init__(self, cfg: ModelConfig | None = None, **fields: int):
        # `fields` (latent_dim=..., ...) in the signature make the hub mixin pass config.json's on to _from_pretrained
        super().__init__()
        cfg = ModelConfig(**(cfg if cfg is not None else ModelConfig(**fields)).shape())  # the weights' shape only
        self.config, self._hub_mixin_config = cfg, cfg.shape()  # config.json: the flat shape fields
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)

    def forward(self, x: torch.Tensor | None = None, noise=None, *, z=None) -> VAEOutput | torch.Tensor:
        """`model(x)`: reconstruction, mu, log sigma^2. `model(x, noise)`: the same with the reparameterisation's
        standard normal draws given (training gives each digit the draw of its place in the global batch).
        `model(z=latents)`: decoded images only (through `forward`, so DDP / DeepSpeed wrappers serve both)."""
        if z is not None:
            return self.decoder(z)
        mu, log_var = self.encoder(x)
        noise = torch.randn_like(mu) if noise is None else noise.to(mu.dtype)
        z = mu + noise * torch.exp(0.5 * log_var)
        return VAEOutput(self.decoder(z), mu, log_var)

    def _save_pretrained(self, save_directory) -> None:
        """float32, contiguous tensors (see `portable`); works on channels_last models too."""
        save_file(portable(self.state_dict()), str(save_directory / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = True, **kwargs):
        """Strict: a missing or renamed weight is an error, not a half-loaded model. config.json (its fields in
        `kwargs`) is checked against RULES, then against the weights' safetensors header, before anything is built
        (the mixin's own loader builds first, and prints a line on stdout): a one-line ConfigError otherwise."""
        names = ("revision", "cache_dir", "force_download", "local_files_only", "token")
        hub = {k: kwargs.pop(k) for k in names if k in kwargs}
        local = Path(model_id).is_dir()
        where = str(Path(model_id) / "config.json") if local else f"{model_id} (hub): config.json"
        if local and not Path(where).is_file():
            accepted = "an export directory (model.safetensors + config.json) or a hub repo id"
            raise ConfigError(f"{model_id} has no config.json; accepted: {accepted}")
        cfg = model_shape(kwargs, where)
        weights = Path(model_id) / WEIGHTS if local else hf_hub_download(model_id, WEIGHTS, **hub)
        mismatch = weights_mismatch(cfg, weights, strict)
        if mismatch:
            raise ConfigError(f"{where} does not fit the weights beside it: {mismatch}")
        return cls._load_as_safetensor(cls(cfg), str(weights), map_location, strict).eval()

    @staticmethod
    def shape_of(state_dict: dict[str, torch.Tensor]) -> ModelConfig:
        """The ModelConfig a CVAE state dict was built with, read off its tensors' shapes (KeyError if not one)."""
        mu = state_dict["encoder.mu.weight"]  # (latent_dim, filters * (image_size / 8)^2)
        filters = state_dict["encoder.down3.conv.weight"].shape[0]  # the widest conv: F output channels
        return ModelConfig(latent_dim=mu.shape[0], filters=filters, image_size=8 * math.isqrt(mu.shape[1] // filters))


class LossParts(NamedTuple):
    total: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor


def vae_loss(out: VAEOutput, x: torch.Tensor) -> LossParts:
    """Sum-squared-error reconstruction + KL(q(z|x) || N(0, I)), summed over the batch, in fp32."""
    recon = F.mse_loss(out.reconstruction.float(), x.float(), reduction="sum")
    mu, log_var = out.mu.float(), out.log_var.float()
    kl = -0.5 * torch.sum(1 + log_var - mu.square() - log_var.exp())
    return LossParts(recon + kl, recon, kl)


def portable(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The export format: float32, contiguous, CPU copies, named as in `CVAE` (DDP's or compile's prefixes dropped)."""
    state_dict = OrderedDict(state_dict)
    for prefix in ("module.", "_orig_mod."):
        consume_prefix_in_state_dict_if_present(state_dict, prefix)
    return {k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}


def weights_mismatch(cfg: ModelConfig, path: str | Path, strict: bool = True) -> str | None:
    """What in the safetensors file `path` does not fit a CVAE of `cfg` (a missing, extra or other-shaped tensor), or
    None. Reads the file's header only, and builds the model on the meta device: no memory or time, however large."""
    try:
        with safe_open(str(path), framework="pt") as f:
            have = OrderedDict((k, list(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError) as e:
        return f"{path} is not a readable safetensors file ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    for prefix in ("module.", "_orig_mod."):
        consume_prefix_in_state_dict_if_present(have, prefix)
    model = "a CVAE of " + ", ".join(f"{k}={v}" for k, v in cfg.shape().items())
    try:
        with torch.device("meta"):
            want = {k: list(v.shape) for k, v in CVAE(cfg).state_dict().items()}
    except (RuntimeError, TypeError, OverflowError) as e:  # sizes past int64 (meta tensors still count their bytes)
        return f"{model} cannot be built ({' '.join(str(e).split())[:200]})"
    for k in sorted(want.keys() | have.keys() if strict else want.keys() & have.keys()):
        if want.get(k) != have.get(k):
            held = f"{path} holds {k} with shape {have[k]}" if k in have else f"{path} has no tensor {k}"
            return held + (f", where {model} has {want[k]}" if k in want else f", which {model} does not have")
    return None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
