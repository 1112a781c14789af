"""The seed's recipe against configs/mnist_5k_tuned.yaml, side by side on this machine: both trained on the 4,500
shipped training digits for 50 epochs, one after the other, their held-out loss per image (the 500 test digits, KL
weight 1) compared epoch by epoch; a JSON record and a picture of both curves (matplotlib: `pip install matplotlib`).

    .venv/bin/python benchmarks/recipe_compare.py --out /tmp/compare            # train both, then compare
    .venv/bin/python benchmarks/recipe_compare.py --out /tmp/compare --no-train # compare runs already there
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from cvae_dist.distributed import _cpuinfo

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "seed": ["--config", "configs/mnist_5k.yaml", "data.train_split=train"],
    "tuned": ["--config", "configs/mnist_5k_tuned.yaml"],
}
SHOWN = (1, 5, 10, 20, 30, 40, 50)


def held_out(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["epoch"]: r["eval/loss_per_image"] for r in lines if "eval/loss_per_image" in r}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-train", action="store_true", help="compare the runs already in --out")
    args = p.parse_args()
    runs, started = args.out / "runs", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for name, recipe in RECIPES.items():
        if not args.no_train:
            extra = [f"output_dir={runs}", f"run_name={name}", "log.wandb=disabled", "log.images_every_epochs=50"]
            subprocess.run([sys.executable, "-m", "cvae_dist.cli", "train", *recipe, *extra], cwd=REPO, check=True)
    curves = {name: held_out(runs / name) for name in RECIPES}
    print("| epoch | seed's recipe | tuned | tuned / seed |\n|---|---|---|---|")
    for e in SHOWN:
        a, b = curves["seed"].get(e), curves["tuned"].get(e)
        ratio = f"{b / a:.3f}" if a and b else "n/a"
        print(f"| {e} | {a if a is None else f'{a:.2f}'} | {b if b is None else f'{b:.2f}'} | {ratio} |")
    record = {
        "what": "held-out loss per image (500 shipped test digits, KL weight 1), 50 epochs on 4,500 training digits",
        "commands": {n: " ".join(["cvae-dist train", *r]) for n, r in RECIPES.items()},
        "machine": f"{_cpuinfo('model name', platform.machine())}, {len(os.sched_getaffinity(0))} cores",
        "date": started,
        "commit": subprocess.getoutput(f"git -C {REPO} rev-parse --short HEAD"),
        "held_out_per_image": curves,
    }
    (args.out / "recipe_compare.json").write_text(json.dumps(record, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no picture: matplotlib is not installed (pip install matplotlib)")
        return 0
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    labels = {"seed": "the seed's recipe (configs/mnist_5k.yaml)", "tuned": "configs/mnist_5k_tuned.yaml (EMA weights)"}
    for name, label in labels.items():
        ax.plot(list(curves[name]), list(curves[name].values()), label=label)
    title = f"held-out loss per image, 500 digits never trained on ({record['machine']}, {started[:10]})"
    ax.set(xlabel="epoch", ylabel="held-out loss per image (log)", yscale="log", ylim=(70, 300), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "recipe_compare.png")
    print(f"wrote {args.out / 'recipe_compare.png'} and recipe_compare.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
