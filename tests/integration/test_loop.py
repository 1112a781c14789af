"""The loop's events in one process: when exchanges are read, where `train.max_steps` leaves a run, what every way
out releases, and what the end-of-run table says of a run too short to measure (train.py)."""

import subprocess
import sys

import pytest
from support.checks import epoch_losses, step_losses
from support.launching import DEBUG

from cvae_dist import step as step_module
from cvae_dist import train as trainer
from cvae_dist.checkpoint import checkpoint_dirs, verify_checkpoint
from cvae_dist.config import load_config

FP32 = ["train.precision=fp32", "log.wandb=disabled", "log.every_steps=5", "train.epochs=2"]


def run(tmp_path, name: str, *overrides: str) -> trainer.TrainResult:
    return trainer.train(load_config(DEBUG, [*FP32, f"output_dir={tmp_path}", f"run_name={name}", *overrides]))


def test_a_step_line_is_read_at_the_next_exchange_so_no_line_waits_for_its_own_gather(tmp_path, monkeypatch):
    # Every exchange is sent, then read at the next one (a step line's or a stop poll's): a GPU that has queued the
    # interval's steps keeps working through a step line. Only a checkpoint or an epoch's end reads it at once.
    reads = []  # (sent at, read at, a step line's)
    read = trainer.read

    def spy(run, seen, started):
        if seen is not None:
            reads.append((seen[0].step, run.state.step, seen[0].line))
        return read(run, seen, started)

    monkeypatch.setattr(trainer, "read", spy)
    result = run(tmp_path, "order", "train.max_steps=33", "checkpoint.every_steps=20")
    lines = [(sent, read) for sent, read, line in reads if line]
    assert [sent for sent, _ in lines] == list(range(5, 31, 5))  # every step line, once
    at_once = {sent for sent, read in lines if read == sent}
    assert at_once == {20}  # the checkpoint's step reads its own; the others wait for the next exchange
    assert all(read > sent for sent, read, _ in reads if sent not in at_once and sent != 33)
    assert list(step_losses(result.run_dir)) == list(range(5, 31, 5))


def test_max_steps_inside_an_epoch_resumes_exactly_where_it_stopped(tmp_path):
    # 35 steps an epoch: max_steps=15 stops inside epoch 1; its checkpoint says so, no epoch line says otherwise, and
    # a resume with more steps continues the same trajectory (fp32: the same additions, bit for bit).
    whole = run(tmp_path, "whole", "train.max_steps=45").run_dir
    part = run(tmp_path, "part", "train.max_steps=15").run_dir
    state = verify_checkpoint(checkpoint_dirs(part)[-1])
    assert (state.step, state.epoch, state.batches_done) == (15, 1, 15)
    assert epoch_losses(part) == {}  # epoch 1 was not trained to its end
    fewer = run(tmp_path, "part", "train.max_steps=10", "resume=auto")  # the mirror: nothing left to train
    assert fewer.epoch_losses == [] and epoch_losses(part) == {} and fewer.steps == 15
    run(tmp_path, "part", "train.max_steps=45", "resume=auto")
    assert step_losses(part) == step_losses(whole)
    assert epoch_losses(part) == epoch_losses(whole) and len(epoch_losses(whole)) == 1


def test_the_run_lock_is_released_when_closing_the_step_raises(tmp_path, monkeypatch):
    def close(self):
        raise RuntimeError("close failed")

    monkeypatch.setattr(step_module.EagerStep, "close", close)
    with pytest.raises(RuntimeError, match="close failed") as failed:
        run(tmp_path, "locked", "train.max_steps=2")
    # another process could take the lock now (a lock this process held would be its own to take again)
    take = "import fcntl, sys; fcntl.lockf(open(sys.argv[1], 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    assert subprocess.run([sys.executable, "-c", take, str(tmp_path / "locked" / ".lock")]).returncode == 0
    del failed  # (its traceback holds the run's parts)
    monkeypatch.undo()
    run(tmp_path, "locked", "train.max_steps=4", "resume=auto")  # and the run continues


def test_a_run_too_short_for_a_step_line_prints_n_a_not_nan(tmp_path, capsys):
    run(tmp_path, "short", "train.max_steps=2")
    table = capsys.readouterr().out.split("per-rank throughput")[1]
    assert "nan" not in table.lower() and "n/a" in table
