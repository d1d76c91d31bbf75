"""Benchmarks that own one section of a Markdown page: each rewrites its "## Title" section and keeps the rest."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: str | Path, title: str, body: str) -> None:
    """Put ``## title`` + ``body`` in place of that section of ``path`` (up to the next "## "), or at the end."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    head = f"## {title}\n"
    section = head + "\n" + body.strip() + "\n"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + section + ("" if nxt < 0 else "\n" + text[nxt + 1 :])
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def publish_section(path: str | Path, title: str, lines: list[str]) -> int:
    """A benchmark's last step: its lines as the ``## title`` section of ``path``, echoed; -> exit status 0."""
    text = "\n".join(lines) + "\n"
    replace_section(path, title, text)
    print(text)
    return 0
