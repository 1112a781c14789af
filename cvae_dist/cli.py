"""`cvae-dist` command line: train, prepare-data, eval, sample, reconstruct, interpolate, export."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import textwrap
import time
from pathlib import Path

from cvae_dist.faults import INTERRUPTED_EXIT_CODE, NonFiniteLoss, OutOfMemory, Stopped, hold_profile_requests

hold_profile_requests()  # first: the imports below take seconds, and SIGUSR2 would end the process meanwhile

import datasets  # noqa: E402
import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402

from cvae_dist import inference, strict_json  # noqa: E402
from cvae_dist.checkpoint import CheckpointError  # noqa: E402
from cvae_dist.config import RULES, ConfigError, JobConfig, load_config  # noqa: E402
from cvae_dist.data import DataError, load_split  # noqa: E402
from cvae_dist.distributed import LaunchError  # noqa: E402
from cvae_dist.files import DiskError, write_safely  # noqa: E402
from cvae_dist.images import grid, save_grid, side_by_side  # noqa: E402
from cvae_dist.prepare_data import DataFormatError, convert_mnist, read_csv, read_idx, write_shards  # noqa: E402

# Mistakes in what the user gave us: one line on stderr, exit 2. An error `main` does not name keeps its traceback.
USER_ERRORS = (ConfigError, CheckpointError, DataError, DataFormatError, LaunchError, FileExistsError)
USER_ERRORS += (FileNotFoundError,)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except Stopped as e:  # preempted or interrupted, checkpointed: the exit code tells a scheduler to requeue
        print(f"cvae-dist {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except (*USER_ERRORS, NonFiniteLoss, DiskError, OutOfMemory) as e:
        print(f"cvae-dist {args.command}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, USER_ERRORS) else 1
    except KeyboardInterrupt:
        print(f"cvae-dist {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvae-dist", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a CVAE (under `accelerate launch` for several processes)")
    p.epilog, p.formatter_class = config_sections(), argparse.RawDescriptionHelpFormatter
    p.add_argument("--config", type=Path, help="YAML recipe, e.g. configs/debug.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides: train.epochs=2 data.batch_size=64")
    p.set_defaults(func=_train)

    p = sub.add_parser("prepare-data", help="convert MNIST (CSV, IDX, or the official IDX split) into parquet shards")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", type=Path, help="CSV: 784 pixel columns + label (first or last; .gz ok)")
    src.add_argument("--idx", type=Path, nargs=2, metavar=("IMAGES", "LABELS"), help="MNIST IDX files (.gz ok)")
    official = "the official split: DIR holds its four IDX files, train-* and t10k-* (.gz ok); test = t10k, file order"
    src.add_argument("--mnist", type=Path, metavar="DIR", help=official)
    p.add_argument("--out", type=Path, required=True, help="output directory (absent or empty; written atomically)")
    p.add_argument("--shards", type=int, default=8, help="train shards (default 8: whole shards for 1/2/4/8 ranks)")
    p.add_argument("--heldout-per-class", type=int, help="--csv / --idx: test digits per class (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train shuffle (and of the --csv / --idx draw)")
    p.set_defaults(func=_prepare_data)

    # A trained model's commands (inference.py); their shared options:
    model, device, heldout, force = (argparse.ArgumentParser(add_help=False) for _ in range(4))
    which = model.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", type=Path, help="a run directory, runs/<name>: its model/ export and config.yaml")
    which.add_argument("--checkpoint", type=Path, help="an export or checkpoint directory, or a .safetensors file")
    model.add_argument("--config", type=Path, help="config YAML (a run's or a recipe) for --checkpoint: shape and data")
    device.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    heldout.add_argument("--source", help="data source (default: the run's data.source)")
    heldout.add_argument("--split", help="split (default: the run's data.eval_split)")
    force.add_argument("--force", action="store_true", help="replace an existing output (never one in the model's run)")

    p = sub.add_parser("eval", parents=[model, heldout, force], help="held-out loss (reconstruction, KL) of a model")
    p.add_argument("--seed", type=int, help="noise seed (default: the run's train.seed)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast (default fp32)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.set_defaults(func=_eval)

    p = sub.add_parser("sample", parents=[model, device, force], help="a PNG grid of digits decoded from N(0, I)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--seed", type=int, default=0, help="prior draws seed (default 0)")
    p.add_argument("--columns", type=int, help="grid columns (default: a square grid)")
    side = "2-D latents only: decode a SIDE x SIDE grid over [-3, 3]^2 instead (default 16)"
    p.add_argument("--latent-grid", type=int, nargs="?", const=16, metavar="SIDE", help=side)
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG path (default samples.png)")
    p.set_defaults(func=_sample)

    what = "held-out digits and their reconstructions, side by side"
    p = sub.add_parser("reconstruct", parents=[model, heldout, device, force], help=what)
    p.add_argument("--n", type=int, default=32, help="number of held-out digits (default 32, the first ones)")
    p.add_argument("--columns", type=int, default=8, help="digits per row in each half (default 8)")
    p.add_argument("--seed", type=int, help="noise seed (default: the run's train.seed, as the trainer's figure)")
    p.add_argument("--mean", action="store_true", help="decode mu instead of a noisy z")
    p.add_argument("--out", type=Path, default=Path("recon.png"), help="PNG path (default recon.png)")
    p.set_defaults(func=_reconstruct)

    what = "latent walks (along mu) between pairs of held-out digits"
    p = sub.add_parser("interpolate", parents=[model, heldout, device, force], help=what)
    p.add_argument("--pairs", type=int, default=4, help="rows: pairs of digits (default 4: 0-1, 2-3, 4-5, 6-7)")
    p.add_argument("--steps", type=int, default=10, help="decoded points per walk, ends included (default 10)")
    p.add_argument("--out", type=Path, default=Path("interp.png"), help="PNG path (default interp.png)")
    p.set_defaults(func=_interpolate)

    p = sub.add_parser("export", parents=[model], help="weights + config.json, loadable with CVAE.from_pretrained(DIR)")
    p.add_argument("--out", type=Path, required=True, help="a new or empty directory")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to the Hugging Face hub (network, login)")
    p.add_argument("--private", action="store_true", help="create the hub repository as private")
    p.set_defaults(func=_export)
    return parser


def config_sections() -> str:
    """The config's sections and their keys, for `train --help`."""
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


