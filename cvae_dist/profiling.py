"""`torch.profiler` traces of a `Window` of steps on every rank (`log.profile_steps=A-B`, or the next `log.profile_len`
steps after SIGUSR2 to any rank) into `profiles/`. A request rides in the interval's exchange, so every rank records
the same steps; one `gather` at the window's end brings the summaries together. Outside a window no profiler exists."""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from cvae_dist.config import step_range
from cvae_dist.faults import ProfileSignal
from cvae_dist.files import write_safely

PROFILES = "profiles"  # in the run directory
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

    def trace(self, rank: int) -> str:  # relative to the run directory
        return f"{PROFILES}/rank{rank}-steps{self.first}-{self.last}.pt.trace.json.gz"  # TensorBoard reads these


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
    note = f"{key}: the run ends at step {last_step}: profiling steps {first}-{last_step}" if last > last_step else None
    return Window(first, min(last, last_step), key, warmup=first - 1 >= next_step), note


def next_window(step: int, length: int, last_step: int, trigger: str) -> Window | None:
    """The window agreed at `step`: a warm-up step, then `length` steps (cut at `last_step`)."""
    if step + 1 > last_step:
        return None
    if step + 2 > last_step:
        return Window(step + 1, step + 1, trigger, warmup=False)
    return Window(step + 2, min(step + 1 + length, last_step), trigger)


def top_ops(prof: torch.profiler.profile, cuda: bool, n: int = 10) -> tuple[list[dict], float]:
    """The `n` operators with the most self time (CUDA: device time), and all operators' self time (ms)."""
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [(e, getattr(e, attr)) for e in prof.key_averages() if not e.key.startswith(MARKERS)]
    total = sum(t for _, t in events)
    rows = [
        {"op": e.key, "self_ms": round(t / 1e3, 3), "share": round(t / (total or 1.0), 4), "calls": e.count}
        for e, t in sorted(events, key=lambda et: et[1], reverse=True)[:n]
    ]
    return rows, round(total / 1e3, 3)


def ops_table(s: dict, rows: int = 8) -> str:
    """Rank summary `s`'s top operators, for the console."""
    where, (first, last), total = "device" if s.get("cuda") else "CPU", s["steps"], s["self_ms_total"]
    head = f"  rank {s['rank']}: top ops by self {where} time, steps {first}-{last} ({total:,.1f} ms in all)"
    row = "    {op:<44.44} {self_ms:>10,.1f} ms {pct:>5.1f}% {calls:>6} calls"
    return "\n".join([head] + [row.format(**r, pct=100 * r["share"]) for r in s["top_ops"][:rows]])


class Profiler:
    """This rank's profile windows: `step(n)` is each step's context; `local` / `agree` carry SIGUSR2 requests through
    the exchange; a window's end writes and reports the traces. `gather(obj)`: every rank's `obj` (a collective)."""

    def __init__(self, log_cfg, run_dir, rank, device, next_step, last_step, *, gather, logger, say=print, graph=False):
        self.cfg, self.dir, self.rank, self.last_step = log_cfg, Path(run_dir), rank, last_step
        self.cuda, self.gather, self.logger, self.say = device.type == "cuda", gather, logger, say
        self.signal = ProfileSignal()  # (takes over a SIGUSR2 noted since the command line started)
        self.prof: torch.profiler.profile | None = None  # alive only inside a window
        self.window, note = range_window(log_cfg.profile_steps, next_step, last_step)
        if note:
            say(note)
        if not self.cuda:  # a CUDA build of torch on a CPU machine: Kineto's "gpuGetDeviceCount failed" is no error
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        cuda = tuple(int(p) for p in (torch.version.cuda or "99").split(".")[:2])
        if graph and cuda < (12, 6):
            # CUPTI torn down and set up again around a CUDA graph crashes before CUDA 12.6: set up once and kept,
            # as torch.profiler does for torch.compile's graphs (not verified here: no GPU)
            os.environ.setdefault("DISABLE_CUPTI_LAZY_REINIT", "1")
            os.environ.setdefault("TEARDOWN_CUPTI", "0")

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
        traces = ", ".join(str(self.dir / s["trace"]) for s in written)
        lines = [f"profile of steps {w.first}-{w.last} ({w.trigger}): {traces}"]
        lines += [f"  rank {s['rank']}: no profile ({s['error']})" for s in summaries if "error" in s]
        self.say("\n".join(lines + [ops_table(s) for s in written[:2]]))
        about = {"steps": [w.first, w.last], "trigger": w.trigger, "ranks": ranks}
        self.logger.note({"step": w.last, "event": "profile", **about, "profiles": summaries})
        files = {Path(s["trace"]).name: self.dir / s["trace"] for s in written}
        top = {s["rank"]: s.get("top_ops") for s in written}
        self.logger.artifact("trace", files, about | {"top_ops": top}, aliases=[f"steps{w.first}-{w.last}"])

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
