"""Profile windows (which steps, on which ranks, agreed how), the step-range key, SIGUSR2, and a window recorded in
process on a tiny computation: the trace, its step markers, no profiler outside the window."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import weakref
from pathlib import Path

import pytest
import torch

from cvae_dist import profiling
from cvae_dist.config import ConfigError, LogConfig, load_config, step_range
from cvae_dist.faults import OutOfMemory, ProfileSignal
from cvae_dist.metrics import code_commit
from cvae_dist.profiling import Profiler, Window, next_window, range_window


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3-5", (3, 5)),
        ("20-25", (20, 25)),
        ("7-7", (7, 7)),
        (" 1 - 2 ", (1, 2)),
        ("5-3", None),
        ("0-2", None),
        ("3", None),
        ("3-", None),
        ("a-b", None),
        ("", None),
        (None, None),
    ],
)
def test_step_range_reads_a_to_b(text, expected):
    assert step_range(text) == expected


@pytest.mark.parametrize("value", ["5-3", "0-2", "3", "3-", "x", "1-2-3"])
def test_a_bad_step_range_is_one_line_naming_the_key_and_the_accepted_form(value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"log.profile_steps={value}"])
    message = str(err.value)
    assert message.startswith(f"log.profile_steps='{value}': must be a step range A-B with 1 <= A <= B, e.g. 20-25")
    assert "\n" not in message


def test_profile_len_must_be_positive_and_the_defaults_profile_nothing_fixed():
    with pytest.raises(ConfigError, match=r"^log.profile_len=0: must be a positive number of steps$"):
        load_config(None, ["log.profile_len=0"])
    log = load_config(None, []).log
    assert (log.profile_steps, log.profile_len) == (None, 5)
    assert load_config(None, ["log.profile_steps=20-25"]).log.profile_steps == "20-25"


def test_a_range_window_records_its_steps_after_a_warmup_step_and_is_cut_at_the_runs_end():
    assert range_window(None, 1, 100) == (None, None)
    assert range_window("20-25", 1, 100) == (Window(20, 25, "log.profile_steps=20-25", True), None)
    window, note = range_window("1-3", 1, 100)  # no step before the first to warm up on
    assert (window.start, window.first, window.warmup, note) == (1, 1, False, None)
    window, note = range_window("90-120", 1, 100)
    assert (window.first, window.last) == (90, 100) and note.endswith("profiling steps 90-100")
    assert range_window("120-130", 1, 100) == (
        None,
        "log.profile_steps=120-130: not profiled: the run ends at step 100",
    )
    window, note = range_window("20-25", 20, 100)  # resumed at step 19: step 20 is next, no warm-up before it
    assert (window.first, window.warmup) == (20, False) and note is None
    assert range_window("20-25", 30, 100)[0] is None  # resumed past it
    assert "this run continues from step 29" in range_window("20-25", 30, 100)[1]


def test_a_requested_window_warms_up_on_the_next_step_and_records_the_steps_after_it():
    assert next_window(10, 5, 100, "SIGUSR2") == Window(12, 16, "SIGUSR2", True)
    assert next_window(10, 5, 14, "SIGUSR2") == Window(12, 14, "SIGUSR2", True)
    assert next_window(10, 5, 11, "SIGUSR2") == Window(11, 11, "SIGUSR2", False)
    assert next_window(10, 5, 10, "SIGUSR2") is None
    w = next_window(4, 2, 15, "SIGUSR2")
    assert (w.start, w.first, w.last) == (5, 6, 7)
    assert w.trace(2) == "profiles/rank2-steps6-7.pt.trace.json.gz"


class Recorder:
    """A RunLogger's note / artifact, and the gather, as the main process of a 1-rank world sees them."""

    def __init__(self):
        self.notes, self.artifacts, self.gathered, self.said = [], [], [], []

    def note(self, record):
        self.notes.append(record)

    def artifact(self, kind, files, metadata, aliases=()):
        self.artifacts.append((kind, files, metadata, list(aliases)))

    def gather(self, obj):
        self.gathered.append(obj)
        return [obj]


def make(tmp_path, recorder, steps=None, last=20, rank=0, **kw) -> Profiler:
    return Profiler(
        LogConfig(profile_steps=steps, **kw),
        tmp_path,
        rank,
        torch.device("cpu"),
        1,
        last,
        gather=recorder.gather,
        logger=recorder,
        say=recorder.said.append,
    )


def tiny_step():
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    torch.nn.functional.conv2d(x, torch.randn(3, 1, 3, 3)).sum().backward()


