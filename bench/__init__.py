"""Benchmarks, run on demand and never as tests. Each prints Markdown; with --write it also puts its output
into a docs page between its own markers, so the page's numbers are exactly one run's."""
from __future__ import annotations

from pathlib import Path


class Output:
    """Lines printed as they come and kept, to be written into a docs page afterwards."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def write_into(self, page: str | Path, name: str) -> None:
        """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``page``."""
        path = Path(page)
        text = path.read_text()
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in text or end not in text:
            raise SystemExit(f"error: {path} has no {start} ... {end} markers to write between")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        path.write_text(head + start + "\n" + "\n".join(self.lines) + "\n" + end + tail)
