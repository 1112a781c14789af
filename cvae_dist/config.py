"""Typed job configuration: dataclasses, YAML recipes and dotted command-line overrides (OmegaConf)."""

from __future__ import annotations

import enum
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

# A run_name's {time}: to the microsecond, so that launches started together (a sweep) get names of their own.
TIME_FORMAT = "%Y%m%d-%H%M%S-%f"


class ConfigError(ValueError):
    """A user-facing, one-line configuration error."""


class Precision(enum.Enum):
    auto = "auto"  # the launcher's mixed_precision if it names one, else the device's fastest (see distributed.py)
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class BadRecord(enum.Enum):
    error = "error"  # stop, naming the file and row
    skip = "skip"  # drop it, count it (ranks still run equal step counts)


class NonFinite(enum.Enum):
    error = "error"  # stop, naming the steps and ranks (checked at each log interval, no per-step sync)
    skip = "skip"  # drop a step whose gradients are not finite (one host-device sync per step)


class LRSchedule(enum.Enum):
    constant = "constant"  # train.lr after the warm-up
    cosine = "cosine"  # to train.min_lr at the end of train.epochs
    linear = "linear"  # to train.min_lr at the end of train.epochs
    wsd = "wsd"  # warm-up, stable, then a 1-sqrt decay to train.min_lr over the last 20% (Hägele et al. 2024)


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
    batchnorm: str = "global"  # BatchNorm's training statistics over every rank's images, or "local": each rank's

    def shape(self) -> dict[str, int]:
        """The fields the weights' shapes fix: what an export's config.json and a checkpoint record."""
        return {"latent_dim": self.latent_dim, "filters": self.filters, "image_size": self.image_size}


@dataclass
class DataConfig:
    source: str = "shipped"  # the package's 5,000 digits, a directory of parquet shards, or a hub dataset id
    train_split: str = "train"  # splits may be joined with "+", e.g. "train+test"
    eval_split: str = "test"
    batch_size: int = 128  # global batch: shared out over the ranks (shares differ by at most one image)
    shuffle_buffer: int = 10_000
    resident_mb: int = 1024  # a split whose decoded digits fit is kept on the device (data.py); 0: always stream
    num_workers: int | None = None  # decoding processes per rank; None: 0 on CPU, up to 4 on GPU
    on_bad_record: BadRecord = BadRecord.error  # undecodable / wrong-size image, missing or out-of-range label


@dataclass
class TrainConfig:
    epochs: int = 50
    max_steps: int | None = None  # stop after this many steps in all (a bounded run, e.g. a smoke test)
    lr: float = 1e-3  # the peak learning rate
    weight_decay: float = 1e-5
    # The recipe's clocks count images seen (steps x data.batch_size): the same curve at any world size and on resume.
    lr_schedule: LRSchedule = LRSchedule.constant
    warmup_images: int = 0  # the lr rises linearly from 0 to train.lr over this many images
    min_lr: float = 0.0  # where cosine, linear and wsd end (at train.epochs; train.max_steps only stops early)
    kl_warmup_images: int = 0  # the KL term's weight rises linearly from 0 to 1 over this many images (0: always 1)
    clip_grad_norm: float | None = None  # clip the global gradient norm to this (null: no clipping)
    ema_decay: float | None = None  # an EMA of the weights, evaluated, pictured and exported (null: none)
    early_stop_epochs: int | None = None  # end the run after this many epochs without a better held-out loss
    seed: int = 0
    precision: Precision = Precision.auto
    channels_last: bool = True
    cuda_graph: bool = True  # on CUDA, the whole step as one replayed CUDA graph, where supported (step.py)
    collective_timeout_s: int = 600  # a rank that stops answering fails the others after this long
    on_nonfinite: NonFinite = NonFinite.error
    deterministic: bool = False  # deterministic kernels only: the same bits twice on a GPU (slower)


