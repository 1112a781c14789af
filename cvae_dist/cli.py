"""`cvae-dist` command line: train, prepare-data, eval, sample, reconstruct, interpolate, export, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cvae_dist.bench import add_arguments as add_bench_arguments
from cvae_dist.checkpoint import CheckpointError
from cvae_dist.config import ConfigError
from cvae_dist.data import DataError
from cvae_dist.distributed import LaunchError
from cvae_dist.faults import REQUEUE_EXIT_CODE, NonFiniteLoss, Preempted
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

    p = sub.add_parser("prepare-data", help="convert MNIST CSV / IDX files into parquet shards")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", type=Path, help="CSV: 784 pixel columns + label (first or last; .gz ok)")
    src.add_argument("--idx", type=Path, nargs=2, metavar=("IMAGES", "LABELS"), help="MNIST IDX files (.gz ok)")
    p.add_argument("--out", type=Path, required=True, help="output directory (must hold no parquet yet)")
    p.add_argument("--shards", type=int, default=8, help="train shards (default 8: whole shards for 1/2/4/8 ranks)")
    p.add_argument("--heldout-per-class", type=int, default=50, help="digits per class in the test split")
    p.add_argument("--seed", type=int, default=0)

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
            except Preempted as e:
                print(f"cvae-dist train: {e}", file=sys.stderr)
                return REQUEUE_EXIT_CODE
            except NonFiniteLoss as e:
                print(f"cvae-dist train: error: {e}", file=sys.stderr)
                return 1
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
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    import datasets

    from cvae_dist.prepare_data import read_csv, read_idx, write_shards

    datasets.disable_progress_bars()
    pixels, labels = read_csv(args.csv) if args.csv else read_idx(*args.idx)
    sizes = write_shards(pixels, labels, args.out, args.shards, args.heldout_per_class, args.seed)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v:,} digits" for k, v in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
