"""The small reports of the site's commands (calibrate, compare, report): cells, HTML pages, JSON numbers."""

from __future__ import annotations

import html
import math
import re
from typing import Final

from cxr_node.training.metrics import Interval

_IMAGE: Final = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def interval_cell(interval: Interval) -> str:
    """``value (low-high)`` to three decimals; the value alone without an interval; ``n/a`` without a value."""
    if not math.isfinite(interval.value):
        return "n/a"
    if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return f"{interval.value:.3f}"
    return f"{interval.value:.3f} ({interval.low:.3f}-{interval.high:.3f})"


def json_number(value: float) -> float | None:
    """``value`` as a report's JSON holds it: six decimals, or null when it is not finite."""
    return round(float(value), 6) if math.isfinite(value) else None


def interval_json(interval: Interval) -> dict[str, float | None]:
    """An interval as a report's JSON holds it: value, low, high (:func:`json_number` each)."""
    return {key: json_number(value) for key, value in interval.as_dict().items()}


def markdown_page(markdown: str, title: str) -> str:
    """A minimal HTML page of a report: headings, paragraphs, tables as tables, images as images."""
    body: list[str] = []
    table = False
    for line in markdown.splitlines():
        if line.startswith("|---"):
            continue
        if line.startswith("|") != table:
            table = not table
            body.append("<table border=1 cellpadding=4>" if table else "</table>")
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 3)
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("|"):
            cells = "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|"))
            body.append(f"<tr>{cells}</tr>")
        elif _IMAGE.search(line):
            images = " ".join(f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">'
                              for alt, src in _IMAGE.findall(line))  # fmt: skip
            body.append(f"<p>{images}</p>")
        elif line:
            body.append(f"<p>{html.escape(line.replace('**', '').replace('`', ''))}</p>")
    if table:
        body.append("</table>")
    return f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>\n" + "\n".join(body) + "\n"