@dataclass
class LogConfig:
    wandb: WandbMode = WandbMode.auto
    project: str = "cvae-dist"
    group: str | None = None
    every_steps: int = 10  # console / metrics.jsonl step-line interval
    images_every_epochs: int = 1
    sample_ids: bool = False  # record each rank's example ids per epoch in ranks/rank<r>.json (data audits)
    telemetry: bool = True  # per-step phase timers and DDP wait hooks; off: step lines keep loss and img/s only
    peak_tflops: float | None = None  # device peak for MFU; default: the GPU table (a CPU: MFU is n/a)
    straggler_fraction: float = 0.8  # a rank below this fraction of the median img/s ...
    straggler_intervals: int = 3  # ... for this many intervals in a row is flagged
    profile_steps: str | None = None  # "A-B": torch.profiler records steps A..B on every rank into profiles/
    profile_len: int = 5  # steps profiled on every rank after a SIGUSR2 to any rank


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also checkpoint every N steps (a multiple of log.every_steps); 0: epoch ends only
    every_epoch: bool = True
    keep: int = 3  # newest checkpoints kept; older ones are deleted
    keep_best: bool = False  # also keep the checkpoint of the lowest held-out loss, and export it as model-best/


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: str = "runs"
    run_name: str | None = None  # default: the recipe's file name and a timestamp
    resume: str | None = None  # None: a new run; auto | allow | a checkpoint directory (checkpoint.resolve_resume)

    def validate(self) -> JobConfig:
        """Every value against its key's rule (RULES), then the rules that tie keys together."""
        for key, (holds, accepted) in RULES.items():
            value = functools.reduce(getattr, key.split("."), self)
            if not holds(value):
                shown = repr(value) if isinstance(value, str) else value
                raise ConfigError(f"{key}={shown}: must be {accepted}")
        if self.train.min_lr > self.train.lr:
            raise ConfigError(f"train.min_lr={self.train.min_lr}: must be at most train.lr={self.train.lr} (the peak)")
        every = self.checkpoint.every_steps
        if every % self.log.every_steps:
            raise ConfigError(
                f"checkpoint.every_steps={every}: must be 0 or a multiple of "
                f"log.every_steps={self.log.every_steps} (losses are checked at those steps)"
            )
        return self


def _words(v: str | None) -> bool:
    return v is not None and v.strip() != "" and v == v.strip()


