"""The convolutional VAE of the Lux.jl / MLX `cvae` example, and its loss."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from cvae_dist.config import ConfigError, ModelConfig, model_shape

WEIGHTS = "model.safetensors"


class ConvBlock(nn.Sequential):
    """Conv 3x3 (pad 1) -> BatchNorm -> leaky ReLU 0.01."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                norm=nn.BatchNorm2d(c_out),
                act=nn.LeakyReLU(0.01),
            )
        )


class Encoder(nn.Module):
    """3x (conv 3x3 stride 2 -> BatchNorm -> leaky ReLU), then linear heads for mu and log sigma^2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        f = cfg.filters
        self.down1, self.down2, self.down3 = (
            ConvBlock(1, f // 4, 2),
            ConvBlock(f // 4, f // 2, 2),
            ConvBlock(f // 2, f, 2),
        )
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


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class VAEOutput(NamedTuple):
    reconstruction: torch.Tensor
    mu: torch.Tensor
    log_var: torch.Tensor


class CVAE(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="cvae-dist",
    tags=["vae", "mnist", "image-generation"],
    license="mit",
):
    """Encoder + reparameterisation + decoder. `forward` returns reconstruction, mu and log sigma^2.

    `CVAE(ModelConfig(...))` builds a fresh model. `CVAE.from_pretrained(dir_or_repo_id)` loads an export
    (`model.safetensors` + `config.json` holding the ModelConfig fields, as the trainer writes `runs/<run>/model/`
    and `save_pretrained` writes); `push_to_hub(repo_id)` uploads one.
    """

    def __init__(self, cfg: ModelConfig | None = None, **fields: int):
        # `fields` (latent_dim=..., filters=..., image_size=...): with them in the signature, the hub mixin passes
        # config.json's fields on to `_from_pretrained` (which checks them).
        super().__init__()
        cfg = ModelConfig(**(cfg if cfg is not None else ModelConfig(**fields)).shape())  # the weights' shape only
        self.config = cfg
        self._hub_mixin_config = cfg.shape()  # config.json: the flat shape fields, the trainer's layout
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(
        self, x: torch.Tensor | None = None, noise: torch.Tensor | None = None, *, z: torch.Tensor | None = None
    ) -> VAEOutput | torch.Tensor:
        """`model(x)`: reconstruction, mu, log sigma^2. `model(x, noise)`: the same with the reparameterisation's
        standard normal draws given (training gives each digit the draw of its place in the global batch).
        `model(z=latents)`: decoded images only.

        Decoding goes through `forward` too, so DDP / DeepSpeed wrappers (ZeRO-3 gathers) serve both.
        """
        if z is not None:
            return self.decoder(z)
        mu, log_var = self.encoder(x)
        noise = torch.randn_like(mu) if noise is None else noise.to(mu.dtype)
        z = mu + noise * torch.exp(0.5 * log_var)
        return VAEOutput(self.decoder(z), mu, log_var)

    def _save_pretrained(self, save_directory) -> None:
        """float32, contiguous tensors (see `portable`); works on channels_last models too."""
        from safetensors.torch import save_file

        save_file(portable(self.state_dict()), str(save_directory / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = True, **kwargs):
        """Strict by default: a checkpoint that misses or renames a weight is an error, not a half-loaded model.
        config.json (the mixin passes its fields in `kwargs`) is checked against RULES, then against the weights'
        shapes in their safetensors header, before anything is built: a one-line ConfigError otherwise. (The
        mixin's own loader builds first, and prints a line on stdout for a local directory.)"""
        hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "force_download", "local_files_only", "token")
               if k in kwargs}  # fmt: skip
        local = Path(model_id).is_dir()
        where = str(Path(model_id) / "config.json") if local else f"{model_id} (hub): config.json"
        if local and not Path(where).is_file():
            raise ConfigError(f"{model_id} has no config.json; accepted: an export directory (model.safetensors + "
                              "config.json) or a hub repo id")  # fmt: skip
        cfg = model_shape(kwargs, where)
        weights = Path(model_id) / WEIGHTS if local else hf_hub_download(model_id, WEIGHTS, **hub)
        mismatch = weights_mismatch(cfg, weights, strict)
        if mismatch:
            raise ConfigError(f"{where} does not fit the weights beside it: {mismatch}")
        return cls._load_as_safetensor(cls(cfg), str(weights), map_location, strict).eval()

    @staticmethod
    def shape_of(state_dict: dict[str, torch.Tensor]) -> ModelConfig:
        """The ModelConfig a CVAE state dict was built with, read off its tensors' shapes (KeyError if it is not
        one)."""
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
    """The export format: float32, contiguous (channels_last undone), CPU copies of a state dict, named as in `CVAE`
    (the prefixes of wrappers dropped: DDP's `module.`, a compiled model's `_orig_mod.`)."""
    state_dict = OrderedDict(state_dict)
    for prefix in ("module.", "_orig_mod."):
        consume_prefix_in_state_dict_if_present(state_dict, prefix)
    return {k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}


def weights_mismatch(cfg: ModelConfig, path: str | Path, strict: bool = True) -> str | None:
    """What in the safetensors file `path` does not fit a CVAE of `cfg` (a missing, extra or other-shaped tensor;
    wrappers' prefixes aside), or None. Reads the file's header only, and builds the model on the meta device: no
    memory or time, however large `cfg`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            have = OrderedDict((k, list(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError) as e:
        return f"{path} is not a readable safetensors file ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    for prefix in ("module.", "_orig_mod."):
        consume_prefix_in_state_dict_if_present(have, prefix)
    model = ", ".join(f"{k}={v}" for k, v in cfg.shape().items())
    try:
        with torch.device("meta"):
            want = {k: list(v.shape) for k, v in CVAE(cfg).state_dict().items()}
    except (RuntimeError, TypeError, OverflowError) as e:  # sizes past int64 (meta tensors still count their bytes)
        return f"a CVAE of {model} cannot be built ({' '.join(str(e).split())[:200]})"
    for k in sorted(want.keys() | have.keys() if strict else want.keys() & have.keys()):
        if want.get(k) != have.get(k):
            return (f"{path} holds {k} with shape {have[k]}" if k in have else f"{path} has no tensor {k}") + (
                f", where a CVAE of {model} has {want[k]}" if k in want else f", which a CVAE of {model} does not have"
            )
    return None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
