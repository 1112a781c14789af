"""Typed job configuration: dataclasses, YAML recipes and dotted command-line overrides (OmegaConf)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A user-facing, one-line configuration error."""


class Precision(enum.Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class BadRecord(enum.Enum):
    error = "error"  # stop, naming the file and row
    skip = "skip"  # drop it, count it (ranks still run equal step counts)


class NonFinite(enum.Enum):
    error = "error"  # stop, naming the steps and ranks (checked at each log interval, no per-step sync)
    skip = "skip"  # drop a step whose gradients are not finite (one host-device sync per step)


class WandbMode(enum.Enum):
    auto = "auto"  # online when an API key is configured, offline otherwise
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class ModelConfig:
    latent_dim: int = 8
    filters: int = 64  # F: the encoder's widest layer; must be divisible by 4
    image_size: int = 64  # square, a multiple of 8; digits are resized to it (bilinear)


@dataclass
class DataConfig:
    # "shipped" (the 5,000 digits inside the package), a directory of parquet shards in the hub layout,
    # or a Hugging Face hub dataset id such as "ylecun/mnist".
    source: str = "shipped"
    train_split: str = "train"  # splits may be joined with "+", e.g. "train+test"
    eval_split: str = "test"
    batch_size: int = 128  # global batch: split evenly over the ranks
    per_rank_batch_size: int | None = None  # pin the per-rank batch instead (global = this x world size)
    shuffle_buffer: int = 10_000
    # DataLoader worker processes per rank that decode (0: the training process decodes). None: 0 on CPU, where a
    # worker only takes cores from the model; on GPU up to 4, from this rank's share of the cores.
    num_workers: int | None = None
    on_bad_record: BadRecord = BadRecord.error  # undecodable / wrong-size image, missing or out-of-range label


@dataclass
class TrainConfig:
    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-5
    scale_lr: bool = False  # multiply lr by world size (linear scaling rule); off keeps the recipe's lr
    seed: int = 0
    precision: Precision = Precision.no
    channels_last: bool = True
    collective_timeout_s: int = 600  # a rank that stops answering fails the others after this long
    on_nonfinite: NonFinite = NonFinite.error
    debug_nan_step: int = -1  # test-only: this step's loss is made NaN on rank debug_nan_rank
    debug_nan_rank: int = 0
    debug_delay_rank: int = -1  # test-only: this rank sleeps debug_delay_s after every step (a straggler)
    debug_delay_s: float = 0.0


@dataclass
class LogConfig:
    wandb: WandbMode = WandbMode.auto
    project: str = "cvae-dist"
    group: str | None = None
    every_steps: int = 10  # console / metrics.jsonl step-line interval
    images_every_epochs: int = 1
    wandb_per_rank: bool = False  # also one W&B run per rank (same group), for W&B's per-process system charts
    sample_ids: bool = False  # record each rank's example ids per epoch in ranks/rank<r>.json (data audits)
    peak_tflops: float | None = None  # device peak for MFU; default: GPU table, or measured on CPU
    straggler_fraction: float = 0.8  # a rank below this fraction of the median img/s ...
    straggler_intervals: int = 3  # ... for this many intervals in a row is flagged
    straggler_alert_every_s: float = 300.0  # at most one W&B alert per this many seconds


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also checkpoint every N steps (a multiple of log.every_steps); 0: epoch ends only
    every_epoch: bool = True
    keep: int = 3  # newest checkpoints kept; older ones are deleted


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: str = "runs"
    run_name: str | None = None  # default: the recipe's file name and a timestamp
    # None: a new run (its directory must not exist yet); "auto": continue the run directory's newest valid
    # checkpoint (or start it if it has none); or the path of one checkpoint directory.
    resume: str | None = None

    def validate(self) -> JobConfig:
        m = self.model
        if m.image_size <= 0 or m.image_size % 8:
            raise ConfigError(f"model.image_size={m.image_size}: must be a positive multiple of 8")
        if m.filters <= 0 or m.filters % 4:
            raise ConfigError(f"model.filters={m.filters}: must be a positive multiple of 4")
        if m.latent_dim <= 0:
            raise ConfigError(f"model.latent_dim={m.latent_dim}: must be positive")
        if self.data.batch_size <= 0:
            raise ConfigError(f"data.batch_size={self.data.batch_size}: must be positive")
        if self.data.per_rank_batch_size is not None and self.data.per_rank_batch_size <= 0:
            raise ConfigError(f"data.per_rank_batch_size={self.data.per_rank_batch_size}: must be positive")
        if self.data.num_workers is not None and self.data.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.data.num_workers}: must be 0 or more (or null: automatic)")
        if self.train.epochs <= 0:
            raise ConfigError(f"train.epochs={self.train.epochs}: must be positive")
        if self.log.every_steps <= 0:
            raise ConfigError(f"log.every_steps={self.log.every_steps}: must be positive")
        every = self.checkpoint.every_steps
        if every < 0 or every % self.log.every_steps:
            raise ConfigError(
                f"checkpoint.every_steps={every}: must be 0 or a multiple of "
                f"log.every_steps={self.log.every_steps} (losses are checked at those steps)"
            )
        if self.checkpoint.keep < 1:
            raise ConfigError(f"checkpoint.keep={self.checkpoint.keep}: must be at least 1")
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load a YAML recipe onto the typed defaults, then apply `section.key=value` overrides."""
    try:
        merged = OmegaConf.structured(JobConfig)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o or o.startswith("=")]
        if bad:
            raise ConfigError(f"override {bad[0]!r}: expected section.key=value, e.g. train.epochs=2")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg: JobConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    if cfg.run_name is None and path is not None:
        cfg.run_name = Path(path).stem + "-{time}"  # a new directory per run; the time is agreed across ranks
    return cfg.validate()


def to_dict(cfg: JobConfig) -> dict:
    """The config as plain YAML-able data (enums as their values)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]


def to_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(data: dict) -> JobConfig:
    """Rebuild a JobConfig from `to_dict` output (e.g. a checkpoint's config)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), data))  # type: ignore
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None


def _one_line(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(getattr(e, "msg", None) or e).splitlines()[0].strip()
    if "not in" in msg and key:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(OmegaConf.structured(JobConfig), parent) if parent else None
        accepted = sorted(node.keys()) if node is not None else sorted(OmegaConf.structured(JobConfig).keys())
        return f"unknown config key '{key}'; accepted keys{' in ' + parent if parent else ''}: {', '.join(accepted)}"
    return f"config key '{key}': {msg}" if key else msg
