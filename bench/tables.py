"""Markdown tables for the bench's output: one per section, under a `## name` heading."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def markdown_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, so the table also reads as plain text."""
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), rule, *(line(b) for b in body)])


def print_section(title: str, table: str) -> None:
    """A section of stdout: its heading, its table, a blank line; flushed at once."""
    print(f"## {title}\n\n{table}\n", flush=True)


def note(message: str) -> None:
    """Progress for the reader on stderr; stdout carries only the tables."""
    print(message, file=sys.stderr, flush=True)
