"""`ranks_svg(ranks)`: the rank allocation as an SVG heatmap, layers as rows and module types as columns.

Written by hand (no plotting dependency). A qualified name is split at its first all-digit part: the digits
are the layer, what follows is the module type, so `model.layers.12.self_attn.q_proj` is layer 12, type
`self_attn.q_proj`, and `bert.encoder.layer.3.attention.self.query` is layer 3, type `attention.self.query`.
A name with no such part (`classifier`, `lm_head`) gets a row of its own, labelled with the name, in a last
column "(no layer)". Columns keep the order in which types first appear in `ranks` (model order: q, k, v, …);
layer rows are sorted by number. The output depends only on `ranks` (its items and their order).
"""
from __future__ import annotations

from typing import Mapping
from xml.sax.saxutils import escape

CELL_W, CELL_H = 72, 22
CHAR_W = 7          # approximate advance of an 11 px sans-serif character, for laying out labels
PAD = 12
NO_LAYER = "(no layer)"
# A sequential colour scale (light to dark blue), interpolated linearly in RGB between these stops.
STOPS = ((0.0, (247, 251, 255)), (0.5, (107, 174, 214)), (1.0, (8, 48, 107)))
EMPTY_FILL = "#eeeeee"  # a layer that has no module of this type


def split_name(name: str) -> tuple[int | None, str]:
    """(layer index, module type) of a qualified name; (None, name) when no part of it is a number."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit() and i + 1 < len(parts):
            return int(p), ".".join(parts[i + 1:])
    return None, name


def colour(t: float) -> tuple[int, int, int]:
    """RGB of the scale at t in [0, 1]."""
    t = min(max(t, 0.0), 1.0)
    for (t0, c0), (t1, c1) in zip(STOPS, STOPS[1:]):
        if t <= t1:
            u = (t - t0) / (t1 - t0)
            return tuple(round(a + (b - a) * u) for a, b in zip(c0, c1))
    return STOPS[-1][1]


def _hex(rgb) -> str:
    return "#%02x%02x%02x" % rgb


def _text_fill(rgb) -> str:
    luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]  # Rec. 709 weights
    return "#000000" if luminance > 140 else "#ffffff"


def ranks_svg(ranks: Mapping[str, int], title: str = "LoRA rank per module") -> str:
    """An SVG document (str) of the heatmap: rank written in each cell, colour scale from min to max rank."""
    if not ranks:
        raise ValueError("ranks_svg: no ranks to draw")
    for name, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"ranks_svg: rank of {name!r} must be an int >= 0, got {r!r}")

    cells: dict[tuple[str, str], int] = {}
    columns: list[str] = []
    layers: set[int] = set()
    loose: list[str] = []
    for name, r in ranks.items():
        layer, kind = split_name(name)
        if layer is None:
            row, kind = name, NO_LAYER
            loose.append(name)
        else:
            row = str(layer)
            layers.add(layer)
        if kind not in columns:
            columns.append(kind)
        if (row, kind) in cells:
            raise ValueError(f"ranks_svg: two names map to layer {row}, type {kind!r} (second: {name!r})")
        cells[(row, kind)] = r
    if NO_LAYER in columns:  # keep the catch-all column last
        columns.remove(NO_LAYER)
        columns.append(NO_LAYER)
    rows = [str(i) for i in sorted(layers)] + loose
    lo, hi = min(ranks.values()), max(ranks.values())

    # Layout: row labels on the left, column labels rotated above the grid, legend on the right.
    label_w = CHAR_W * max(len(r) for r in rows) + PAD
    reach = int(0.72 * CHAR_W * max(len(c) for c in columns))  # extent of a label rotated by -45°, each way
    x0, y0 = PAD + 18 + label_w, 56 + reach + PAD
    grid_w, grid_h = CELL_W * len(columns), CELL_H * len(rows)
    legend_x = x0 + grid_w + 2 * PAD
    width = max(legend_x + 80, x0 + grid_w - CELL_W // 2 + reach + PAD)
    height = max(y0 + grid_h, y0 + 160) + 2 * PAD

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{width // 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">'
           f'{escape(title)}</text>',
           f'<text x="{x0 + grid_w // 2}" y="44" text-anchor="middle" font-size="12">module type</text>',
           f'<text x="{PAD + 4}" y="{y0 + grid_h // 2}" text-anchor="middle" font-size="12" '
           f'transform="rotate(-90 {PAD + 4} {y0 + grid_h // 2})">layer</text>']
    for j, c in enumerate(columns):
        cx = x0 + j * CELL_W + CELL_W // 2
        out.append(f'<text x="{cx}" y="{y0 - 6}" transform="rotate(-45 {cx} {y0 - 6})">{escape(c)}</text>')
    for i, row in enumerate(rows):
        y = y0 + i * CELL_H
        out.append(f'<text x="{x0 - 6}" y="{y + CELL_H // 2 + 4}" text-anchor="end">{escape(row)}</text>')
        for j, c in enumerate(columns):
            x = x0 + j * CELL_W
            r = cells.get((row, c))
            if r is None:
                out.append(f'<rect x="{x}" y="{y}" width="{CELL_W}" height="{CELL_H}" fill="{EMPTY_FILL}" '
                           f'stroke="#ffffff"/>')
                continue
            rgb = colour((r - lo) / (hi - lo) if hi > lo else 0.5)
            out.append(f'<rect x="{x}" y="{y}" width="{CELL_W}" height="{CELL_H}" fill="{_hex(rgb)}" '
                       f'stroke="#ffffff"><title>{escape(f"{row} {c}: rank {r}")}</title></rect>')
            out.append(f'<text x="{x + CELL_W // 2}" y="{y + CELL_H // 2 + 4}" text-anchor="middle" '
                       f'fill="{_text_fill(rgb)}">{r}</text>')

    # Legend: a vertical gradient bar from the max rank (top) to the min rank (bottom).
    bar_y, bar_h = y0, 140
    out.append('<defs><linearGradient id="scale" x1="0" y1="1" x2="0" y2="0">'
               + "".join(f'<stop offset="{t:g}" stop-color="{_hex(c)}"/>' for t, c in STOPS)
               + '</linearGradient></defs>')
    out.append(f'<text x="{legend_x}" y="{bar_y - 8}">rank</text>')
    out.append(f'<rect x="{legend_x}" y="{bar_y}" width="16" height="{bar_h}" fill="url(#scale)" '
               f'stroke="#999999"/>')
    out.append(f'<text x="{legend_x + 22}" y="{bar_y + 10}">{hi}</text>')
    out.append(f'<text x="{legend_x + 22}" y="{bar_y + bar_h}">{lo}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
