"""`cvae-dist` command line: train, prepare-data, eval, sample, reconstruct, interpolate, export.

This module owns the parser: every subcommand is registered here with its handler (`set_defaults(func=...)`), and a
handler turns the parsed arguments into one call of the library (trainer, prepare_data, inference). The benchmark
is a script apart: benchmarks/bench.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path

from cvae_dist.faults import INTERRUPTED_EXIT_CODE, NonFiniteLoss, OutOfMemory, Stopped, hold_profile_requests

hold_profile_requests()  # first: the imports below take seconds, and SIGUSR2 would end the process meanwhile

import torch  # noqa: E402

from cvae_dist import inference, strict_json  # noqa: E402
from cvae_dist.checkpoint import CheckpointError  # noqa: E402
from cvae_dist.config import RULES, ConfigError, JobConfig  # noqa: E402
from cvae_dist.data import DataError, load_split  # noqa: E402
from cvae_dist.distributed import LaunchError  # noqa: E402
from cvae_dist.files import DiskError, write_safely  # noqa: E402
from cvae_dist.images import grid, save_grid, side_by_side  # noqa: E402
from cvae_dist.prepare_data import DataFormatError  # noqa: E402

# Mistakes in what the user gave us: one line on stderr, exit 2. Anything else keeps its traceback.
USER_ERRORS = (
    ConfigError,
    CheckpointError,
    DataError,
    DataFormatError,
    LaunchError,
    FileExistsError,
    FileNotFoundError,
)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except Stopped as e:  # preempted or interrupted, checkpointed: the exit code tells a scheduler to requeue
        print(f"cvae-dist {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except USER_ERRORS as e:
        print(f"cvae-dist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLoss, DiskError, OutOfMemory) as e:
        print(f"cvae-dist {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cvae-dist {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, each with its handler."""
    parser = argparse.ArgumentParser(prog="cvae-dist", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_train(sub)
    add_prepare_data(sub)
    add_inference(sub)
    return parser


# ---------------------------------------------------------------------------------------------- train


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a CVAE (run under `accelerate launch` for several processes)",
        epilog=config_sections(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML recipe, e.g. configs/debug.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides: train.epochs=2 data.batch_size=64")
    p.set_defaults(func=_train)


def config_sections() -> str:
    """The config's sections and their keys, for `train --help`."""
    import textwrap

    lines = ["config sections and their keys (set in a recipe, or as dotted overrides such as train.epochs=2):"]
    top = []
    for f in dataclasses.fields(JobConfig):
        if f.default_factory is dataclasses.MISSING:
            top.append(f.name)
            continue
        keys = ", ".join(k.name for k in dataclasses.fields(f.default_factory))
        lines.append(textwrap.fill(keys, 100, initial_indent=f"  {f.name + ':':<12} ", subsequent_indent=" " * 15))
    lines.append(f"  {'top level:':<12} {', '.join(top)}")
    lines.append("each key's default and meaning: cvae_dist/config.py; recipes and precision: README, Configuration")
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    from cvae_dist.config import load_config
    from cvae_dist.train import train

    train(load_config(args.config, args.overrides))
    return 0


# ---------------------------------------------------------------------------------------------- prepare-data


def add_prepare_data(sub) -> None:
    p = sub.add_parser("prepare-data", help="convert MNIST (CSV, IDX, or the official IDX split) into parquet shards")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", type=Path, help="CSV: 784 pixel columns + label (first or last; .gz ok)")
    src.add_argument("--idx", type=Path, nargs=2, metavar=("IMAGES", "LABELS"), help="MNIST IDX files (.gz ok)")
    src.add_argument(
        "--mnist",
        type=Path,
        metavar="DIR",
        help="the official split: DIR holds train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (.gz ok); test = the 10,000 t10k digits in file order",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (absent or empty; written atomically)")
    p.add_argument("--shards", type=int, default=8, help="train shards (default 8: whole shards for 1/2/4/8 ranks)")
    p.add_argument(
        "--heldout-per-class", type=int, help="--csv / --idx: digits per class drawn into the test split (default 50)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train shuffle (and of the --csv / --idx draw)")
    p.set_defaults(func=_prepare_data)


def _prepare_data(args: argparse.Namespace) -> int:
    import time

    import datasets

    from cvae_dist.prepare_data import convert_mnist, read_csv, read_idx, write_shards

    datasets.disable_progress_bars()
    start = time.perf_counter()
    if args.mnist:
        if args.heldout_per_class is not None:
            raise DataFormatError("--heldout-per-class applies to --csv / --idx: --mnist keeps the official test split")
        sizes = convert_mnist(args.mnist, args.out, args.shards, args.seed)
    else:
        pixels, labels = read_csv(args.csv) if args.csv else read_idx(*args.idx)
        heldout = 50 if args.heldout_per_class is None else args.heldout_per_class
        sizes = write_shards(pixels, labels, args.out, args.shards, heldout, args.seed)
    mb = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    splits = ", ".join(f"{k} {v:,} digits" for k, v in sizes.items())
    print(f"wrote {args.out}: {splits}; {mb:.1f} MB in {time.perf_counter() - start:.1f} s")
    return 0


# ---------------------------------------------------------------------------------------------- a trained model


def add_inference(sub) -> None:
    """eval / sample / reconstruct / interpolate / export: a trained model's commands (see inference.py)."""
    source = argparse.ArgumentParser(add_help=False)
    which = source.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", type=Path, help="a run directory, runs/<name>: its model/ export and config.yaml")
    which.add_argument(
        "--checkpoint",
        type=Path,
        help="an export directory (model.safetensors + config.json), an accelerate checkpoint directory "
        "holding model.safetensors, or a .safetensors file",
    )
    source.add_argument(
        "--config", type=Path, help="config YAML (a run's config.yaml or a recipe) for --checkpoint: shape and data"
    )
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    heldout = argparse.ArgumentParser(add_help=False)
    heldout.add_argument("--source", help="data source (default: the run's data.source)")
    heldout.add_argument("--split", help="split (default: the run's data.eval_split)")
    overwrite = argparse.ArgumentParser(add_help=False)
    overwrite.add_argument(
        "--force", action="store_true", help="replace an existing output file (never one inside the model's run)"
    )

    p = sub.add_parser(
        "eval", parents=[source, heldout, overwrite], help="held-out loss (reconstruction, KL) of a trained model"
    )
    p.add_argument("--seed", type=int, help="noise seed (default: the run's train.seed)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast (default fp32)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "sample", parents=[source, device, overwrite], help="a PNG grid of digits decoded from the N(0, I) prior"
    )
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--seed", type=int, default=0, help="prior draws seed (default 0)")
    p.add_argument("--columns", type=int, help="grid columns (default: a square grid)")
    p.add_argument(
        "--latent-grid",
        type=int,
        nargs="?",
        const=16,
        metavar="SIDE",
        help="2-D latents only: decode a SIDE x SIDE grid over [-3, 3]^2 instead (default 16)",
    )
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG path (default samples.png)")
    p.set_defaults(func=_sample)

    p = sub.add_parser(
        "reconstruct",
        parents=[source, heldout, device, overwrite],
        help="held-out digits and their reconstructions side by side",
    )
    p.add_argument("--n", type=int, default=32, help="number of held-out digits (default 32, the first ones)")
    p.add_argument("--columns", type=int, default=8, help="digits per row in each half (default 8)")
    p.add_argument("--seed", type=int, help="noise seed (default: the run's train.seed, as the trainer's figure)")
    p.add_argument("--mean", action="store_true", help="decode mu instead of a noisy z")
    p.add_argument("--out", type=Path, default=Path("recon.png"), help="PNG path (default recon.png)")
    p.set_defaults(func=_reconstruct)

    p = sub.add_parser(
        "interpolate",
        parents=[source, heldout, device, overwrite],
        help="latent walks (along mu) between pairs of held-out digits",
    )
    p.add_argument("--pairs", type=int, default=4, help="rows: pairs of digits (default 4: 0-1, 2-3, 4-5, 6-7)")
    p.add_argument("--steps", type=int, default=10, help="decoded points per walk, ends included (default 10)")
    p.add_argument("--out", type=Path, default=Path("interp.png"), help="PNG path (default interp.png)")
    p.set_defaults(func=_interpolate)

    p = sub.add_parser(
        "export", parents=[source], help="weights + config.json, loadable with CVAE.from_pretrained(DIR)"
    )
    p.add_argument("--out", type=Path, required=True, help="a new or empty directory")
    p.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="also upload to the Hugging Face hub (needs network, login)"
    )
    p.add_argument("--private", action="store_true", help="create the hub repository as private")
    p.set_defaults(func=_export)


def _positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={value}: must be a positive integer")


def _seed(seed: int | None) -> None:
    holds, accepted = RULES["train.seed"]  # the trainer's seeds: eval and reconstruct default to the run's
    if seed is not None and not holds(seed):
        raise ConfigError(f"--seed={seed}: must be {accepted}")


def _at_most(images: int, what: str) -> None:
    if images > inference.MAX_IMAGES:
        raise ConfigError(
            f"{what} makes {images:,} digits in one picture; at most {inference.MAX_IMAGES:,} are accepted"
        )


def _load(args: argparse.Namespace, flag: str | None = None, suffix: str = ".png") -> inference.Loaded:
    """The model, once the command's output file (option `flag`, if it writes one) and --device are checked: a
    mistake in either is refused before anything is loaded or written."""
    path = getattr(args, flag.lstrip("-")) if flag else None
    if path is not None:
        home = inference.model_home(args.run, args.checkpoint)
        inference.check_output(path, suffix, args.force, home, flag)
    if getattr(args, "device", None) is not None:
        inference.check_device(args.device)
    return inference.load_model(args.run, args.checkpoint, args.config)


def _save_png(image: torch.Tensor, path: Path) -> None:
    write_safely(lambda tmp: save_grid(image, tmp), path)  # a crash leaves no half PNG


def _heldout(args: argparse.Namespace, loaded: inference.Loaded, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    source, split = args.source or loaded.cfg.data.source, args.split or loaded.cfg.data.eval_split
    pixels, labels = load_split(source, split)
    if len(pixels) < n:
        raise ConfigError(f"{source}:{split} has {len(pixels)} digits; asked for {n}")
    return pixels, labels


def _eval(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    _seed(args.seed)
    result = inference.evaluate(_load(args, "--json", ".json"), args.source, args.split, args.seed, args.precision)
    if PartialState().is_main_process:  # every rank has the reduced figures; one reports them
        print(inference.summary_line(result))
        if args.json:
            write_safely(lambda tmp: tmp.write_text(strict_json.dumps(result, indent=2) + "\n"), args.json)
    return 0


def _sample(args: argparse.Namespace) -> int:
    _positive(n=args.n, columns=args.columns, latent_grid=args.latent_grid)
    _seed(args.seed)
    if args.latent_grid is not None:
        _at_most(args.latent_grid**2, f"--latent-grid {args.latent_grid}")
    else:
        _at_most(args.n, f"--n {args.n}")
    loaded = _load(args, "--out")
    if args.latent_grid is not None:
        images, columns = inference.latent_grid(loaded, args.latent_grid, device=args.device), args.latent_grid
        what = f"{args.latent_grid} x {args.latent_grid} latent grid over [-3, 3]^2"
    else:
        images = inference.sample(loaded, args.n, args.seed, args.device)
        columns = args.columns or math.ceil(math.sqrt(args.n))
        what = f"{args.n} prior samples (seed {args.seed})"
    _save_png(grid(images, columns), args.out)
    print(f"wrote {args.out}: {what} from {loaded.name}")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    _positive(n=args.n, columns=args.columns)
    _seed(args.seed)
    _at_most(args.n, f"--n {args.n}")
    loaded = _load(args, "--out")
    pixels, _ = _heldout(args, loaded, args.n)
    x, recon = inference.reconstruct(loaded, pixels[: args.n], args.seed, args.mean, args.device)
    _save_png(side_by_side(x, recon, min(args.columns, args.n)), args.out)
    print(f"wrote {args.out}: {args.n} held-out digits (left) and their reconstructions (right) from {loaded.name}")
    return 0


def _interpolate(args: argparse.Namespace) -> int:
    _positive(pairs=args.pairs)
    if args.steps < 2:
        raise ConfigError(f"--steps={args.steps}: a walk needs at least 2 points (its two ends)")
    _at_most(args.pairs * (args.steps + 2), f"--pairs {args.pairs} --steps {args.steps}")
    loaded = _load(args, "--out")
    pixels, labels = _heldout(args, loaded, 2)
    images = inference.interpolate(loaded, pixels, labels, args.pairs, args.steps, args.device)
    _save_png(grid(images, args.steps + 2), args.out)
    print(
        f"wrote {args.out}: {args.pairs} latent walks of {args.steps} steps between held-out digits from {loaded.name}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    inference.check_export_dir(args.out)  # before loading, as the other commands' outputs
    loaded = _load(args)
    out = inference.export(loaded, args.out, args.push_to_hub, args.private)
    pushed = f", pushed to https://huggingface.co/{args.push_to_hub}" if args.push_to_hub else ""
    print(f"exported {loaded.weights} to {out}{pushed}; load it with CVAE.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
