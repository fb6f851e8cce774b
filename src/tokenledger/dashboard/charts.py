"""Charts drawn on the server as inline SVG: readable without a network or a script.

Every label is escaped here (the SVG is inserted into pages as markup).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from markupsafe import Markup

PALETTE = ("#2f6fdf", "#e0892b", "#3a9d5d", "#c2413b", "#8a5cc2", "#7a6a55", "#d25fa8",
           "#5f7b8a", "#b5b02c", "#2aa6b5")
LINE = "#111111"


def _nice(top: float) -> float:
    """A round axis maximum at or above ``top``."""
    if top <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(top))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= top:
            return step * power
    return 10 * power


def _number(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:,.3g}"


def bars(labels: Sequence[str], series: dict[str, Sequence[float]], *, unit: str,
         title: str, line: tuple[str, Sequence[float]] | None = None,
         line_unit: str = "", every: int = 1, width: int = 760,
         height: int = 260) -> Markup:
    """A stacked bar chart of ``series`` over ``labels`` (one bar per label), with an
    optional ``line`` on its own right-hand axis; ``every`` labels the x axis sparsely."""
    left, right, top_pad, bottom = 56, 64 if line else 16, 16, 44
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    n = max(len(labels), 1)
    totals = [sum(values[i] for values in series.values()) for i in range(len(labels))]
    y_max = _nice(max(totals, default=0))
    slot = plot_w / n
    bar_w = max(slot * 0.8, 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
             f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
             f"<title>{escape(title)}</title>"]
    for k in range(5):
        value = y_max * k / 4
        y = top_pad + plot_h - plot_h * k / 4
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="#dddddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" '
                     f'font-size="11">{escape(_number(value))}</text>')
    parts.append(f'<text x="12" y="{top_pad + plot_h / 2:.1f}" font-size="11" '
                 f'transform="rotate(-90 12 {top_pad + plot_h / 2:.1f})" '
                 f'text-anchor="middle">{escape(unit)}</text>')
    for i, label in enumerate(labels):
        x = left + slot * i + (slot - bar_w) / 2
        base = top_pad + plot_h
        for j, (name, values) in enumerate(series.items()):
            value = values[i]
            if value <= 0:
                continue
            h = plot_h * value / y_max
            base -= h
            parts.append(f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" '
                         f'height="{h:.1f}" fill="{PALETTE[j % len(PALETTE)]}">'
                         f"<title>{escape(label)} {escape(name)}: "
                         f"{escape(_number(value))} {escape(unit)}</title></rect>")
        if i % every == 0:
            parts.append(f'<text x="{left + slot * i + slot / 2:.1f}" '
                         f'y="{top_pad + plot_h + 14}" font-size="10" '
                         f'text-anchor="middle">{escape(label)}</text>')
    if line is not None:
        name, values = line
        l_max = _nice(max(values, default=0))
        points = " ".join(
            f"{left + slot * i + slot / 2:.1f},{top_pad + plot_h - plot_h * v / l_max:.1f}"
            for i, v in enumerate(values))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{LINE}" '
                     f'stroke-width="2"><title>{escape(name)}</title></polyline>')
        for k in range(5):
            y = top_pad + plot_h - plot_h * k / 4
            parts.append(f'<text x="{left + plot_w + 6}" y="{y + 4:.1f}" font-size="11">'
                         f"{escape(_number(l_max * k / 4))}</text>")
        parts.append(f'<text x="{width - 8}" y="{top_pad + plot_h / 2:.1f}" font-size="11" '
                     f'transform="rotate(90 {width - 8} {top_pad + plot_h / 2:.1f})" '
                     f'text-anchor="middle">{escape(line_unit)}</text>')
    legend = list(series) + ([line[0]] if line else [])
    x = left
    for j, name in enumerate(legend):
        colour = LINE if line and j == len(series) else PALETTE[j % len(PALETTE)]
        parts.append(f'<rect x="{x}" y="{height - 14}" width="10" height="10" '
                     f'fill="{colour}"/>')
        parts.append(f'<text x="{x + 14}" y="{height - 5}" font-size="11">'
                     f"{escape(name)}</text>")
        x += 24 + 7 * len(name)
    parts.append("</svg>")
    return Markup("".join(parts))
