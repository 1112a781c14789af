"""Render a Chrome trace (torch.profiler's, gzipped) as a timeline PNG: one band per thread, ops as coloured bars
stacked by call depth, the `step <n>` markers on top; the whole window, then one step of it enlarged.

    python render_trace.py TRACE.json.gz OUT.png TITLE [STEP_TO_ENLARGE]
"""

import colorsys
import gzip
import hashlib
import json
import sys

from PIL import Image, ImageDraw, ImageFont

trace, out, title = sys.argv[1], sys.argv[2], sys.argv[3]
with gzip.open(trace) as f:
    events = [
        e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e and isinstance(e.get("tid"), int)
    ]
steps = sorted(
    (e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("step ")), key=lambda e: e["ts"]
)
zoom = (
    next((e for e in steps if e["name"] == f"step {sys.argv[4]}"), steps[len(steps) // 2])
    if len(sys.argv) > 4
    else steps[len(steps) // 2]
)
W, LEFT, RIGHT, ROW, MAXDEPTH = 2000, 130, 20, 16, 6
try:
    font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 11)
    bold = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", 14)
except OSError:
    font = bold = ImageFont.load_default()


def colour(name: str) -> tuple[int, int, int]:
    if name.startswith("gloo:") or "allreduce" in name or "all_gather" in name:
        return (214, 70, 55)
    h = int(hashlib.md5(name.encode()).hexdigest()[:6], 16) / 0xFFFFFF
    r, g, b = colorsys.hls_to_rgb(h, 0.66, 0.5)
    return int(r * 255), int(g * 255), int(b * 255)


threads: dict = {}  # tid -> [(depth, event)]
stacks: dict = {}
for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
    if e in steps:
        continue
    stack = stacks.setdefault(e["tid"], [])
    while stack and stack[-1] <= e["ts"]:
        stack.pop()
    depth = len(stack)
    stack.append(e["ts"] + e["dur"])
    if depth < MAXDEPTH:
        threads.setdefault(e["tid"], []).append((depth, e))
main = max(threads, key=lambda t: len(threads[t]))
order = [main] + sorted(t for t in threads if t != main)
depths = {t: max(d for d, _ in threads[t]) + 1 for t in order}


def panel(draw: ImageDraw.ImageDraw, y: int, t0: float, t1: float, heading: str, tick_ms: int) -> int:
    scale = (W - LEFT - RIGHT) / (t1 - t0)

    def x(ts: float) -> float:
        return LEFT + (min(max(ts, t0), t1) - t0) * scale

    draw.text((10, y), heading, fill="black", font=bold)
    y += 22
    bottom = y + 18 + 30 + sum(depths[t] * ROW + 16 for t in order)
    for ms in range(0, int((t1 - t0) / 1e3) + 1, tick_ms):
        xx = LEFT + ms * 1e3 * scale
        draw.line([(xx, y + 14), (xx, bottom)], fill=(232, 232, 232))
        draw.text((xx + 2, y), f"{ms} ms", fill=(120, 120, 120), font=font)
    y += 18
    draw.text((10, y + 3), "step markers", fill="black", font=font)
    for e in steps:
        if e["ts"] + e["dur"] < t0 or e["ts"] > t1:
            continue
        draw.rectangle([x(e["ts"]), y, x(e["ts"] + e["dur"]), y + 20], fill=(55, 55, 55), outline="white")
        draw.text((x(e["ts"]) + 4, y + 4), f"{e['name']} ({e['dur'] / 1e3:.0f} ms)", fill="white", font=font)
    y += 30
    for t in order:
        draw.text((10, y + 2), "main thread" if t == main else f"thread {t} (gloo)", fill="black", font=font)
        for depth, e in threads[t]:
            if e["ts"] + e["dur"] < t0 or e["ts"] > t1:
                continue
            a, b = x(e["ts"]), max(x(e["ts"] + e["dur"]), x(e["ts"]) + 1)
            top = y + depth * ROW
            draw.rectangle([a, top, b, top + ROW - 2], fill=colour(e["name"]))
            name = e["name"].removeprefix("aten::")
            if b - a > 6.3 * len(name) + 4:
                draw.text((a + 2, top + 1), name, fill="black", font=font)
        y += depths[t] * ROW + 16
    return y + 10


whole = (min(e["ts"] for e in events), max(e["ts"] + e["dur"] for e in events))
img = Image.new("RGB", (W, 2000), "white")
d = ImageDraw.Draw(img)
d.text((10, 8), title, fill="black", font=bold)
y = panel(d, 36, *whole, f"the whole window ({(whole[1] - whole[0]) / 1e3:.0f} ms)", 50)
y = panel(d, y + 6, zoom["ts"], zoom["ts"] + zoom["dur"], f"{zoom['name']} enlarged", 10)
d.text(
    (10, y),
    f"Rendered with Pillow from {trace.split('/')[-1]}, the torch.profiler Chrome trace the run wrote "
    "(CPU activities, one rank). Red: collectives (gloo all-reduce / all-gather); bars stacked by call depth "
    f"(the first {MAXDEPTH} levels); names where they fit.",
    fill=(90, 90, 90),
    font=font,
)
img.crop((0, 0, W, y + 22)).save(out, optimize=True)
print(out, (W, y + 22))
