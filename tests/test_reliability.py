"""Issue 15: every failure is one line on stderr naming what is wrong and what to do (exit 2 for the user's mistake,
1 for a full disk, 130 for Ctrl-C), with no traceback, nothing lost and nothing half-written left behind.

Signals and launches run as real processes (`cvae-dist train`, `accelerate launch`); the other cases call the
command line's `main` in this process. Every run is tiny: the 500 held-out digits as the training split."""

import contextlib
import gc
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cvae_dist import cli
from cvae_dist.checkpoint import checkpoint_dirs, verify_checkpoint
from cvae_dist.data import SHIPPED_DIR
from launch import DEBUG, ENV, REPO, free_port, launch, launch_command

SMALL = ["train.epochs=1", "data.train_split=test", "log.every_steps=1", "log.wandb=disabled"]
FINISHED = ["train.epochs=2", "checkpoint.every_steps=1", "checkpoint.keep=2"]  # 3 steps an epoch: steps 1..6
CVAE_DIST = str(Path(sys.executable).with_name("cvae-dist"))
DDP = ["--config_file", "launch/ddp_cpu.yaml", "--num_processes", "2"]
SHARD = "test-00000-of-00001.parquet"


# ---- helpers ---------------------------------------------------------------------------------------------------


def train_argv(out: Path, name: str, *overrides: str) -> list[str]:
    return ["train", "--config", str(DEBUG), f"output_dir={out}", f"run_name={name}", *SMALL, *overrides]


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """`cvae-dist <argv>` in this process: its exit code and what it wrote to stderr."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(err: str, *fragments: str) -> str:
    """The single line on stderr (no traceback), holding every fragment."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, f"expected one line on stderr, got:\n{err}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` and a digest of each file's bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def leftovers(root: Path) -> list[str]:
    """Half-written files or folders: a partial checkpoint, image or status."""
    return [str(p) for p in root.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def _sh(*cmd) -> bool:
    return subprocess.run([str(c) for c in cmd], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    gc.collect()  # a run that failed in this process may still hold a file open there
    if not _sh("umount", path):
        _sh("umount", "-l", path)


@contextlib.contextmanager
def read_only(path: Path):
    """Make the directory `path` unwritable for this user. Root ignores permission bits (os.access says yes after a
    chmod), so as root: a read-only bind mount of it, else `chattr +i`; skipped when neither is possible."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
    elif _sh("mount", "--bind", path, path):
        try:
            if not _sh("mount", "-o", "remount,ro,bind", path):
                pytest.skip(f"cannot remount {path} read-only (mount -o remount,ro,bind failed)")
            assert not os.access(path, os.W_OK)
            yield
        finally:
            _umount(path)
    elif _sh("chattr", "+i", path):
        try:
            assert not os.access(path, os.W_OK)
            yield
        finally:
            _sh("chattr", "-i", path)
    else:
        pytest.skip("root bypasses permission bits, and neither a read-only bind mount (needs CAP_SYS_ADMIN) nor "
                    "chattr +i (needs a filesystem that supports it) works here")  # fmt: skip


@contextlib.contextmanager
def small_disk(path: Path, kib: int):
    """A tmpfs of `kib` KiB at `path`: a disk that fills up. Needs root (mount); skipped otherwise."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, and mounting one needs root")
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True,
                            text=True)  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed ({result.stderr.strip()}): cannot simulate a full disk")
    try:
        yield path
    finally:
        _umount(path)


def corrupt(file: Path, how: str) -> None:
    """`half`: the file cut to half its size (a copy that stopped early). `overwritten`: 100 bytes in the middle
    overwritten (bad sectors, a bit-flipping transfer); they cover a value's length prefix, as corruption there
    breaks the page for pyarrow rather than one image."""
    data = bytearray(file.read_bytes())
    if how == "half":
        del data[len(data) // 2 :]
    else:
        at = data.find(b"\x89PNG", len(data) // 2) - 4  # the length prefix of a PNG value mid-file
        data[at - 48 : at + 52] = b"\xff" * 100
    file.write_bytes(bytes(data))


def corrupt_source(root: Path, how: str) -> Path:
    """A data source whose training shard (the 500 held-out digits) is corrupt; its test split is intact."""
    root.mkdir()
    shutil.copy(SHIPPED_DIR / SHARD, root / SHARD)
    shutil.copy(SHIPPED_DIR / SHARD, root / "train-00000-of-00001.parquet")
    corrupt(root / "train-00000-of-00001.parquet", how)
    return root


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_strays():
    """A test that fails while its training runs leaves no processes behind (only those it started)."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(proc.pid) == proc.pid:  # a launch in its own session: the launcher and its workers
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            proc.wait()


def start(tmp_path: Path, name: str, overrides: list[str], ddp: bool = False, **popen) -> subprocess.Popen:
    """`cvae-dist train` (or a 2-process `accelerate launch`, in a session of its own as a terminal's job is)."""
    if ddp:
        cmd = launch_command(tmp_path, name, DDP, [*SMALL, *overrides])
        popen["start_new_session"] = True
    else:
        cmd = [CVAE_DIST, *train_argv(tmp_path, name, *overrides)]
    with (tmp_path / f"{name}.log").open("w") as log:
        STARTED.append(subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, **popen))
    return STARTED[-1]


def wait_until(proc: subprocess.Popen, what: str, ready, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            if ready():
                return
        assert proc.poll() is None, f"ended ({proc.returncode}) before {what}"
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no {what} within {timeout} s")


def logged(run_dir: Path, test) -> bool:
    return any(test(r) for r in lines(run_dir))


def output(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.log").read_text()


def assert_interrupted(run_dir: Path, before_step: int) -> int:
    """status.json says interrupted (exit code 130) at a step whose checkpoint is complete; returns that step."""
    st = status(run_dir)
    assert st["state"] == "interrupted" and st["exit_code"] == 130, st
    assert 0 < st["step"] < before_step
    assert verify_checkpoint(run_dir / "checkpoints" / f"step-{st['step']:09d}").step == st["step"]
    assert not (run_dir / "model").exists() and not leftovers(run_dir)  # stopped early, nothing half-written
    return st["step"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-process run of 2 epochs (steps 1..6), checkpointed every step, keeping the newest 2."""
    out = tmp_path_factory.mktemp("finished")
    assert cli.main(train_argv(out, "run", *FINISHED)) == 0
    return out / "run"


def copy_of(run_dir: Path, tmp_path: Path, name: str = "run") -> Path:
    shutil.copytree(run_dir, tmp_path / name, symlinks=True)
    return tmp_path / name


# ---- Ctrl-C and signals (real processes) -------------------------------------------------------------------------


@pytest.mark.multiprocess  # (real processes under a real SIGINT)
@pytest.mark.parametrize("ddp", [False, True], ids=["single-process", "ddp-2-processes"])
def test_ctrl_c_after_the_first_epoch_checkpoints_and_stops(tmp_path, ddp):
    # The user watches epoch 1 finish and presses Ctrl-C in the terminal: the terminal sends SIGINT to the whole
    # foreground process group (the launcher and its workers under accelerate launch).
    proc = start(tmp_path, "run", ["train.epochs=3", "data.batch_size=32"], ddp=ddp)  # 15 steps an epoch
    run_dir = tmp_path / "run"
    wait_until(proc, "the end of epoch 1", lambda: logged(run_dir, lambda r: "train/loss" in r))
    if ddp:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    out = output(tmp_path, "run")
    step = assert_interrupted(run_dir, 45)
    assert step > 15, "stopped in epoch 2, after the signal"
    assert "Ctrl-C: checkpointing at the next step line" in out
    if ddp:  # torchrun exits 1 whatever its workers said: status.json carries the code
        assert proc.returncode != 0
        assert out.count(f"cvae-dist train: stopped on SIGINT at step {step}") == 2, out[-4000:]
        # The only traceback is the launcher's own (torchrun's SignalException); none from the trainer's code.
        assert f'File "{REPO / "cvae_dist"}' not in out, out[-4000:]
    else:
        assert proc.returncode == 130, out[-4000:]
        assert f"stopped on SIGINT at step {step}; checkpoint {run_dir}/checkpoints/step-{step:09d}; rerun with " \
               "resume=auto" in out  # fmt: skip
        assert "Traceback" not in out, out


@pytest.mark.multiprocess  # (a real `cvae-dist train` process under a real SIGINT)
@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["terminal", "started-with-sigint-ignored"])
def test_ctrl_c_during_the_first_epoch_checkpoints_and_stops(tmp_path, sigint_ignored):
    # Ctrl-C in the middle of epoch 1. `started-with-sigint-ignored`: the job was started as `cmd &` from a script
    # (a non-interactive shell starts background jobs with SIGINT ignored), and the user then sends it SIGINT
    # (`kill -INT`): it must still checkpoint and stop, not ignore the signal.
    popen = {"preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)} if sigint_ignored else {}
    proc = start(tmp_path, "run", ["train.epochs=2", "data.batch_size=32"], **popen)
    run_dir = tmp_path / "run"
    wait_until(proc, "step 2", lambda: logged(run_dir, lambda r: r.get("step", 0) >= 2))
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    out = output(tmp_path, "run")
    assert proc.returncode == 130, out[-4000:]
    assert_interrupted(run_dir, 15)  # still in epoch 1
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert out.rstrip().splitlines()[-1].startswith("cvae-dist train: stopped on SIGINT at step")


@pytest.mark.multiprocess
def test_a_second_ctrl_c_more_than_3_s_later_exits_at_once(tmp_path):
    # The user pressed Ctrl-C, the run said it checkpoints at the next step line, but that line is far away (a long
    # log interval): a second Ctrl-C a few seconds later quits at once, without waiting for the checkpoint.
    overrides = ["train.epochs=50", "log.every_steps=1000", "checkpoint.every_epoch=false"]
    proc = start(tmp_path, "run", overrides)
    wait_until(proc, "training to start", lambda: (tmp_path / "run" / "metrics.jsonl").exists())  # opened once armed
    proc.send_signal(signal.SIGINT)
    # the grace period counts from when the handler ran, which a busy machine can delay by a step or more
    wait_until(proc, "the first Ctrl-C's answer", lambda: "Ctrl-C: checkpointing" in output(tmp_path, "run"))
    time.sleep(3.5)
    assert proc.poll() is None, "the first Ctrl-C must wait for the checkpoint, not quit"
    proc.send_signal(signal.SIGINT)
    second = time.monotonic()
    proc.wait(timeout=30)
    elapsed = time.monotonic() - second
    out = output(tmp_path, "run")
    assert proc.returncode == 130, out[-4000:]
    assert elapsed < 3, f"took {elapsed:.1f} s after the second Ctrl-C"
    assert out.count("Ctrl-C: checkpointing at the next step line") == 1
    assert out.rstrip().splitlines()[-1] == "Ctrl-C again: stopped at once, without a checkpoint (resume=auto " \
                                           "continues from the last one)"  # fmt: skip
    assert checkpoint_dirs(tmp_path / "run") == [] and not leftovers(tmp_path / "run")


# ---- mistakes in what the user gave: one line, exit 2, nothing written -------------------------------------------


def test_yaml_syntax_error_is_one_line_naming_file_line_and_column(tmp_path, capsys):
    # A recipe edited by hand with a broken indentation.
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n log:\n  every_steps: [1\n")
    code, err = run_cli(capsys, ["train", "--config", bad, f"output_dir={tmp_path}"])
    assert code == 2
    one_line(err, f"{bad}:3:", "YAML syntax error")


def test_hub_source_without_network_fails_fast_in_one_line(tmp_path, capsys, monkeypatch):
    # A hub dataset id on a compute node without internet: seconds, not half a minute of retries, and the way out.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing answers there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    started = time.monotonic()
    code, err = run_cli(capsys, train_argv(tmp_path, "run", "data.source=some/hubid"))
    elapsed = time.monotonic() - started
    assert code == 2 and elapsed < 10, f"exit {code} after {elapsed:.1f} s"
    one_line(err, "data.source=some/hubid", "prepare-data", "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("on_bad_record", ["error", "skip"])
@pytest.mark.parametrize("how", ["half", "overwritten"])
def test_a_corrupt_shard_is_one_line_naming_it(tmp_path, capsys, how, on_bad_record):
    # A shard cut short by an interrupted copy, or with 100 bytes overwritten: named, whatever on_bad_record says
    # (skip drops bad records, not unreadable files).
    source = corrupt_source(tmp_path / "data", how)
    argv = train_argv(tmp_path, "run", f"data.source={source}", "data.train_split=train",
                      f"data.on_bad_record={on_bad_record}")  # fmt: skip
    code, err = run_cli(capsys, argv)
    assert code == 2
    line = one_line(err, "replace or re-create it")
    assert line.startswith(f"cvae-dist train: error: {source / 'train-00000-of-00001.parquet'}: ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["missing-source", "empty-source", "unknown-train-split", "unknown-eval-split",
                                  "corrupt-shard"])  # fmt: skip
def test_a_config_error_leaves_no_run_directory_and_the_name_free(tmp_path, capsys, case):
    # The user gets the data settings wrong, reads the error, fixes them and reruns with the same run_name.
    good = tmp_path / "data"
    good.mkdir()
    shutil.copy(SHIPPED_DIR / SHARD, good / SHARD)
    bad = {
        "missing-source": [f"data.source={tmp_path / 'nosuch'}"],
        "empty-source": [f"data.source={tmp_path / 'empty'}"],
        "unknown-train-split": [f"data.source={good}", "data.train_split=nosuch"],
        "unknown-eval-split": [f"data.source={good}", "data.eval_split=nosuch"],
        "corrupt-shard": [f"data.source={corrupt_source(tmp_path / 'corrupt', 'half')}", "data.train_split=train"],
    }[case]
    (tmp_path / "empty").mkdir()
    runs = tmp_path / "runs"
    code, err = run_cli(capsys, train_argv(runs, "run", *bad))
    assert code == 2
    one_line(err)
    assert not (runs / "run").exists() and not leftovers(tmp_path)
    if case == "corrupt-shard":  # no directory means a free name; shown once, with a real rerun
        code, err = run_cli(capsys, train_argv(runs, "run", f"data.source={good}", "train.max_steps=1"))  # fixed
        assert code == 0, err
        assert status(runs / "run")["state"] == "completed"


@pytest.mark.parametrize("argv", [["sample", "--n", "100000"], ["sample", "--latent-grid", "100"],
                                  ["reconstruct", "--n", "5000"], ["interpolate", "--pairs", "1000"]],
                         ids=["sample", "latent-grid", "reconstruct", "interpolate"])  # fmt: skip
def test_too_many_images_are_refused_at_once(finished, tmp_path, capsys, argv):
    # A typo of a few zeros: refused in one line before anything is decoded (it took 46 s and 21.8 GB, then died).
    started = time.monotonic()
    code, err = run_cli(capsys, [*argv, "--run", finished, "--out", tmp_path / "x.png"])
    assert code == 2 and time.monotonic() - started < 5
    one_line(err, "at most 4,096")
    assert not list(tmp_path.iterdir())


def test_an_unwritable_output_directory_is_refused_before_training(tmp_path, capsys):
    # output_dir on a read-only share (or one the user may not write to).
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out):
        for output_dir in (out, out / "runs"):
            code, err = run_cli(capsys, train_argv(output_dir, "run"))
            assert code == 2
            one_line(err, f"{out} is not writable")
    assert not list(out.iterdir())


def test_resume_with_read_only_checkpoints_is_refused_before_training(finished, tmp_path, capsys):
    # resume=auto where checkpoints/ became read-only (a quota, a read-only remount): refused at once, rather than
    # after an epoch of training that could not be saved.
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    with read_only(run / "checkpoints"):
        started = time.monotonic()
        code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, "train.epochs=3", "resume=auto"))
        assert code == 2 and time.monotonic() - started < 30
        one_line(err, f"{run / 'checkpoints'} is not writable")
    assert snapshot(run) == before


def test_resume_with_another_model_shape_is_refused_and_changes_nothing(finished, tmp_path, capsys):
    # resume=auto with model.latent_dim=16 on a latent-8 run: refused, and the run (its config.yaml included)
    # stays byte for byte as it was.
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, "resume=auto", "model.latent_dim=16"))
    assert code == 2
    one_line(err, "written for model", "'latent_dim': 8", "'latent_dim': 16")
    assert snapshot(run) == before


@pytest.mark.multiprocess
def test_resume_with_another_world_size_is_refused_and_changes_nothing(finished, tmp_path):
    # A 1-process run resumed by a 2-process launch would change which digits each step sees: refused on every
    # rank, naming the world size to relaunch with; the run is untouched.
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    result = launch(tmp_path, "run", DDP, [*SMALL, *FINISHED, "resume=auto"], check=False)
    assert result.returncode != 0
    refusal = "written by 1 rank(s) x 128 images; resuming with 2 x 64"
    assert result.output.count(refusal) == 2, result.output[-4000:]  # one line from each rank
    assert "Relaunch with 1 processes" in result.output
    assert f'File "{REPO / "cvae_dist"}' not in result.output, result.output[-4000:]  # no traceback of ours
    assert snapshot(run) == before


# ---- a full disk: one line, exit 1, nothing half-written ---------------------------------------------------------


@pytest.mark.parametrize("what", ["epoch-image", "metrics-line", "final-export"])
def test_disk_full_while_writing(tmp_path, capsys, caplog, what):
    # The disk fills up as the epoch's figure (~580 KB) is written, as a step line is appended to metrics.jsonl,
    # or as the final model (~600 KB) is exported after the last checkpoint (~1.8 MB).
    kib, overrides, file = {
        "epoch-image": (256, [], "images/epoch_001.png"),
        "metrics-line": (12, ["data.batch_size=32"], "metrics.jsonl"),  # 4 KiB pages: full after a few lines
        "final-export": (2700, [], "model"),
    }[what]
    with small_disk(tmp_path / "disk", kib) as disk:
        run = disk / "run"
        code, err = run_cli(capsys, train_argv(disk, "run", *overrides))
        assert code == 1
        line = one_line(err, f"could not write {run / file}: No space left on device;", "MB free there")
        assert not leftovers(disk)
        if what == "final-export":  # no half export; the weights are safe in the last checkpoint
            assert not (run / "model").exists() and not list((run / "checkpoints").glob(".*"))
            assert verify_checkpoint(run / "checkpoints" / "step-000000003").step == 3
        else:
            assert not list((run / "images").iterdir())
        assert all(isinstance(r, dict) for r in lines(run))  # whole lines only: no half line at the end
        st = status(run)
        if what != "metrics-line":  # the partial file gone, status.json had room to say what happened
            assert st["state"] == "failed" and line.split("error: ", 1)[1] in st["error"]
        else:  # not even status.json's few bytes fit: it keeps its previous content, and a warning says so
            assert st["state"] == "running"
            assert f"could not write {run / 'status.json'}" in caplog.text
            assert "it still says what it said before" in caplog.text


def test_disk_full_during_a_checkpoint(tmp_path, capsys):
    # The disk fills up while the checkpoint of step 2 (~1.8 MB) is written; step 1's fitted.
    with small_disk(tmp_path / "disk", 2600) as disk:
        run = disk / "run"
        code, err = run_cli(capsys, train_argv(disk, "run", "checkpoint.every_steps=1"))
        assert code == 1
        line = one_line(err, f"could not write {run / 'checkpoints' / 'step-000000002'}: No space left on device;",
                        "MB free there")  # fmt: skip
        assert not leftovers(disk), leftovers(disk)  # no .partial-step-*, no .status.json.tmp
        # The partial checkpoint is gone, so status.json had room to say what happened.
        st = status(run)
        assert st["state"] == "failed" and line.split("error: ", 1)[1] in st["error"]
        assert [d.name for d in checkpoint_dirs(run)] == ["step-000000001"]
        assert verify_checkpoint(checkpoint_dirs(run)[0]).step == 1  # the earlier checkpoint is untouched


# ---- checkpoints: keep, corrupt, explicit resume -----------------------------------------------------------------


def test_checkpoint_keep_leaves_only_the_newest(finished):
    # checkpoint.keep=2 on a run that checkpointed at each of its 6 steps: a bounded disk footprint.
    assert [d.name for d in checkpoint_dirs(finished)] == ["step-000000005", "step-000000006"]
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["step-000000005", "step-000000006"]


def test_resume_after_a_corrupt_newest_checkpoint_replaces_it(finished, tmp_path, capsys):
    # The newest checkpoint fails its checksum (a node died while the file server flushed it): resume=auto falls
    # back to the previous one, moves the bad one aside, writes a good one in its place, and logs every step once.
    run = copy_of(finished, tmp_path)
    weights = run / "checkpoints" / "step-000000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, "resume=auto"))
    assert code == 0, err
    assert (run / "checkpoints" / "step-000000006.corrupt").is_dir()
    assert [d.name for d in checkpoint_dirs(run)] == ["step-000000005", "step-000000006"]
    assert verify_checkpoint(run / "checkpoints" / "step-000000006").step == 6
    records = lines(run)
    assert [r["step"] for r in records if "train/step_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in records if "train/loss" in r] == [1, 2]
    assert same_weights(run, finished)  # exactly where the uninterrupted run ended


def test_resume_from_an_explicit_checkpoint_continues_from_it(finished, tmp_path, capsys):
    # resume=<checkpoint dir>: continue from the checkpoint the user names (here an older one than the newest).
    run = copy_of(finished, tmp_path)
    started = time.time()
    checkpoint = run / "checkpoints" / "step-000000005"
    code, err = run_cli(capsys, train_argv(tmp_path, "run", *FINISHED, f"resume={checkpoint}"))
    assert code == 0, err
    records = [r for r in lines(run) if "train/step_loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["time"] >= started > records[-2]["time"]  # step 6 trained again, from step 5
    assert same_weights(run, finished)


def test_a_run_without_export_is_sampled_from_its_newest_good_checkpoint(finished, tmp_path, capsys):
    # A run stopped before its export, whose newest checkpoint failed its checksum and was set aside by a resume
    # (`step-N.corrupt`, written last): `sample --run` takes the newest good checkpoint, not the corrupt one.
    run = copy_of(finished, tmp_path)
    shutil.rmtree(run / "model")
    newest = run / "checkpoints" / "step-000000006"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    newest.rename(newest.with_name(newest.name + ".corrupt"))
    code, err = run_cli(capsys, ["sample", "--run", run, "--n", "4", "--out", tmp_path / "samples.png"])
    assert code == 0, err
    assert (tmp_path / "samples.png").is_file()
