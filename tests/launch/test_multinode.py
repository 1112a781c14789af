"""The lr at 2 ranks, and `launch/multi_node.yaml` as actually launched: one launcher per "machine", on this host."""

import json
import os
import signal
import subprocess

import pytest
import torch
from support.checks import LR, ONE_STEP, TINY, check_lr
from support.launching import ENV, REPO, free_port, launch, launch_command
from support.wandb_offline import read_run


def test_the_lr_is_the_recipes_at_two_ranks(tmp_path):
    # The global batch is the recipe's at any world size, so its lr is too (no linear scaling rule).
    ddp = ["--config_file", "launch/ddp_cpu.yaml", "--num_processes", "2"]
    run = launch(tmp_path, "lr", ddp, ONE_STEP)
    check_lr(run.run_dir, 2, LR)


def launch_two_machines(tmp_path, name: str, gpu_ids: list[str], overrides: list[str], timeout: float = 300):
    """Two `accelerate launch --config_file launch/multi_node.yaml` launchers started together, machine ranks 0 and
    1, rendezvous at 127.0.0.1:<free port>; returns [(returncode, output)] by machine rank.

    accelerate takes a config file's value only where its own flag default is None: `--rdzv_backend` defaults to
    `static`, so the config's `rdzv_backend: c10d` (and `same_network`) never reach torchrun, and this launch is a
    static rendezvous at main_process_ip:port where node rank = --machine_rank. `--rdzv_backend static` is therefore
    not needed (it changes nothing); the machine-rank assertions below hold only under a static rendezvous."""
    port = str(free_port())
    procs = []
    for machine in (0, 1):
        launcher = [
            "--config_file",
            "launch/multi_node.yaml",
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(machine),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            *gpu_ids,
        ]
        cmd = launch_command(tmp_path, name, launcher, overrides)
        env = {**ENV, "OMP_NUM_THREADS": "1"}  # two one-core "machines" on this two-core host
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    results = []
    try:
        for proc in procs:
            output, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, output))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        outputs = "\n".join(p.communicate()[0][-3000:] for p in procs)
        raise AssertionError(f"{name}: no result within {timeout} s (hang?)\n{outputs}") from None
    return results


def test_multi_node_yaml_two_launchers(tmp_path):
    # `--gpu_ids=-1,-1` marks a CPU launch (CUDA_VISIBLE_DEVICES=-1,-1). Written with "=": accelerate's argparse
    # reads a separate "-1,-1" as an option and stops with "argument --gpu_ids/--gpu-ids: expected one argument".
    args = [*TINY, "log.sample_ids=true"]  # 3 steps of 2 x 64
    results = launch_two_machines(tmp_path, "two-machines", ["--gpu_ids=-1,-1"], args)
    for machine, (returncode, output) in enumerate(results):
        assert returncode == 0, f"machine {machine} exited {returncode}:\n{output[-6000:]}"
    run_dir = tmp_path / "two-machines"
    ranks = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and read_run(run_dir).config["world_size"] == 2
    assert [(r["rank"], r["machine_rank"], r["local_rank"]) for r in ranks] == [(0, 0, 0), (1, 1, 0)]
    assert [r["steps"] for r in ranks] == [3, 3]
    ids = [set(r["ids"]["1"]) for r in ranks]
    assert len(ids[0]) == len(ids[1]) == 3 * 64 and not ids[0] & ids[1]  # disjoint shares of the global batch
    digests = {r["param_sha256"] for r in ranks}
    assert len(digests) == 1 and None not in digests  # DDP kept both machines' weights bit-identical


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_multi_node_yaml_without_gpu_ids_is_refused_without_cuda(tmp_path):
    results = launch_two_machines(tmp_path, "no-gpu-ids", [], ["train.epochs=1"], timeout=180)
    for returncode, output in results:
        errors = [x for x in output.splitlines() if x.startswith("cvae-dist train: error:")]
        assert returncode != 0 and errors and "asks for GPUs" in errors[0] and "CUDA is unusable here" in errors[0]
    assert not (tmp_path / "no-gpu-ids").exists()