def test_a_window_records_exactly_its_steps_and_no_profiler_lives_outside_it(tmp_path):
    rec = Recorder()
    profiler = make(tmp_path, rec, "3-4")
    alive, made = {}, []
    for n in range(1, 8):
        with profiler.step(n):
            tiny_step()
            alive[n] = (profiler.prof is not None, torch.autograd.profiler._is_profiler_enabled)
            if profiler.prof is not None and not made:
                made.append(weakref.ref(profiler.prof))
    assert alive == {
        1: (False, False),
        2: (True, False),
        3: (True, True),
        4: (True, True),
        5: (False, False),
        6: (False, False),
        7: (False, False),
    }  # 2: the warm-up, nothing recorded
    assert profiler.step(6) is profiler.step(7) is profiling._NOTHING  # one shared null context, nothing made
    assert made[0]() is None  # the profiler object itself is gone (collected at the window's end)
    path = tmp_path / "profiles" / "rank0-steps3-4.pt.trace.json.gz"
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    markers = sorted(e["name"] for e in events if e.get("cat") == "user_annotation")
    assert markers == ["step 3", "step 4"]
    assert sum(e["name"] == "aten::conv2d" for e in events) == 2  # one per recorded step
    (summary,) = rec.gathered  # one gather, at the window's end
    assert summary["trace"] == "profiles/rank0-steps3-4.pt.trace.json.gz"
    assert any("conv" in row["op"] or "convolution" in row["op"] for row in summary["top_ops"])
    (note,) = rec.notes
    assert (note["event"], note["step"], note["steps"], note["ranks"]) == ("profile", 4, [3, 4], [0])
    ((kind, files, meta, aliases),) = rec.artifacts
    assert (kind, list(files), meta["steps"], aliases) == ("trace", [path.name], [3, 4], ["steps3-4"])
    assert rec.said[0].startswith(f"profile of steps 3-4 (log.profile_steps=3-4): {path}")
    assert "top ops by self CPU time, steps 3-4" in rec.said[0]


def test_a_failure_inside_a_window_writes_nothing_and_gathers_nothing(tmp_path):
    rec = Recorder()
    profiler = make(tmp_path, rec, "2-4")
    with profiler.step(1):
        tiny_step()
    with pytest.raises(ZeroDivisionError), profiler.step(2):
        1 / 0  # noqa: B018
    assert profiler.prof is None and profiler.window is None and rec.gathered == []
    assert not torch.autograd.profiler._is_profiler_enabled and not (tmp_path / "profiles").exists()
    with profiler.step(3):  # training would go on without a profiler
        assert profiler.prof is None


def gathered(profile=(0.0, 0.0)) -> dict[str, torch.Tensor]:
    return {"profile": torch.tensor(profile, dtype=torch.float64)}


def test_a_request_on_any_rank_gives_every_rank_the_same_window_once(tmp_path):
    recs = [Recorder(), Recorder()]
    profilers = [make(tmp_path, recs[r], rank=r, last=100) for r in (0, 1)]
    for p in profilers:
        p.agree(gathered(), 10)
        assert p.window is None
        p.agree(gathered((0.0, 1.0)), 10)  # SIGUSR2 reached rank 1 only
    assert profilers[0].window == profilers[1].window == Window(12, 16, "SIGUSR2", True)
    assert recs[0].said == [
        f"SIGUSR2 (rank 1) at step 10: profiling steps 12-16 on every rank into {tmp_path / 'profiles'}"
    ]
    profilers[0].agree(gathered((1.0, 0.0)), 11)
    assert profilers[0].window.first == 12 and "already due" in recs[0].said[-1]
    p = make(tmp_path, Recorder(), last=10)
    p.agree(gathered((1.0, 0.0)), 10)
    assert p.window is None


def test_a_request_rides_in_the_exchange_as_this_ranks_profile_field_taken_once(tmp_path):
    p = make(tmp_path, Recorder(), last=100)
    p.signal.pending = True  # (as SIGUSR2's handler leaves it)
    assert p.local() == {"profile": 1.0} and p.local() == {"profile": 0.0}
    p.close()


def test_sigusr2_is_a_flag_taken_once_and_the_default_comes_back_after(tmp_path):
    before = signal.getsignal(signal.SIGUSR2)
    with ProfileSignal() as usr2:
        assert not usr2.take()
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert usr2.take() and not usr2.take()
    assert signal.getsignal(signal.SIGUSR2) == before


def test_a_cuda_out_of_memory_error_is_one_line_naming_the_step_and_rank():
    from types import SimpleNamespace

    from cvae_dist.build import Run

    run = SimpleNamespace(state=SimpleNamespace(step=42), accelerator=SimpleNamespace(process_index=3))
    with pytest.raises(OutOfMemory) as err, Run._out_of_memory_named(run):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")
    assert str(err.value) == "CUDA out of memory at step 42 on rank 3: CUDA out of memory. Tried to allocate 2.00 GiB."
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)
    with pytest.raises(ValueError), Run._out_of_memory_named(run):  # any other error passes through as it is
        raise ValueError("x")


def test_the_out_of_memory_error_reaches_the_user_as_one_line_and_exit_1(monkeypatch, capsys):
    from cvae_dist import cli
    from cvae_dist import train as trainer

    message = "CUDA out of memory at step 42 on rank 3: CUDA out of memory. Tried to allocate 2.00 GiB."

    def out_of_memory(_cfg):
        raise OutOfMemory(message)

    monkeypatch.setattr(trainer, "train", out_of_memory)
    assert cli.main(["train"]) == 1
    err = capsys.readouterr().err
    assert err == f"cvae-dist train: error: {message}\n"


def test_the_commit_is_the_checkouts_head_or_none_outside_one(monkeypatch):
    repo = Path(__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert code_commit()["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    monkeypatch.setenv("PATH", "/nonexistent")  # no git
    assert code_commit() == {"commit": None, "dirty": None}


def test_the_profile_event_and_trace_metadata_are_strict_json(tmp_path):
    rec = Recorder()
    p = make(tmp_path, rec, "1-1")
    with p.step(1):
        tiny_step()
    json.dumps(rec.notes[0], allow_nan=False)
    json.dumps(rec.artifacts[0][2], allow_nan=False)
