"""Training progress as an SVG plot: loss (left axis) and examples/sec (right axis) against
the step. A pure function of the points; the job page embeds its output and refreshes it.

Every piece of text in the SVG goes through :func:`html.escape`; numbers are formatted by us.
A ``nan``/``inf`` value is not drawn: the line breaks there, so a diverged stretch shows as a gap.
"""
from __future__ import annotations

import math
from html import escape
from typing import Protocol, Sequence

WIDTH, HEIGHT = 720, 300
_MARGIN_L, _MARGIN_R, _MARGIN_T, _MARGIN_B = 64, 72, 34, 40
_TICKS = 5
#: more points than this are thinned (every k-th point, the last kept): a browser draws fast
MAX_POINTS = 1500
LOSS_COLOUR = "#c0392b"
SPEED_COLOUR = "#2471a3"


class Point(Protocol):
    """What a plot needs of a point (:class:`portal.logs.tail.Progress` has it)."""

    step: int
    loss: float
    examples_per_sec: float


def _num(x: float) -> str:
    """A short label: 3 significant digits, no exponent for everyday values."""
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e6:
        text = "%.3f" % x if abs(x) < 1 else "%.4g" % x
        return text.rstrip("0").rstrip(".") if "." in text and "e" not in text else text
    return "%.2e" % x


def _range(values: Sequence[float]) -> tuple[float, float] | None:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    lo, hi = min(finite), max(finite)
    if lo == hi:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    return lo, hi


def _thin(points: Sequence[Point], limit: int) -> list[Point]:
    if len(points) <= limit:
        return list(points)
    k = math.ceil(len(points) / limit)
    out = list(points[::k])
    if out[-1] is not points[-1]:
        out.append(points[-1])
    return out


def _segments(xy: list[tuple[float, float] | None]) -> list[list[tuple[float, float]]]:
    """Runs of drawable points, split where a value was nan/inf."""
    runs: list[list[tuple[float, float]]] = [[]]
    for p in xy:
        if p is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(p)
    return [r for r in runs if r]


def _series(points: list[Point], attr: str, sx, sy, rng, cls: str, colour: str) -> list[str]:
    if rng is None:
        return []
    xy = [(sx(p.step), sy(getattr(p, attr), rng)) if math.isfinite(getattr(p, attr)) else None
          for p in points]
    out = []
    for run in _segments(xy):
        coords = " ".join("%.1f,%.1f" % c for c in run)
        if len(run) == 1:
            out.append('<circle class="%s" cx="%.1f" cy="%.1f" r="3" fill="%s"/>' % (cls, run[0][0], run[0][1], colour))
        else:
            out.append('<polyline class="%s" fill="none" stroke="%s" stroke-width="1.8" '
                       'stroke-linejoin="round" points="%s"/>' % (cls, colour, coords))
    return out


def render_plot_svg(points: Sequence[Point], title: str = "", width: int = WIDTH, height: int = HEIGHT) -> str:
    """An ``<svg>`` element plotting ``loss`` and ``examples_per_sec`` against ``step``.

    No points: a frame with a note that no progress lines were seen yet. One finite value: a
    dot. ``title`` (e.g. the job's name) is escaped like every other text."""
    head = ('<svg xmlns="http://www.w3.org/2000/svg" class="plot" viewBox="0 0 %d %d" width="%d" height="%d" '
            'role="img" font-family="system-ui, sans-serif" font-size="12">' % (width, height, width, height))
    caption = "loss and examples/sec by step" + (" - %s" % title if title else "")
    parts = [head, "<title>%s</title>" % escape(caption)]
    x0, x1 = _MARGIN_L, width - _MARGIN_R
    y0, y1 = _MARGIN_T, height - _MARGIN_B
    parts.append('<rect x="%d" y="%d" width="%d" height="%d" fill="#fff" stroke="#bbb"/>' % (x0, y0, x1 - x0, y1 - y0))
    if title:
        short = title if len(title) <= 48 else title[:47] + "\u2026"
        parts.append('<text x="%d" y="18" font-weight="bold">%s</text>' % (x0, escape(short)))
    if not points:
        parts.append('<text class="empty" x="%d" y="%d" text-anchor="middle" fill="#666">no progress lines yet '
                     '(step N, loss = X (Y examples/sec; Z sec/batch))</text>'
                     % ((x0 + x1) // 2, (y0 + y1) // 2))
        parts.append("</svg>")
        return "".join(parts)

    pts = _thin(sorted(points, key=lambda p: p.step), MAX_POINTS)
    first, final = pts[0].step, pts[-1].step
    steps = (first - 1.0, final + 1.0) if first == final else (float(first), float(final))
    loss = _range([p.loss for p in pts])
    speed = _range([p.examples_per_sec for p in pts])

    def sx(step: float) -> float:
        return x0 + (step - steps[0]) / (steps[1] - steps[0]) * (x1 - x0)

    def sy(v: float, rng: tuple[float, float]) -> float:
        return y1 - (v - rng[0]) / (rng[1] - rng[0]) * (y1 - y0)

    # grid and axes labels
    for i in range(_TICKS + 1):
        frac = i / _TICKS
        y = y1 - frac * (y1 - y0)
        parts.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#eee"/>' % (x0, y, x1, y))
        if loss:
            parts.append('<text x="%d" y="%.1f" text-anchor="end" fill="%s">%s</text>'
                         % (x0 - 6, y + 4, LOSS_COLOUR, escape(_num(loss[0] + frac * (loss[1] - loss[0])))))
        if speed:
            parts.append('<text x="%d" y="%.1f" fill="%s">%s</text>'
                         % (x1 + 6, y + 4, SPEED_COLOUR, escape(_num(speed[0] + frac * (speed[1] - speed[0])))))
    for step in sorted({round(steps[0] + i / _TICKS * (steps[1] - steps[0])) for i in range(_TICKS + 1)}):
        if steps[0] <= step <= steps[1]:
            parts.append('<text x="%.1f" y="%d" text-anchor="middle" fill="#444">%s</text>'
                         % (sx(step), y1 + 16, escape(_num(step))))
    parts.append('<text x="%d" y="%d" text-anchor="middle" fill="#444">step</text>' % ((x0 + x1) // 2, height - 6))
    parts += _series(pts, "loss", sx, sy, loss, "loss", LOSS_COLOUR)
    parts += _series(pts, "examples_per_sec", sx, sy, speed, "throughput", SPEED_COLOUR)
    # legend, and what is missing
    last = pts[-1]
    parts.append('<text class="legend" x="%d" y="18" text-anchor="end"><tspan fill="%s">&#9632; loss%s</tspan>'
                 '<tspan fill="%s" dx="12">&#9632; examples/sec%s</tspan></text>'
                 % (x1, LOSS_COLOUR, "" if loss else " (no finite values)",
                    SPEED_COLOUR, "" if speed else " (no finite values)"))
    parts.append('<text class="last" x="%d" y="%d" text-anchor="end" fill="#666" font-size="11">'
                 'step %d: loss %s, %s examples/sec</text>'
                 % (width - 4, height - 6, last.step, escape(_num(last.loss)), escape(_num(last.examples_per_sec))))
    parts.append("</svg>")
    return "".join(parts)
