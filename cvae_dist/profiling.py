"""Profiling when it matters: `torch.profiler` traces (and, on CUDA, memory snapshots) of chosen steps, one file per
rank in the run directory's `profiles/`.

A `Window` of steps is recorded on every rank, or on the ranks it names:

- `log.profile_steps=A-B`: steps A..B, every rank;
- SIGUSR2 to any rank (`faults.ProfileSignal`): the next `log.profile_len` steps, every rank;
- a straggler (`log.profile_stragglers`): the flagged rank and the median rank, the next `log.profile_len` steps, at
  most once per `log.straggler_alert_every_s`.

A request is agreed on in an exchange every rank takes at the same step anyway (the step line's gather, the stop
poll's: `distributed.StopPoll` carries `Profiler.local()` and calls `Profiler.agree`), so every rank knows every
window, the recording ranks record the same steps, and all ranks end it together (one `gather` of the summaries,
once per window). Outside a window no profiler object exists: `Profiler.step(n)` is a shared null context.

Each step of a window is marked `step <n>` (`record_function`) in the trace; the step before the first is the
profiler's warm-up (not recorded) where there is one. What lands between the markers (waiting for the next batch,
a step line's gather) is recorded too, unmarked.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from cvae_dist.config import step_range
from cvae_dist.files import write_safely

PROFILES = "profiles"  # in the run directory
TRACE_SUFFIX = ".pt.trace.json.gz"  # Chrome trace, gzipped; TensorBoard's profiler plugin reads *.pt.trace.json.gz
MEMORY_SUFFIX = ".memory.pickle"  # torch.cuda.memory._dump_snapshot: open it at https://pytorch.org/memory_viz
MEMORY_ENTRIES = 100_000  # allocator events kept by the memory history
TOP_OPS = 10  # rows of the top-operators table (metrics.jsonl); the console shows the first 8
MARKERS = ("step ", "ProfilerStep#")  # our step markers (and torch's own), left out of the operator table

_NOTHING = contextlib.nullcontext()  # what `step` returns outside a window: nothing is made or kept


@dataclass(frozen=True)
class Window:
    """Steps `first`..`last` recorded on `ranks` (None: every rank). `warmup`: the step before `first` warms the
    profiler up (not recorded)."""

    first: int
    last: int
    trigger: str  # what asked for it: "log.profile_steps=A-B", "SIGUSR2" or "straggler"
    ranks: tuple[int, ...] | None = None
    warmup: bool = True

    @property
    def start(self) -> int:
        """The step the profiler is made at: the warm-up step, else the first recorded one."""
        return self.first - 1 if self.warmup else self.first

    def records(self, rank: int) -> bool:
        return self.ranks is None or rank in self.ranks

    def trace(self, rank: int) -> str:
        """Rank `rank`'s trace file, relative to the run directory."""
        return f"{PROFILES}/rank{rank}-steps{self.first}-{self.last}{TRACE_SUFFIX}"

    def memory(self, rank: int) -> str:
        return f"{PROFILES}/rank{rank}-steps{self.first}-{self.last}{MEMORY_SUFFIX}"


def range_window(steps: str | None, next_step: int, last_step: int) -> tuple[Window | None, str | None]:
    """The window `log.profile_steps` asks for in a run whose next step is `next_step` and whose last is
    `last_step`, and a note where it is cut short or cannot be recorded (None where there is nothing to say)."""
    if steps is None:
        return None, None
    first, last = step_range(steps)  # the config has checked it
    key = f"log.profile_steps={steps}"
    if first < next_step:
        return None, f"{key}: not profiled: this run continues from step {next_step - 1}"
    if first > last_step:
        return None, f"{key}: not profiled: the run ends at step {last_step}"
    note = None
    if last > last_step:
        note, last = f"{key}: the run ends at step {last_step}: profiling steps {first}-{last_step}", last_step
    return Window(first, last, key, None, warmup=first - 1 >= next_step), note


def next_window(step: int, length: int, last_step: int, trigger: str, ranks: tuple[int, ...] | None = None):
    """The window agreed at `step`'s exchange: a warm-up step, then `length` steps (cut at `last_step`); without the
    warm-up where only one step is left; None where none is."""
    if step + 1 > last_step:
        return None
    if step + 2 > last_step:
        return Window(step + 1, step + 1, trigger, ranks, warmup=False)
    return Window(step + 2, min(step + 1 + length, last_step), trigger, ranks, warmup=True)


