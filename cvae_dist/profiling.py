"""`torch.profiler` traces of chosen steps, one file per rank in the run directory's `profiles/`.

A `Window` of steps is recorded on every rank: `log.profile_steps=A-B`, or, after SIGUSR2 to any rank, the next
`log.profile_len` steps. A request rides in the interval's exchange (`local` / `agree`), so every rank records the
same steps without a collective of its own; at the window's end one `gather` brings the summaries together. Outside
a window no profiler object exists.
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cvae_dist.config import step_range
from cvae_dist.faults import ProfileSignal
from cvae_dist.files import write_safely

PROFILES = "profiles"  # in the run directory
TRACE_SUFFIX = ".pt.trace.json.gz"  # Chrome trace; TensorBoard's profiler plugin reads *.pt.trace.json.gz
TOP_OPS = 10  # rows of the top-operators table (metrics.jsonl); the console shows the first 8
MARKERS = ("step ", "ProfilerStep#")  # step markers, left out of the operator table
_NOTHING = contextlib.nullcontext()


@dataclass(frozen=True)
class Window:
    """Steps `first`..`last`; `warmup`: the step before `first` warms the profiler up (not recorded)."""

    first: int
    last: int
    trigger: str  # "log.profile_steps=A-B" or "SIGUSR2"
    warmup: bool = True

    @property
    def start(self) -> int:
        return self.first - 1 if self.warmup else self.first

    def trace(self, rank: int) -> str:
        """Rank `rank`'s trace file, relative to the run directory."""
        return f"{PROFILES}/rank{rank}-steps{self.first}-{self.last}{TRACE_SUFFIX}"


def range_window(steps: str | None, next_step: int, last_step: int) -> tuple[Window | None, str | None]:
    """The window `log.profile_steps` asks for, and a note where it is cut short or cannot be recorded."""
    if steps is None:
        return None, None
    first, last = step_range(steps)
    key = f"log.profile_steps={steps}"
    if first < next_step:
        return None, f"{key}: not profiled: this run continues from step {next_step - 1}"
    if first > last_step:
        return None, f"{key}: not profiled: the run ends at step {last_step}"
    note = None
    if last > last_step:
        note, last = f"{key}: the run ends at step {last_step}: profiling steps {first}-{last_step}", last_step
    return Window(first, last, key, warmup=first - 1 >= next_step), note


def next_window(step: int, length: int, last_step: int, trigger: str) -> Window | None:
    """The window agreed at `step`: a warm-up step, then `length` steps (cut at `last_step`)."""
    if step + 1 > last_step:
        return None
    if step + 2 > last_step:
        return Window(step + 1, step + 1, trigger, warmup=False)
    return Window(step + 2, min(step + 1 + length, last_step), trigger)


def top_ops(prof: torch.profiler.profile, cuda: bool, n: int = TOP_OPS) -> tuple[list[dict], float]:
    """The `n` operators with the most self time (CUDA: device time), and the self time of all of them (ms)."""
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [(e, getattr(e, attr)) for e in prof.key_averages() if not e.key.startswith(MARKERS)]
    total = sum(t for _, t in events)
    rows = [
        {"op": e.key, "self_ms": round(t / 1e3, 3), "share": round(t / (total or 1.0), 4), "calls": e.count}
        for e, t in sorted(events, key=lambda et: et[1], reverse=True)[:n]
    ]
    return rows, round(total / 1e3, 3)


def ops_table(summary: dict, rows: int = 8) -> str:
    where = "device" if summary.get("cuda") else "CPU"
    first, last = summary["steps"]
    lines = [f"  rank {summary['rank']}: top ops by self {where} time, steps {first}-{last} "
             f"({summary['self_ms_total']:,.1f} ms in all)"]  # fmt: skip
    for row in summary["top_ops"][:rows]:
        lines.append(f"    {row['op'][:44]:<44} {row['self_ms']:>10,.1f} ms {100 * row['share']:>5.1f}% "
                     f"{row['calls']:>6} calls")  # fmt: skip
    return "\n".join(lines)


