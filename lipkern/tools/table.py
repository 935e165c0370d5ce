"""The one text-table formatter of the tools: left-aligned columns under a header and a rule."""

from __future__ import annotations

from typing import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], rule: bool = True) -> str:
    """``rows`` under ``header``, columns padded to their widest cell (cells shown with ``str``;
    ``None`` as ``-``), with a dashed rule under the header when ``rule``."""
    body = [["-" if cell is None else str(cell) for cell in row] for row in rows]
    for row in body:
        if len(row) != len(header):
            raise ValueError(f"rows must have {len(header)} cells like the header, got {row}")
    widths = [max([len(h)] + [len(row[i]) for row in body]) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    lines = [line(header)]
    if rule:
        lines.append("  ".join("-" * w for w in widths))
    lines += [line(row) for row in body]
    return "\n".join(lines)
