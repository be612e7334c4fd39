"""docs/benchmarks.md is shared by every benchmark: each one owns one ``## title`` section."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, title: str, command: str, lines: list[str]) -> None:
    """Replace (or append) the section ``## title`` of ``path``, leaving every other section alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n`{command.strip()}`\n\n" + "\n".join(lines) + "\n"
    head, marker, rest = text.partition(f"## {title}\n")
    if marker:
        tail = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
