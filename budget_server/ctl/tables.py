"""Plain-text tables: columns padded to their widest cell, numbers aligned on the right.

Right-aligned amounts put digits of the same magnitude under each other, which is what
lets a person compare `1,500,000 tok` with `150,000 tok` at a glance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a table."""

    title: str
    """Shown upper-case in the header row."""
    numeric: bool = False
    """Right-aligned: amounts, counts, percentages."""


def table(columns: Sequence[Column], rows: Sequence[Sequence[str]], *, gap: int = 2) -> str:
    """The header and rows, one line each, with no trailing spaces."""
    header = [column.title.upper() for column in columns]
    widths = [len(title) for title in header]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row has {len(row)} cells for {len(columns)} columns: {row!r}")
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    lines = []
    for cells in (header, *rows):
        padded = [
            cell.rjust(width) if column.numeric else cell.ljust(width)
            for column, cell, width in zip(columns, cells, widths, strict=True)
        ]
        lines.append((" " * gap).join(padded).rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    """`name   value` lines with the values aligned, for one record."""
    width = max((len(name) for name, _ in pairs), default=0)
    return "\n".join(f"{name.ljust(width)}  {value}".rstrip() for name, value in pairs)