def median_rank(rates: list[float], flagged: Iterable[int]) -> int:
    """The rank whose rate is nearest the median of all ranks' (not a flagged one; ties: the lowest rank)."""
    median = statistics.median(rates)
    flagged = set(flagged)
    candidates = [r for r in range(len(rates)) if r not in flagged] or list(range(len(rates)))
    return min(candidates, key=lambda r: (abs(rates[r] - median), r))


def top_ops(prof: torch.profiler.profile, cuda: bool, n: int = TOP_OPS) -> tuple[list[dict], float]:
    """The `n` operators with the most self time (on CUDA: device time) over the recorded steps, and the self time of
    all of them (ms)."""
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [(e, getattr(e, attr)) for e in prof.key_averages() if not e.key.startswith(MARKERS)]
    total = sum(t for _, t in events)
    rows = []
    for e, t in sorted(events, key=lambda et: et[1], reverse=True)[:n]:
        row = {"op": e.key, "self_ms": round(t / 1e3, 3), "share": round(t / (total or 1.0), 4), "calls": e.count}
        if cuda:
            row["self_cpu_ms"] = round(e.self_cpu_time_total / 1e3, 3)
        rows.append(row)
    return rows, round(total / 1e3, 3)


def ops_table(summary: dict, rows: int = 8) -> str:
    """A rank's top operators as console lines."""
    where = "device" if summary.get("cuda") else "CPU"
    lines = [f"  rank {summary['rank']}: top ops by self {where} time, steps {summary['steps'][0]}-"
             f"{summary['steps'][1]} ({summary['self_ms_total']:,.1f} ms in all)"]  # fmt: skip
    for row in summary["top_ops"][:rows]:
        lines.append(f"    {row['op'][:44]:<44} {row['self_ms']:>10,.1f} ms {100 * row['share']:>5.1f}% "
                     f"{row['calls']:>6} calls")  # fmt: skip
    return "\n".join(lines)


