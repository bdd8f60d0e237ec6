"""The learning curve as a PNG, with numpy and zlib only (no plotting package to install).

    python plot.py runs/demo/metrics.jsonl     # -> runs/demo/metrics.png

The trainer rewrites OUT/metrics.png after every step: reward_mean (every step), val_reward and
val_cer (validation steps, step 0 = before training) against the step, on one 0..1 axis; below,
the step's median pace and pitch relative to the first step's (what the reward cannot hear).
"""

import argparse
import itertools
import os
import struct
import zlib

import numpy as np

import data

# 5x7 bitmaps of the characters the plot writes (rows top to bottom, 5 bits each, MSB left).
FONT = {
    "0": [14, 17, 19, 21, 25, 17, 14],
    "1": [4, 12, 4, 4, 4, 4, 14],
    "2": [14, 17, 1, 2, 4, 8, 31],
    "3": [31, 2, 4, 2, 1, 17, 14],
    "4": [2, 6, 10, 18, 31, 2, 2],
    "5": [31, 16, 30, 1, 1, 17, 14],
    "6": [6, 8, 16, 30, 17, 17, 14],
    "7": [31, 1, 2, 4, 8, 8, 8],
    "8": [14, 17, 17, 14, 17, 17, 14],
    "9": [14, 17, 17, 15, 1, 2, 12],
    ".": [0, 0, 0, 0, 0, 12, 12],
    " ": [0] * 7,
    "a": [0, 0, 14, 1, 15, 17, 15],
    "c": [0, 0, 14, 16, 16, 17, 14],
    "d": [1, 1, 13, 19, 17, 17, 15],
    "e": [0, 0, 14, 17, 31, 16, 14],
    "l": [12, 4, 4, 4, 4, 4, 14],
    "m": [0, 0, 26, 21, 21, 17, 17],
    "n": [0, 0, 22, 25, 17, 17, 17],
    "p": [0, 0, 30, 17, 30, 16, 16],
    "r": [0, 0, 22, 25, 16, 16, 16],
    "s": [0, 0, 14, 16, 14, 1, 30],
    "t": [8, 8, 28, 8, 8, 9, 6],
    "v": [0, 0, 17, 17, 17, 10, 4],
    "w": [0, 0, 17, 17, 21, 21, 10],
    "_": [0, 0, 0, 0, 0, 0, 31],
    "f": [6, 9, 8, 28, 8, 8, 8],
    "h": [16, 16, 22, 25, 17, 17, 17],
    "i": [4, 0, 12, 4, 4, 4, 14],
    "z": [0, 0, 31, 2, 4, 8, 31],
}
# The curves drawn: (metric name, RGB colour).
SERIES = (
    ("reward_mean", (31, 119, 180)),
    ("val_reward", (44, 160, 44)),
    ("val_cer", (214, 39, 40)),
)


