"""metrics.jsonl and W&B when W&B fails: training goes on, every line kept (metrics.py)."""

import json
import logging
from types import SimpleNamespace

import pytest
from support.checks import lines
from support.launching import DEBUG
from support.wandb_offline import read_run


def tiny_training(tmp_path, name: str, *overrides: str):
    """In process: one epoch of 3 steps on the 500 held-out digits, a step line per step."""
    from cvae_dist.config import load_config
    from cvae_dist.train import train

    args = ["train.epochs=1", "data.train_split=test", "log.every_steps=1", "train.precision=fp32"]
    return train(load_config(DEBUG, [*args, f"output_dir={tmp_path}", f"run_name={name}", *overrides]))


def metrics_warnings(records) -> list[str]:
    return [r.getMessage() for r in records if r.name == "cvae_dist.metrics" and r.levelno >= logging.WARNING]


@pytest.mark.auto_precision
def test_unreachable_wandb_never_stops_training(tmp_path, monkeypatch, caplog, capsys):
    import wandb

    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr("cvae_dist.metrics.WANDB_INIT_TIMEOUT_S", 3)  # W&B retries until then (15 s by default)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    caplog.set_level(logging.WARNING, logger="cvae_dist.metrics")
    result = tiny_training(tmp_path, "offline-net", "log.wandb=online")
    records = lines(result.run_dir)
    assert [r["step"] for r in records if "train/step_loss" in r] == [1, 2, 3]
    epochs = [r for r in records if "train/loss" in r]
    assert [r["epoch"] for r in epochs] == [1]
    warnings = metrics_warnings(caplog.records)
    assert len(warnings) == 1, warnings
    assert "W&B online init failed" in warnings[0] and "falling back to an offline run" in warnings[0]
    assert "W&B: offline run " in capsys.readouterr().out  # the console says where the run went
    # an offline run under the run directory, holding the whole run
    assert len(list((result.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    wb = read_run(result.run_dir)
    assert [row["train/loss"] for row in wb.history if "train/loss" in row] == [epochs[0]["train/loss"]]
    assert [row["step"] for row in wb.history if "train/step_loss" in row] == [1, 2, 3]
    assert wb.config["log"]["wandb"] == "online" and wb.config["world_size"] == 1
    assert wandb.run is None  # finished at the end of training


FAIL_AT = 2  # W&B's Run.log raises on its 2nd call: the step-2 line


@pytest.fixture(scope="module")
def wandb_log_fails(tmp_path_factory):
    """Training in process with log.wandb=offline and W&B's `Run.log` raising on its FAIL_AT-th call. Records every
    call made to it, the metrics logger's warnings, and the W&B run still active when training returned."""
    import wandb
    from wandb.sdk.wandb_run import Run

    calls, real_log = [], Run.log

    def log(self, data, *args, **kwargs):
        calls.append(data.get("step"))
        if len(calls) == FAIL_AT:
            raise ConnectionError("injected: the W&B service went away")
        return real_log(self, data, *args, **kwargs)

    captured = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = captured.append
    logger = logging.getLogger("cvae_dist.metrics")
    logger.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Run, "log", log)
            result = tiny_training(tmp_path_factory.mktemp("runs"), "log-fails", "log.wandb=offline")
            left_active = wandb.run
    finally:
        logger.removeHandler(handler)
    if left_active is not None:  # flush what it holds, and leave no active run to later wandb.init calls here
        left_active.finish()
    return SimpleNamespace(
        run_dir=result.run_dir, calls=calls, warnings=metrics_warnings(captured), left_active=left_active
    )


@pytest.mark.auto_precision
def test_failed_wandb_log_drops_wandb_and_keeps_metrics_jsonl(wandb_log_fails):
    run = wandb_log_fails
    records = lines(run.run_dir)
    assert [r["step"] for r in records if "train/step_loss" in r] == [1, 2, 3]  # training went on, every line kept
    assert [r["epoch"] for r in records if "train/loss" in r] == [1]
    assert (run.run_dir / "model" / "model.safetensors").is_file()
    assert json.loads((run.run_dir / "status.json").read_text())["state"] == "completed"
    assert len(run.warnings) == 1, run.warnings
    assert "W&B log failed" in run.warnings[0] and "injected" in run.warnings[0]
    assert "metrics.jsonl only" in run.warnings[0]
    assert run.calls == [1, 2]  # no W&B call after the failed one: not the step-3 line, the epoch line, the table
    wb = read_run(run.run_dir)
    assert [row["step"] for row in wb.history if "train/step_loss" in row] == [1]
    assert not any("train/loss" in row for row in wb.history)


@pytest.mark.auto_precision
def test_failed_wandb_log_leaves_no_active_run(wandb_log_fails):
    # a dropped run is finished: a later wandb.init in this process (another in-process training) would get it back
    assert wandb_log_fails.left_active is None