class Profiler:
    """This rank's profile windows: which steps to record (`step`), what the exchanges carry and agree on (`local`,
    `agree`, `on_stragglers`), and at a window's end the trace (and memory snapshot) files, the top-operators table
    (console and metrics.jsonl: `"event": "profile"`) and a W&B `trace` artifact.

    `gather(obj)`: every rank's `obj`, in rank order (a collective: called on every rank at a window's last step).
    `logger` (a `metrics.RunLogger`) and `say` (accelerator.print) act on the main process only. `requested()`: a
    SIGUSR2 arrived on this rank (`faults.ProfileSignal.take`). `now()`: the step in progress, for an OOM error.
    Used as a context manager around training, it writes the memory snapshot on a CUDA out-of-memory error and
    leaves no profiler running on the way out."""

    def __init__(self, log_cfg, run_dir: Path, rank: int, device: torch.device, next_step: int, last_step: int, *,
                 gather: Callable[[object], list], logger, say: Callable[[str], None] = print,
                 requested: Callable[[], bool] | None = None, now: Callable[[], int] = lambda: 0,
                 graph: bool = False):  # fmt: skip
        self.cfg, self.dir, self.rank, self.last_step = log_cfg, Path(run_dir), rank, last_step
        self.cuda = device.type == "cuda"
        self.gather, self.logger, self.say, self.now = gather, logger, say, now
        self.requested = requested or (lambda: False)
        self.started = time.perf_counter()
        self.last_straggler_profile = -float("inf")  # on the agreed clock (rank 0's)
        self.prof: torch.profiler.profile | None = None  # alive only inside a window, on a recording rank
        self.recording_memory = False
        self.window, note = range_window(log_cfg.profile_steps, next_step, last_step)
        if note:
            say(note)
        if self.cuda and log_cfg.memory_history:  # for the snapshot an OOM writes: what led to it
            record_memory_history()
        if graph and _cuda_before(12, 6):
            # What torch.profiler does for torch.compile's CUDA graphs (it cannot see ours): CUPTI torn down and set up
            # again around a graph crashes before CUDA 12.6, so it is set up once and kept (not verified here: no GPU).
            os.environ.setdefault("DISABLE_CUPTI_LAZY_REINIT", "1")
            os.environ.setdefault("TEARDOWN_CUPTI", "0")
        if not self.cuda:  # a CUDA build of torch on a CPU machine: Kineto's "gpuGetDeviceCount failed" is no error
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")

    # ---- what the exchanges carry, agreed at the same step on every rank

    def local(self) -> dict[str, float]:
        """This rank's part of an exchange: a SIGUSR2 request, and its clock (rank 0's is every rank's)."""
        return {"profile": float(self.requested()), "profile/clock": time.perf_counter() - self.started}

    def agree(self, gathered: dict[str, torch.Tensor], step: int) -> None:
        """A request on any rank: every rank records the next `log.profile_len` steps (or says why not)."""
        if not gathered["profile"].any():
            return
        asked = [r for r, v in enumerate(gathered["profile"].tolist()) if v]
        if self.window is not None:
            self.say(f"SIGUSR2 (rank {', '.join(map(str, asked))}) at step {step}: a profile of steps "
                     f"{self.window.first}-{self.window.last} is already due; not profiling again")  # fmt: skip
            return
        window = next_window(step, self.cfg.profile_len, self.last_step, "SIGUSR2")
        if window is None:
            self.say(f"SIGUSR2 at step {step}: the run ends there; nothing to profile")
            return
        self.window = window
        self.say(f"SIGUSR2 (rank {', '.join(map(str, asked))}) at step {step}: profiling steps {window.first}-"
                 f"{window.last} on every rank into {self.dir / PROFILES}")  # fmt: skip

    def on_stragglers(self, flagged: list[int], gathered: dict[str, torch.Tensor], step: int) -> Window | None:
        """Straggler ranks were just flagged at `step`: they and the median rank record the next steps, unless a
        window is due already or one was recorded for stragglers less than `log.straggler_alert_every_s` ago (on
        rank 0's clock, so every rank decides alike). Returns the window, if any."""
        if not flagged or not self.cfg.profile_stragglers or self.window is not None:
            return None
        clock = float(gathered["profile/clock"][0])
        if clock - self.last_straggler_profile < self.cfg.straggler_alert_every_s:
            return None
        ranks = tuple(sorted({*flagged, median_rank(gathered["busy_img_per_s"].tolist(), flagged)}))
        window = next_window(step, self.cfg.profile_len, self.last_step, "straggler", ranks)
        if window is not None:
            self.window, self.last_straggler_profile = window, clock
        return window

    def traces(self, window: Window) -> list[str]:
        """The trace files `window` writes (full paths), one per recording rank."""
        ranks = window.ranks if window.ranks is not None else ()
        return [str(self.dir / window.trace(r)) for r in ranks]

    # ---- the steps

    def step(self, n: int):
        """The context to run step `n` in: a shared null context outside a window, else it starts, marks and ends
        the recording (and at the window's last step, on every rank, the gather of the summaries)."""
        w = self.window
        if w is None or n < w.start or (n != w.last and not w.records(self.rank)):
            return _NOTHING
        return self._in_window(w, n)

    @contextlib.contextmanager
    def _in_window(self, w: Window, n: int):
        recording = w.records(self.rank)
        if recording and self.prof is None:
            self._begin(w, n)
        if recording and n == w.first and w.warmup and self.prof is not None:
            self._start_recording()
        marker = torch.profiler.record_function(f"step {n}") if recording and n >= w.first else _NOTHING
        try:
            with marker:
                yield
        except BaseException:  # a failure or a stop inside the step: nothing is written, no collective
            self.close()
            raise
        if n >= w.last:
            self._end(w)

    def _begin(self, w: Window, n: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self.prof.prepare_trace()  # (on the warm-up step, where there is one: nothing is recorded in it)
        if not (w.warmup and n < w.first):
            self._start_recording()

    def _start_recording(self) -> None:
        self.prof.start_trace()
        if self.cuda and not self.cfg.memory_history:
            record_memory_history()
            self.recording_memory = True

    def _end(self, w: Window) -> None:
        """The window's last step is done: recording ranks write their files; every rank takes part in the gather;
        the main process reports."""
        summary = None
        if self.prof is not None:
            summary = self._write(w)
            gc.collect()  # the profiler sits in a reference cycle: gone now with its events, not at some later gc
        self.window = None
        summaries = [s for s in self.gather(summary) if s is not None]
        self._report(w, summaries)

    def _write(self, w: Window) -> dict:
        """Stop, write the trace (and memory snapshot), sum up; a failure here is reported, never raised (profiling
        must not stop training, and the other ranks are waiting in the gather)."""
        prof, self.prof = self.prof, None
        summary: dict = {"rank": self.rank, "steps": [w.first, w.last], "cuda": self.cuda, "trace": None,
                         "memory": None}  # fmt: skip
        try:
            prof.stop_trace()
            (self.dir / PROFILES).mkdir(exist_ok=True)
            write_safely(lambda tmp: prof.export_chrome_trace(str(tmp)), self.dir / w.trace(self.rank))
            summary["trace"] = w.trace(self.rank)
            if self.cuda:
                dump_memory_snapshot(self.dir / w.memory(self.rank))
                summary["memory"] = w.memory(self.rank)
            summary["top_ops"], summary["self_ms_total"] = top_ops(prof, self.cuda)
        except Exception as e:  # noqa: BLE001 - see above
            summary["error"] = f"{type(e).__name__}: {e}"[:300]
        finally:
            self._stop_memory()
        return summary

    def _report(self, w: Window, summaries: list[dict]) -> None:
        """Console (main process): where the traces are and the top operators; metrics.jsonl: the `profile` event;
        W&B: the traces as a `trace` artifact (one version per window)."""
        ranks = [s["rank"] for s in summaries]
        written = [s for s in summaries if s.get("trace")]
        on = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        lines = [f"profile of steps {w.first}-{w.last} ({w.trigger}) on {on}: "
                 + ", ".join(str(self.dir / s["trace"]) for s in written)]  # fmt: skip
        for s in summaries:
            if "error" in s:
                lines.append(f"  rank {s['rank']}: no profile ({s['error']})")
        shown = [s for s in written if "top_ops" in s]
        for s in shown[:2]:
            lines.append(ops_table(s))
        if len(shown) > 2:
            lines.append(f"  (every rank's table: metrics.jsonl, event profile at step {w.last})")
        self.say("\n".join(lines))
        self.logger.note({"step": w.last, "event": "profile", "trigger": w.trigger, "steps": [w.first, w.last],
                          "ranks": ranks, "profiles": summaries})  # fmt: skip
        files = {Path(p).name: self.dir / p for s in written for p in (s["trace"], s["memory"]) if p}
        self.logger.artifact("trace", files, {"steps": [w.first, w.last], "trigger": w.trigger, "ranks": ranks,
                                              "top_ops": {s["rank"]: s.get("top_ops") for s in written}},
                             aliases=[f"steps{w.first}-{w.last}"])  # fmt: skip

    def _stop_memory(self) -> None:
        if self.recording_memory:
            self.recording_memory = False
            with contextlib.suppress(Exception):
                torch.cuda.memory._record_memory_history(enabled=None)

    # ---- the way out

    def close(self) -> None:
        """Drop a recording in progress (a stop or a failure inside a window: no trace), without any collective."""
        if self.prof is not None:
            prof, self.prof = self.prof, None
            with contextlib.suppress(Exception), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prof.stop_trace()
            steps = f" of steps {self.window.first}-{self.window.last}" if self.window else ""
            self.say(f"profile{steps}: cut short at step {self.now()}, no trace written")
        self._stop_memory()
        self.window = None

    def __enter__(self) -> Profiler:
        return self

    def __exit__(self, exc_type, exc, _tb) -> None:
        try:
            if exc_type is not None and issubclass(exc_type, torch.OutOfMemoryError):
                raise self.out_of_memory(exc) from exc
        finally:
            self.close()
            if self.cuda and self.cfg.memory_history:
                with contextlib.suppress(Exception):
                    torch.cuda.memory._record_memory_history(enabled=None)

    def out_of_memory(self, error: BaseException):
        """A CUDA out-of-memory error: this rank's memory snapshot written now (the allocator's state at the error,
        and its history where `log.memory_history` or a profile window records one), and the one-line error that
        names it."""
        from cvae_dist.faults import OutOfMemory

        step = self.now()
        path = self.dir / PROFILES / f"rank{self.rank}-oom-step{step}{MEMORY_SUFFIX}"
        try:
            path.parent.mkdir(exist_ok=True)
            dump_memory_snapshot(path)
            where = f"memory snapshot {path} (open it at https://pytorch.org/memory_viz)"
        except Exception as e:  # noqa: BLE001 - the error itself must still be reported
            where = f"no memory snapshot ({type(e).__name__}: {e})"
        said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return OutOfMemory(f"CUDA out of memory at step {step} on rank {self.rank}: {said[:300]}; {where}")


def record_memory_history() -> None:
    """Start recording the CUDA caching allocator's events (with Python stacks: C++ ones cost far more), the last
    MEMORY_ENTRIES of them, for `dump_memory_snapshot`."""
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=MEMORY_ENTRIES)


def _cuda_before(major: int, minor: int) -> bool:
    version = torch.version.cuda
    return version is not None and tuple(int(p) for p in version.split(".")[:2]) < (major, minor)


def dump_memory_snapshot(path: Path) -> None:
    """`torch.cuda.memory._dump_snapshot` into `path`, whole or not at all."""
    write_safely(lambda tmp: torch.cuda.memory._dump_snapshot(str(tmp)), path)