def write_png(path: str, rgb: np.ndarray):
    """rgb [H, W, 3] uint8 -> an 8-bit RGB PNG (no dependency beyond zlib)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind, body):
        """One PNG chunk: body length, kind, body, CRC-32 of kind + body."""
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits per channel, RGB
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")  # the PNG signature
        f.write(chunk(b"IHDR", header))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def _text(img, x, y, s, color, scale=2):
    """Draws the string s in FONT into img [H, W, 3], its top left at pixel (x, y), each font
    pixel a square of `scale` pixels."""
    for ch in s:
        for r, bits in enumerate(FONT.get(ch, FONT[" "])):
            for c in range(5):
                if bits >> (4 - c) & 1:
                    top = y + r * scale
                    left = x + c * scale
                    img[top : top + scale, left : left + scale] = color
        x += 6 * scale


def _line(img, x0, y0, x1, y1, color, width=2):
    """Draws a line from (x0, y0) to (x1, y1) into img [H, W, 3], `width` pixels wide."""
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1  # points: one per pixel along the longer axis
    for t in np.linspace(0.0, 1.0, n):
        x = int(np.rint(x0 + t * (x1 - x0)))
        y = int(np.rint(y0 + t * (y1 - y0)))
        rows = slice(max(0, y - width // 2), y + (width + 1) // 2)
        cols = slice(max(0, x - width // 2), x + (width + 1) // 2)
        img[rows, cols] = color


def plot(metrics_jsonl: str, png_path: str | None = None, size=(640, 400)) -> str:
    """SERIES (reward_mean every step, blue; val_reward green and val_cer red at validation steps)
    against the step, on one 0..1 axis, as a PNG (default: metrics.png beside metrics.jsonl); below
    it, when the run logged them, the MEASURES (pace and median pitch, each step's median divided
    by the first step's: 1 = unchanged) on a 0..2 axis. size: (width, height) of the top panel.
    Returns the PNG's path."""
    if not png_path:
        png_path = os.path.join(os.path.dirname(os.path.abspath(metrics_jsonl)), "metrics.png")
    rows = [row for _, row in data.read_jsonl(metrics_jsonl)]
    w, h = size
    measured = [name for name, _ in MEASURES if any(_number(r.get(name)) for r in rows)]
    height = h
    if measured:
        height += MEASURES_HEIGHT
    img = np.full((height, w, 3), 255, dtype=np.uint8)  # [H, W, 3], white
    steps = [r["step"] for r in rows] or [1]
    _panel(img, rows, SERIES, (0, h), steps, top_value=1.0, value_of=lambda name, v: v)
    if measured:
        firsts = {name: _first(rows, name) for name in measured}

        def relative(name, value):
            return value / firsts[name]

        series = [(name, color) for name, color in MEASURES if name in measured]
        box = (h, height)
        _panel(img, rows, series, box, steps, top_value=2.0, value_of=relative)
    write_png(png_path, img)
    return png_path


# The per-clip measures drawn below the curves (relative to their first step): (name, RGB).
MEASURES = (
    ("chars_per_s", (148, 103, 189)),
    ("f0_median_hz", (255, 127, 14)),
)
MEASURES_HEIGHT = 240  # pixels of the measures' panel


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _first(rows, name) -> float:
    """The first positive value of metric `name` in rows."""
    return next(r[name] for r in rows if _number(r.get(name)))


def _panel(img, rows, series, box, steps, *, top_value, value_of):
    """Draws `series` [(metric, RGB)] of `rows` against the step into the rows box = (y0, y1) of
    img [H, W, 3]: axes, grid, a 0..top_value y axis, a legend. value_of(name, value) -> the
    plotted value."""
    w = img.shape[1]
    y0, y1 = box
    # Margins around the axes, in pixels.
    left = 60
    right = 20
    top = y0 + 40
    bottom = y1 - 50
    s0 = min(steps)  # the x axis's first step
    s1 = max(max(steps), s0 + 1)  # and its last

    def px(step, value):
        """The pixel (x, y) of a point of a curve, its value clamped to 0..top_value."""
        x = left + (step - s0) / (s1 - s0) * (w - left - right)
        y = bottom - min(max(value / top_value, 0.0), 1.0) * (bottom - top)
        return x, y

    grey = (220, 220, 220)
    black = (0, 0, 0)
    for v in np.linspace(0, top_value, 6):  # horizontal grid and y labels
        _, y = px(s0, v)
        _line(img, left, y, w - right, y, grey, 1)
        _text(img, 8, int(y) - 7, f"{v:.1f}", black)
    ticks = np.linspace(s0, s1, min(6, s1 - s0 + 1))
    for st in sorted({int(np.rint(s)) for s in ticks}):  # x ticks
        x, _ = px(st, 0)
        _line(img, x, bottom, x, bottom + 5, black, 1)
        _text(img, int(x) - 6 * len(str(st)), bottom + 10, str(st), black)
    _line(img, left, top, left, bottom, black)
    _line(img, left, bottom, w - right, bottom, black)
    _text(img, w // 2 - 24, y1 - 18, "step", black)
    x = left
    for name, color in series:
        points = []
        for r in rows:
            value = r.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                points.append(px(r["step"], value_of(name, value)))
        for (xa, ya), (xb, yb) in itertools.pairwise(points):
            _line(img, xa, ya, xb, yb, color)
        for xp, yp in points:  # a dot on every point, so a single validation shows
            img[max(0, int(yp) - 3) : int(yp) + 4, max(0, int(xp) - 3) : int(xp) + 4] = color
        img[y0 + 12 : y0 + 22, x : x + 20] = color  # legend
        _text(img, x + 26, y0 + 10, name, black)
        x += 40 + 12 * len(name)


def main(argv=None):
    """plot.py's command line: a run's metrics.jsonl -> its PNG."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("metrics", help="a run's metrics.jsonl")
    p.add_argument(
        "--out", default=None, help="PNG path (default: metrics.png beside metrics.jsonl)"
    )
    args = p.parse_args(argv)
    print(f"wrote {plot(args.metrics, args.out)}")


if __name__ == "__main__":
    main()
