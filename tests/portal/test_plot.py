"""render_plot_svg: a pure function of the progress points, checked as a table."""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import pytest

from portal.logs.tail import Progress, parse_progress
from portal.logs.plot import MAX_POINTS, render_plot_svg

NS = {"s": "http://www.w3.org/2000/svg"}
NAN, INF = float("nan"), float("inf")


def P(step, loss, speed=100.0):
    return Progress(step, loss, speed, 0.1)


def parse(svg: str) -> ET.Element:
    """The SVG must be well-formed XML (a browser would otherwise refuse it inline)."""
    return ET.fromstring(svg)


def shapes(svg: str, cls: str) -> tuple[list[list[tuple[float, float]]], int]:
    """(the point lists of the polylines of class ``cls``, the number of its single dots)."""
    root = parse(svg)
    lines = [[tuple(map(float, xy.split(","))) for xy in el.get("points").split()]
             for el in root.iterfind("s:polyline", NS) if el.get("class") == cls]
    dots = sum(1 for el in root.iterfind("s:circle", NS) if el.get("class") == cls)
    return lines, dots


@pytest.mark.parametrize("points, loss_runs, loss_dots, speed_runs, speed_dots, text", [
    # nothing yet: a frame and a note, no data shapes
    ([], [], 0, [], 0, "no progress lines yet"),
    # one point: a dot for each series (a one-point polyline would draw nothing)
    ([P(5, 2.0)], [], 1, [], 1, "step 5: loss 2, 100 examples/sec"),
    # a plain run: one line each, as many vertices as points
    ([P(i, 3 - i / 10, 100 + i) for i in range(10)], [10], 0, [10], 0, "step 9: loss 2.1"),
    # nan loss in the middle: the loss line breaks (two runs), throughput does not
    ([P(0, 3), P(1, 2.5), P(2, NAN), P(3, 2.0), P(4, 1.5)], [2, 2], 0, [5], 0, "step 4"),
    # a diverged tail: the last value is inf and is named as such
    ([P(0, 3), P(1, 2), P(2, INF)], [2], 0, [3], 0, "loss inf"),
    # an isolated finite value between nans: a dot
    ([P(0, NAN), P(1, 1.0), P(2, NAN)], [], 1, [3], 0, "step 2: loss nan"),
    # every loss nan: no loss shapes, and the legend says why
    ([P(0, NAN), P(1, NAN)], [], 0, [2], 0, "loss (no finite values)"),
])
def test_render_plot_svg(points, loss_runs, loss_dots, speed_runs, speed_dots, text):
    svg = render_plot_svg(points)
    parse(svg)
    loss, ldots = shapes(svg, "loss")
    speed, sdots = shapes(svg, "throughput")
    assert [len(r) for r in loss] == loss_runs and ldots == loss_dots
    assert [len(r) for r in speed] == speed_runs and sdots == speed_dots
    assert text in svg
    coords = [c for run in loss + speed for xy in run for c in xy]
    coords += [float(el.get(a)) for el in parse(svg).iterfind("s:circle", NS) for a in ("cx", "cy")]
    assert all(math.isfinite(c) for c in coords)          # nan/inf never reach a coordinate


@pytest.mark.parametrize("title", ['<script>alert("x")</script>', "a & b", "]]><x/>", "'quoted' \"too\"",
                                   "\u202eevil", "x" * 200])
def test_titles_are_escaped(title):
    for points in ([], [P(1, 1.0), P(2, 0.5)]):
        svg = render_plot_svg(points, title=title)
        root = parse(svg)          # still well-formed: nothing escaped the text nodes
        assert "<script" not in svg and root.find("s:script", NS) is None
        assert root.find("s:title", NS).text.endswith(title)
        assert all(el.tag.split("}")[1] in {"title", "rect", "text", "line", "polyline", "circle"}
                   for el in root)


def test_loss_goes_down_on_screen_as_it_falls():
    svg = render_plot_svg([P(i, 3 - i / 10) for i in range(20)])
    (line,), _ = shapes(svg, "loss")
    xs, ys = [p[0] for p in line], [p[1] for p in line]
    assert xs == sorted(xs) and ys == sorted(ys)          # SVG y grows downwards: lower loss, larger y
    root = parse(svg)
    w, h = float(root.get("width")), float(root.get("height"))
    assert all(0 <= x <= w and 0 <= y <= h for x, y in line)


def test_many_points_are_thinned_and_keep_the_last():
    points = [P(i, 1 / (i + 1)) for i in range(20_000)]
    (line,), _ = shapes(render_plot_svg(points), "loss")
    assert len(line) <= MAX_POINTS + 1
    root = parse(render_plot_svg(points))
    assert math.isclose(line[-1][0], float(root.get("width")) - 72)   # the last step sits on the right edge
    assert "step 19999" in render_plot_svg(points)


def test_points_out_of_order_are_drawn_by_step():
    (line,), _ = shapes(render_plot_svg([P(3, 1.0), P(1, 3.0), P(2, 2.0)]), "loss")
    assert [p[0] for p in line] == sorted(p[0] for p in line)


def test_from_the_log_lines_the_example_prints():
    text = "".join("2024-01-01 10:00:%02d: step %d, loss = %.2f (%.1f examples/sec; 0.05 sec/batch)\n"
                   % (i, i * 10, 4 - i / 10, 500 + i) for i in range(30))
    svg = render_plot_svg(parse_progress(text), title="cifar10")
    (loss,), _ = shapes(svg, "loss")
    assert len(loss) == 30 and "step 290" in svg
    assert re.search(r">cifar10<", svg)