class Profiler:
    """This rank's profile windows: `step(n)` is the context each step runs in; `local` / `agree` carry SIGUSR2
    requests through the exchange; a window's end writes the traces and reports them (console, metrics.jsonl's
    `profile` event, a W&B `trace` artifact). `gather(obj)`: every rank's `obj` (a collective)."""

    def __init__(self, log_cfg, run_dir: Path, rank: int, device: torch.device, next_step: int, last_step: int, *,
                 gather: Callable[[object], list], logger, say: Callable[[str], None] = print):  # fmt: skip
        self.cfg, self.dir, self.rank, self.last_step = log_cfg, Path(run_dir), rank, last_step
        self.cuda = device.type == "cuda"
        self.gather, self.logger, self.say = gather, logger, say
        self.signal = ProfileSignal()  # (takes over a SIGUSR2 noted since the command line started)
        self.prof: torch.profiler.profile | None = None  # alive only inside a window
        self.window, note = range_window(log_cfg.profile_steps, next_step, last_step)
        if note:
            say(note)
        if not self.cuda:  # a CUDA build of torch on a CPU machine: Kineto's "gpuGetDeviceCount failed" is no error
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")

    def local(self) -> dict[str, float]:
        return {"profile": float(self.signal.take())}

    def agree(self, gathered: dict[str, torch.Tensor], step: int) -> None:
        """A request on any rank: every rank records the next `log.profile_len` steps (or says why not)."""
        asked = [r for r, v in enumerate(gathered["profile"].tolist()) if v]
        if not asked:
            return
        who = f"SIGUSR2 (rank {', '.join(map(str, asked))}) at step {step}"
        if self.window is not None:
            self.say(f"{who}: a profile of steps {self.window.first}-{self.window.last} is already due")
        elif (window := next_window(step, self.cfg.profile_len, self.last_step, "SIGUSR2")) is None:
            self.say(f"{who}: the run ends there; nothing to profile")
        else:
            self.window = window
            self.say(f"{who}: profiling steps {window.first}-{window.last} on every rank into {self.dir / PROFILES}")

    def step(self, n: int):
        w = self.window
        return _NOTHING if w is None or n < w.start else self._in_window(w, n)

    @contextlib.contextmanager
    def _in_window(self, w: Window, n: int):
        if self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * self.cuda
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self.prof.prepare_trace()  # (the warm-up step, where there is one, records nothing)
        if n == w.first:
            self.prof.start_trace()
        try:
            with torch.profiler.record_function(f"step {n}") if n >= w.first else _NOTHING:
                yield
        except BaseException:  # a failure or a stop inside the window: nothing written, no collective
            self.close()
            raise
        if n >= w.last:
            self._end(w)

    def _end(self, w: Window) -> None:
        prof, self.prof, self.window = self.prof, None, None
        summary = {"rank": self.rank, "steps": [w.first, w.last], "cuda": self.cuda, "trace": None}
        try:  # reported, never raised: the other ranks wait in the gather
            prof.stop_trace()
            (self.dir / PROFILES).mkdir(exist_ok=True)
            write_safely(lambda tmp: prof.export_chrome_trace(str(tmp)), self.dir / w.trace(self.rank))
            summary["trace"] = w.trace(self.rank)
            summary["top_ops"], summary["self_ms_total"] = top_ops(prof, self.cuda)
        except Exception as e:  # noqa: BLE001
            summary["error"] = f"{type(e).__name__}: {e}"[:300]
        prof = None
        gc.collect()  # the profiler sits in a reference cycle: gone now, with its events
        self._report(w, self.gather(summary))

    def _report(self, w: Window, summaries: list[dict]) -> None:
        ranks, written = [s["rank"] for s in summaries], [s for s in summaries if s.get("trace")]
        lines = [f"profile of steps {w.first}-{w.last} ({w.trigger}): "
                 + ", ".join(str(self.dir / s["trace"]) for s in written)]  # fmt: skip
        lines += [f"  rank {s['rank']}: no profile ({s['error']})" for s in summaries if "error" in s]
        lines += [ops_table(s) for s in written[:2]]
        self.say("\n".join(lines))
        self.logger.note({"step": w.last, "event": "profile", "trigger": w.trigger, "steps": [w.first, w.last],
                          "ranks": ranks, "profiles": summaries})  # fmt: skip
        files = {Path(s["trace"]).name: self.dir / s["trace"] for s in written}
        self.logger.artifact("trace", files, {"steps": [w.first, w.last], "trigger": w.trigger, "ranks": ranks,
                                              "top_ops": {s["rank"]: s.get("top_ops") for s in written}},
                             aliases=[f"steps{w.first}-{w.last}"])  # fmt: skip

    def close(self) -> None:
        """Drop a recording in progress (no trace, no collective) and give SIGUSR2 back."""
        if self.prof is not None:
            prof, self.prof = self.prof, None
            with contextlib.suppress(Exception), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prof.stop_trace()
            self.say(f"profile of steps {self.window.first}-{self.window.last}: cut short, no trace written")
        self.window = None
        self.signal.restore()