def _train(args: argparse.Namespace) -> None:
    from cvae_dist.train import train  # (the trainer's imports: only for this command)

    train(load_config(args.config, args.overrides))


def _prepare_data(args: argparse.Namespace) -> None:
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


def _load(args, flag: str | None = None, suffix=".png", images=0, what="", **positive: int | None) -> inference.Loaded:
    """The model, once the arguments are checked (before anything is loaded or written): counts positive, a seed the
    trainer takes, at most MAX_IMAGES digits in the picture, the output file (option `flag`) and --device usable."""
    for name, value in positive.items():
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={value}: must be a positive integer")
    holds, accepted = RULES["train.seed"]  # the trainer's seeds: eval and reconstruct default to the run's
    if getattr(args, "seed", None) is not None and not holds(args.seed):
        raise ConfigError(f"--seed={args.seed}: must be {accepted}")
    if images > (most := inference.MAX_IMAGES):
        raise ConfigError(f"{what} makes {images:,} digits in one picture; at most {most:,} are accepted")
    if (path := getattr(args, flag.lstrip("-")) if flag else None) is not None:
        inference.check_output(path, suffix, args.force, inference.model_home(args.run, args.checkpoint), flag)
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


def _eval(args: argparse.Namespace) -> None:
    r = inference.evaluate(_load(args, "--json", ".json"), args.source, args.split, args.seed, args.precision)
    if PartialState().is_main_process:  # every rank has the reduced figures; one reports them
        print(
            f"{r['model']}: held-out loss {r['loss_per_batch']:,.1f} per batch of {r['batch_size']} "
            f"({r['loss_per_image']:.3f} per image = reconstruction {r['recon_per_image']:.3f} "
            f"+ KL {r['kl_per_image']:.3f}) on {r['source']}:{r['split']}, "
            f"{r['images']:,} images, {r['processes']} process(es), seed {r['seed']}"
        )
        if args.json:
            write_safely(lambda tmp: tmp.write_text(strict_json.dumps(r, indent=2) + "\n"), args.json)


def _sample(args: argparse.Namespace) -> None:
    side = args.latent_grid
    images, what = (side**2, f"--latent-grid {side}") if side else (args.n, f"--n {args.n}")
    loaded = _load(args, "--out", images=images, what=what, n=args.n, columns=args.columns, latent_grid=side)
    if side is not None:
        images, columns = inference.latent_grid(loaded, side, device=args.device), side
        what = f"{side} x {side} latent grid over [-3, 3]^2"
    else:
        images = inference.sample(loaded, args.n, args.seed, args.device)
        columns = args.columns or math.ceil(math.sqrt(args.n))
        what = f"{args.n} prior samples (seed {args.seed})"
    _save_png(grid(images, columns), args.out)
    print(f"wrote {args.out}: {what} from {loaded.name}")


def _reconstruct(args: argparse.Namespace) -> None:
    loaded = _load(args, "--out", images=args.n, what=f"--n {args.n}", n=args.n, columns=args.columns)
    pixels, _ = _heldout(args, loaded, args.n)
    x, recon = inference.reconstruct(loaded, pixels[: args.n], args.seed, args.mean, args.device)
    _save_png(side_by_side(x, recon, min(args.columns, args.n)), args.out)
    print(f"wrote {args.out}: {args.n} held-out digits (left) and their reconstructions (right) from {loaded.name}")


def _interpolate(args: argparse.Namespace) -> None:
    if args.steps < 2:
        raise ConfigError(f"--steps={args.steps}: a walk needs at least 2 points (its two ends)")
    what = f"--pairs {args.pairs} --steps {args.steps}"
    loaded = _load(args, "--out", images=args.pairs * (args.steps + 2), what=what, pairs=args.pairs)
    pixels, labels = _heldout(args, loaded, 2)
    images = inference.interpolate(loaded, pixels, labels, args.pairs, args.steps, args.device)
    _save_png(grid(images, args.steps + 2), args.out)
    walks = f"{args.pairs} latent walks of {args.steps} steps"
    print(f"wrote {args.out}: {walks} between held-out digits from {loaded.name}")


def _export(args: argparse.Namespace) -> None:
    inference.check_export_dir(args.out)  # before loading, as the other commands' outputs
    loaded = _load(args)
    out = inference.export(loaded, args.out, args.push_to_hub, args.private)
    pushed = f", pushed to https://huggingface.co/{args.push_to_hub}" if args.push_to_hub else ""
    print(f"exported {loaded.weights} to {out}{pushed}; load it with CVAE.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    sys.exit(main())
