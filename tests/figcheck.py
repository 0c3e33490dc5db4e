"""What a reader of a matplotlib figure needs, checked on the drawn figure: a title, labelled axes,
every text (titles, labels, tick labels, legends, table cells) inside the figure and not cut, and no
legend over the data (lines, traced every pixel, and bars).

`problems(fig)` draws the figure with the renderer `savefig` uses and lists what is wrong, one
sentence each; [] means the figure is fine.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

TOLERANCE = 1.0  # pixels: anti-aliasing may touch the edge


def _inside(box: Any, outer: Any, tol: float = TOLERANCE) -> bool:
    return (box.x0 >= outer.x0 - tol and box.y0 >= outer.y0 - tol
            and box.x1 <= outer.x1 + tol and box.y1 <= outer.y1 + tol)


def _texts(fig: Any) -> list[tuple[str, Any]]:
    """(what, artist) for every visible, non-empty text of the figure."""
    from matplotlib.table import Table
    from matplotlib.text import Text

    # Tick labels are left out here: matplotlib keeps labels for ticks outside the view that it never
    # draws; the axes' own bounding boxes (in `problems`) hold the ones drawn.
    ticks = {id(t) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
             for t in axis.get_ticklabels(minor=False) + axis.get_ticklabels(minor=True)}
    found = []
    for artist in fig.findobj(Text):
        if (artist.get_visible() and artist.get_text().strip() and not _hidden_by_parent(artist)
                and id(artist) not in ticks):
            found.append((repr(artist.get_text()[:40]), artist))
    for table in fig.findobj(Table):
        for cell in table.get_celld().values():
            if cell.get_text().get_text().strip():
                found.append((f"table cell {cell.get_text().get_text()[:30]!r}", cell))
    return found


def _hidden_by_parent(artist: Any) -> bool:
    axes = artist.axes
    return axes is not None and not axes.get_visible()


def _line_points(line: Any, step: float = 1.0) -> np.ndarray:
    """A line's path in display pixels, a point at least every `step` pixels along each segment."""
    xy = line.get_transform().transform(np.column_stack([line.get_xdata(orig=False), line.get_ydata(orig=False)]))
    xy = xy[np.isfinite(xy).all(axis=1)]
    if line.get_linestyle() in ("None", "none", "", " ") or len(xy) < 2:
        return xy  # markers only: the points themselves
    out = [xy[:1]]
    for a, b in itertools.pairwise(xy):
        n = max(1, int(np.ceil(np.hypot(*(b - a)) / step)))
        out.append(a + (b - a) * (np.arange(1, n + 1)[:, None] / n))
    return np.concatenate(out)


def problems(fig: Any) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.patches import Rectangle

    canvas = FigureCanvasAgg(fig)  # the canvas savefig draws a PNG on
    canvas.draw()  # lays the figure out as savefig does
    renderer = canvas.get_renderer()
    frame = fig.bbox
    found: list[str] = []
    titled = bool(fig._suptitle and fig._suptitle.get_text().strip())
    for what, artist in _texts(fig):
        box = artist.get_window_extent(renderer)
        if not _inside(box, frame):
            found.append(f"{what} is cut off: {box.bounds} outside the figure {frame.bounds}")
        if hasattr(artist, "get_text") and not isinstance(artist.get_text(), str):  # a table cell: its text fits it
            inner = artist.get_text().get_window_extent(renderer)
            if not _inside(inner, box, tol=2.0):
                found.append(f"{what}: its text overflows the cell")
    for ax in fig.axes:
        if not ax.get_visible() or not ax.axison:
            continue
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):  # its drawn tick labels and label
            box = axis.get_tightbbox(renderer)
            if box is not None and not _inside(box, frame):
                found.append(f"axes {ax.get_title()!r}: the {name} axis is cut off: {box.bounds} outside {frame.bounds}")
        if not (titled or ax.get_title().strip()):
            found.append(f"axes at {ax.get_position().bounds} has no title and the figure none")
        for name, label in (("x", ax.get_xlabel()), ("y", ax.get_ylabel())):
            if not label.strip():
                found.append(f"axes {ax.get_title()!r}: the {name} axis has no label")
        legend = ax.get_legend()
        if legend is None or not legend.get_visible():
            continue
        box = legend.get_window_extent(renderer)
        for line in ax.get_lines():
            if line.get_visible() and len(line.get_xdata()):
                pts = _line_points(line)
                covered = int(np.sum((pts[:, 0] > box.x0) & (pts[:, 0] < box.x1)
                                     & (pts[:, 1] > box.y0) & (pts[:, 1] < box.y1)))
                if covered:
                    found.append(f"axes {ax.get_title()!r}: the legend covers {covered} pixels of {line.get_label()!r}")
        for patch in ax.patches:
            drawn = isinstance(patch, Rectangle) and patch.get_visible() and patch.get_width() and patch.get_height()
            if drawn and box.overlaps(patch.get_window_extent(renderer)):
                found.append(f"axes {ax.get_title()!r}: the legend covers a bar")
                break
    return found