def step_range(v: str | None) -> tuple[int, int] | None:
    """`log.profile_steps`' "A-B" as (A, B), 1 <= A <= B; None for null or anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", v) if isinstance(v, str) else None
    if match is None:
        return None
    first, last = int(match[1]), int(match[2])
    return (first, last) if 1 <= first <= last else None


def _splits(v: str) -> bool:
    return all(_words(part) for part in v.split("+"))


def _directory_name(v: str | None) -> bool:
    if v is None:
        return True
    expanded = v.replace("{time}", datetime.now().strftime(TIME_FORMAT))
    plain = not v.startswith(".") and not any(c in "/\\\x7f" or ord(c) < 32 for c in v)
    return _words(v) and plain and len(expanded.encode()) <= 255


# (holds, what is accepted) for every key whose type alone does not bound it (a test checks that each has one).
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.latent_dim": (lambda v: v > 0, "positive"),
    "model.filters": (lambda v: v > 0 and v % 4 == 0, "a positive multiple of 4"),
    "model.image_size": (lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8"),
    "model.batchnorm": (lambda v: v in ("global", "local"), "one of: global, local"),
    "data.source": (_words, "shipped, a directory of parquet shards or a hub dataset id"),
    "data.train_split": (_splits, "split names, joined with + (e.g. train+test)"),
    "data.eval_split": (_splits, "split names, joined with + (e.g. test)"),
    "data.batch_size": (lambda v: v > 0, "positive"),
    "data.shuffle_buffer": (lambda v: v >= 0, "0 or more (0: a streamed split is read in its stored order)"),
    "data.resident_mb": (lambda v: v >= 0, "0 or more (0: always stream)"),
    "data.num_workers": (lambda v: v is None or v >= 0, "0 or more (or null: automatic)"),
    "train.epochs": (lambda v: v > 0, "positive"),
    "train.max_steps": (lambda v: v is None or v > 0, "positive (or null: no limit)"),
    "train.lr": (lambda v: math.isfinite(v) and v > 0, "a finite number above 0"),
    "train.weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number, 0 or more"),
    "train.warmup_images": (lambda v: v >= 0, "0 or more images (0: no warm-up)"),
    "train.min_lr": (lambda v: math.isfinite(v) and v >= 0, "a finite number, 0 or more, at most train.lr"),
    "train.kl_warmup_images": (lambda v: v >= 0, "0 or more images (0: the KL weight is always 1)"),
    "train.clip_grad_norm": (lambda v: v is None or (math.isfinite(v) and v > 0), "a finite number above 0 (or null)"),
    "train.ema_decay": (lambda v: v is None or 0 < v < 1, "above 0 and below 1, e.g. 0.999 (or null: no EMA)"),
    "train.early_stop_epochs": (lambda v: v is None or v > 0, "a positive number of epochs (or null: never)"),
    "train.seed": (lambda v: 0 <= v < 2**32, "an integer from 0 to 4294967295 (numpy's seed range)"),
    # far larger ones overflow torch's deadlines (1e10 s: the store times out at once; 1e14 s: OverflowError)
    "train.collective_timeout_s": (lambda v: 0 < v <= 604_800, "a positive number of seconds, at most 604800 (a week)"),
    "log.project": (_words, "a W&B project name"),
    "log.group": (lambda v: v is None or _words(v), "a W&B group name (or null: none)"),
    "log.every_steps": (lambda v: v > 0, "positive"),
    "log.images_every_epochs": (lambda v: v > 0, "positive (the last epoch always saves its figure)"),
    "log.peak_tflops": (lambda v: v is None or (math.isfinite(v) and v > 0), "a finite number above 0 (or null)"),
    "log.straggler_fraction": (lambda v: 0 < v <= 1, "above 0 and at most 1 (a fraction of the median img/s)"),
    "log.straggler_intervals": (lambda v: v > 0, "positive"),
    "log.profile_steps": (
        lambda v: v is None or step_range(v) is not None,
        "a step range A-B with 1 <= A <= B, e.g. 20-25 (or null: no fixed range)",
    ),
    "log.profile_len": (lambda v: v > 0, "a positive number of steps"),
    "checkpoint.every_steps": (lambda v: v >= 0, "0 or more (0: at epoch ends only)"),
    "checkpoint.keep": (lambda v: v > 0, "positive"),
    "output_dir": (_words, "a directory path"),
    "run_name": (
        _directory_name,
        "one directory name: no /, \\ or control characters, not . or .. or hidden (a "
        "leading .), at most 255 bytes with {time} expanded (or null: the recipe's name and the time)",
    ),
    "resume": (lambda v: v is None or _words(v), "auto, allow or a checkpoint directory (or null: a new run)"),
}


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: `no`, `off`, `yes`, `on` stay words (an enum key's error names the word, not False)."""

    def compose_node(self, parent, index):
        # OmegaConf copies what an alias names at each use: 200 bytes of nested aliases make billions of values.
        if self.check_event(yaml.AliasEvent):
            alias = self.peek_event()
            problem = f"YAML alias *{alias.anchor}: aliases are not accepted; write the value out"
            raise _Refused(problem=problem, problem_mark=alias.start_mark)
        return super().compose_node(parent, index)


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a recipe may not use."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _parse(text: str, where: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        what = "" if isinstance(e, _Refused) else "YAML syntax error: "
        raise ConfigError(f"{at}: {what}{e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: YAML syntax error: {str(e).splitlines()[0]}") from None


def _from_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    tree: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        empty = f"{key!r} has an empty name between dots; " if sep and key and "" in key.split(".") else ""
        if not sep or not key or empty:
            raise ConfigError(f"override {item!r}: {empty}expected section.key=value, e.g. train.epochs=2")
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is given both as a value and as a section")
        node[leaf] = _parse(value, f"override {item!r}")
    return tree


