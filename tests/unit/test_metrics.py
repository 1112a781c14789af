"""Where figures go, without a W&B run: the W&B mode rule, metrics.jsonl lines (plain values, a resumed run's
truncation), per-rank records and the parameter digest (metrics.py)."""

import json

import pytest
import torch
from support.checks import lines

from cvae_dist.config import ModelConfig, WandbMode, load_config
from cvae_dist.metrics import RankRecord, RunLogger, parameter_digest, resolve_wandb_mode
from cvae_dist.model import CVAE


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    """No key anywhere: no WANDB_API_KEY, and a home without a .netrc."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def write_netrc(home, host: str) -> None:
    netrc = home / ".netrc"
    netrc.write_text(f"machine {host}\n  login user\n  password secret-key\n")
    netrc.chmod(0o600)  # netrc refuses a password in a file others can read


@pytest.mark.parametrize("env", ["online", "offline", "disabled"])
@pytest.mark.parametrize("configured", list(WandbMode))
def test_wandb_mode_from_the_environment_wins_over_the_config(no_wandb_key, monkeypatch, env, configured):
    monkeypatch.setenv("WANDB_MODE", env)
    assert resolve_wandb_mode(configured) == env


@pytest.mark.parametrize("configured", [WandbMode.online, WandbMode.offline, WandbMode.disabled])
def test_an_explicit_wandb_mode_holds_with_a_key_or_an_unknown_wandb_mode_env(no_wandb_key, monkeypatch, configured):
    monkeypatch.setenv("WANDB_API_KEY", "secret-key")
    assert resolve_wandb_mode(configured) == configured.value
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # not one of W&B's three modes: ignored
    assert resolve_wandb_mode(configured) == configured.value


def test_auto_is_online_only_where_a_key_is_configured(no_wandb_key, monkeypatch):
    assert resolve_wandb_mode(WandbMode.auto) == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_wandb_mode(WandbMode.auto) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "secret-key")
    assert resolve_wandb_mode(WandbMode.auto) == "online"


def test_auto_reads_a_netrc_key_for_the_configured_wandb_host(no_wandb_key, monkeypatch):
    write_netrc(no_wandb_key, "api.wandb.ai")  # what `wandb login` writes
    assert resolve_wandb_mode(WandbMode.auto) == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # a self-hosted server: that key is not its
    assert resolve_wandb_mode(WandbMode.auto) == "offline"
    write_netrc(no_wandb_key, "wandb.example.com")
    assert resolve_wandb_mode(WandbMode.auto) == "online"


def logger(run_dir, rank: int = 0, resume_step: int | None = None) -> RunLogger:
    cfg = load_config(None, ["log.wandb=disabled"])
    return RunLogger(run_dir, cfg, {}, rank=rank, resume_step=resume_step)


def test_metrics_lines_hold_plain_values(tmp_path):
    log = logger(tmp_path)
    third = 1 / 3
    values = {"ratio": third, "train/lr": 3e-7 * third, "train/loss": 12345.678901}
    log.log({"step": 3, "train/step_loss": torch.tensor(2.5), "event": "x", "n": 7, **values})
    log.close()
    (line,) = lines(tmp_path)
    assert line["train/step_loss"] == 2.5 and line["event"] == "x" and line["n"] == 7 and line["step"] == 3
    # 8 significant digits: short lines, and a small lr keeps its figures (rounding to places made 1e-7 a 0)
    assert (line["ratio"], line["train/lr"], line["train/loss"]) == (0.33333333, 1e-7, 12345.679)
    assert isinstance(line["time"], float)


def test_only_the_main_process_writes_metrics_jsonl(tmp_path):
    other = logger(tmp_path, rank=1)
    other.log({"step": 1, "train/step_loss": 1.0, "rank/1/img_per_s": 10.0})
    other.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_resumed_run_drops_the_lines_after_its_step_and_a_partial_last_line(tmp_path):
    written = [{"step": s, "train/step_loss": float(s)} for s in range(1, 7)]
    written.insert(4, {"step": 4, "event": "checkpoint:steps"})
    text = "".join(json.dumps(line) + "\n" for line in written)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 7, "train/st')  # cut off by a kill
    log = logger(tmp_path, resume_step=4)
    assert lines(tmp_path) == [line for line in written if line["step"] <= 4]
    log.log({"step": 5, "train/step_loss": 5.5})
    log.close()
    assert [(x["step"], x.get("train/step_loss")) for x in lines(tmp_path)[-3:]] == [(4, 4.0), (4, None), (5, 5.5)]


def test_a_resumed_run_keeps_every_line_up_to_its_step(tmp_path):
    text = "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(text)
    logger(tmp_path, resume_step=3).close()
    assert (tmp_path / "metrics.jsonl").read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # nothing half-written left


def test_rank_record_counts_steps_and_the_ids_of_each_epoch(tmp_path):
    record = RankRecord(tmp_path, {"rank": 2, "host": "node-a"}, record_ids=True)
    batches = {1: [[4, 1], [7, 0], [3, 9]], 2: [[2, 8], [5, 6]]}
    for epoch, ids in batches.items():
        for b in ids:
            record.batch(torch.tensor(b))
        record.end_epoch(epoch, len(ids))
    record.finish(param_sha256="abc")
    data = json.loads((tmp_path / "ranks" / "rank2.json").read_text())
    assert data["rank"] == 2 and data["host"] == "node-a" and data["param_sha256"] == "abc"
    assert data["steps"] == 5 and data["steps_per_epoch"] == [3, 2]
    assert data["ids"] == {str(e): [i for b in ids for i in b] for e, ids in batches.items()}


def test_rank_record_without_ids_records_none(tmp_path):
    record = RankRecord(tmp_path, {"rank": 0}, record_ids=False)
    record.batch(torch.tensor([1, 2]))
    record.batch(torch.tensor([3, 4]))
    record.end_epoch(1, 2)
    record.finish()
    data = json.loads((tmp_path / "ranks" / "rank0.json").read_text())
    assert "ids" not in data and data["steps"] == 2 and data["steps_per_epoch"] == [2]


def small_model(seed: int = 0) -> CVAE:
    torch.manual_seed(seed)
    return CVAE(ModelConfig(latent_dim=2, filters=8, image_size=16))


def test_parameter_digest_is_equal_for_equal_weights_and_changes_with_one_element():
    a, b = small_model(), small_model()
    assert parameter_digest(a) == parameter_digest(b)
    assert parameter_digest(a) != parameter_digest(small_model(seed=1))
    with torch.no_grad():
        w = b.decoder.out.weight.view(-1)
        w[5] = torch.nextafter(w[5], torch.tensor(1.0))  # the smallest change a float can make
    assert parameter_digest(a) != parameter_digest(b)


def test_parameter_digest_ignores_wrappers_and_memory_format():
    model = small_model()
    wrapped = torch.nn.Module()
    wrapped.module = small_model().to(memory_format=torch.channels_last)  # as DDP names it, as training lays it out
    assert parameter_digest(wrapped) == parameter_digest(model)
