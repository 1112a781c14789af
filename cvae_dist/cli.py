"""`cvae-dist` command line: train, prepare-data, eval, sample, reconstruct, interpolate, export, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cvae_dist.bench import add_arguments as add_bench_arguments
from cvae_dist.checkpoint import CheckpointError, DiskError
from cvae_dist.config import ConfigError
from cvae_dist.data import DataError
from cvae_dist.distributed import LaunchError
from cvae_dist.faults import INTERRUPTED_EXIT_CODE, NonFiniteLoss, Stopped
from cvae_dist.inference import add_commands
from cvae_dist.prepare_data import DataFormatError

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
    parser = argparse.ArgumentParser(prog="cvae-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a CVAE (run under `accelerate launch` for several processes)")
    p.add_argument("--config", type=Path, help="YAML recipe, e.g. configs/debug.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides: train.epochs=2 data.batch_size=64")

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

    add_commands(sub)  # eval, sample, reconstruct, interpolate, export

    p = sub.add_parser("bench", help="img/s of the framework against a plain PyTorch loop; data pipeline; scaling")
    add_bench_arguments(p)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            from cvae_dist.config import load_config
            from cvae_dist.trainer import train

            try:
                train(load_config(args.config, args.overrides))
            except Stopped as e:
                print(f"cvae-dist train: {e}", file=sys.stderr)
                return e.exit_code
        elif args.command == "prepare-data":
            return _prepare_data(args)
        elif args.command == "bench":
            from cvae_dist.bench import run as run_bench

            return run_bench(args)
        elif hasattr(args, "inference"):
            return args.inference(args)
    except USER_ERRORS as e:
        print(f"cvae-dist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLoss, DiskError) as e:
        print(f"cvae-dist {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cvae-dist {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