def _no_environment(name: str, *_default) -> str:
    why = "a recipe may not read the environment (config.yaml, checkpoints and W&B keep every value)"
    raise ConfigError(f"${{oc.env:{name}}}: {why}; write the value itself")


# No resolver reads the environment: a recipe would copy WANDB_API_KEY or HF_TOKEN into every file the run writes.
# (OmegaConf 2.4 renamed register_new_resolver.)
getattr(OmegaConf, "register_resolver", OmegaConf.register_new_resolver)("oc.env", _no_environment, replace=True)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load a YAML recipe onto the typed defaults, then apply `section.key=value` overrides."""
    layers = []
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a directory: --config takes a YAML file")
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        if not path.is_file():  # every rank reads the recipe, and a pipe's text goes to the first reader
            kind = "a pipe" if path.is_fifo() else "a socket" if path.is_socket() else "a device"
            raise ConfigError(f"{path} is {kind}, not a regular file: --config takes a YAML file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a text YAML file (byte {e.start} is not UTF-8)") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
        recipe = _parse(text, str(path))
        if recipe is not None and not isinstance(recipe, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, ...), not {recipe!r:.40}")
        layers.append(recipe or {})
    layers.append(_from_overrides(overrides))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(JobConfig), *layers)
        cfg: JobConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    if cfg.run_name is None and path is not None:
        cfg.run_name = Path(path).stem + "-{time}"  # a new directory per run; the time is agreed across ranks
    return cfg.validate()


def to_dict(cfg: JobConfig) -> dict:
    """The config as plain YAML-able data (enums as their names)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]


def flat_settings(cfg: JobConfig) -> dict[str, object]:
    """The config as {"section.key": value} (enums by name), without the top-level keys (where the run is)."""
    sections = [(name, keys) for name, keys in to_dict(cfg).items() if isinstance(keys, dict)]
    return {f"{name}.{k}": v for name, keys in sections for k, v in keys.items()}


def to_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _one_line(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(getattr(e, "msg", None) or e).splitlines()[0].strip()
    msg = msg.removeprefix("ConfigError raised while resolving interpolation: ")  # ours: _no_environment
    if "not in" in msg and key:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(OmegaConf.structured(JobConfig), parent) if parent else None
        accepted = sorted(node.keys()) if node is not None else sorted(OmegaConf.structured(JobConfig).keys())
        return f"unknown config key '{key}'; accepted keys{' in ' + parent if parent else ''}: {', '.join(accepted)}"
    for kind, what, brackets in (("DictConfig", "mapping", "{...}"), ("ListConfig", "list", "[...]")):
        if kind in msg and key:  # e.g. run_name={time}: YAML reads the mapping {time: null}
            example = "{time}" if key == "run_name" else brackets
            got = f"got a YAML {what}, not one value (YAML reads an unquoted {brackets} as a {what})"
            return f"config key '{key}': {got}; quote it for YAML, e.g. \"{key}='{example}'\" in a shell"
    return f"config key '{key}': {msg}" if key else msg


def model_shape(fields: object, where: str) -> ModelConfig:
    """The model an export's `config.json` or a checkpoint records: `ModelConfig.shape`'s fields, under RULES."""
    names = list(ModelConfig().shape())
    accepted = f"accepted: an object of {', '.join(names)} (integers), as the trainer writes it"
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}: not an object but {type(fields).__name__}; {accepted}")
    unknown, missing = sorted(map(str, set(fields) - set(names))), [n for n in names if n not in fields]
    if unknown or missing:
        raise ConfigError(f"{where}: {f'unknown key {unknown[0]!r}' if unknown else f'no {missing[0]}'}; {accepted}")
    for name in names:
        holds, rule = RULES[f"model.{name}"]
        if type(fields[name]) is not int or not holds(fields[name]):  # (not bool, not 32.7, not 1e9)
            raise ConfigError(f"{where}: {name}={fields[name]!r}: must be an integer, {rule}")
    return ModelConfig(**fields)
