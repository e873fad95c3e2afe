"""Instruction data from the Python reference manual that every CPython carries (``pydoc_data``).

Each topic of ``pydoc_data.topics`` (``"assert"``, ``"class"``, ...) is cut at its section
headings, and each section into answers of about ``answer_chars`` characters at paragraph
boundaries, so an answer fits a short ``max_seq_length``. The prompt names the section and the
part. All records of a topic share the topic as their split group: the validation topics are
never seen in training.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from llamahome.data.sources.files import Record
from llamahome.utils.paths import atomic_write, cache_root, fingerprint

# A heading is a line underlined with *, = or - of the same length or longer.
_HEADING = re.compile(r"^(?P<title>[^\n]+)\n(?P<rule>[*=\-]{3,})\s*$", re.MULTILINE)


def topics() -> dict[str, str]:
    """Return the running interpreter's ``pydoc_data.topics`` (topic name → manual text)."""
    from pydoc_data.topics import topics as table

    return dict(table)


def sections(text: str) -> list[tuple[str, str]]:
    """Cut a topic's text into ``(heading, body)`` pairs at its underlined headings.

    Args:
        text: A topic's text.

    Returns:
        Sections in order; text before the first heading gets an empty heading.
    """
    out: list[tuple[str, str]] = []
    marks = [m for m in _HEADING.finditer(text) if len(m["rule"]) >= len(m["title"].rstrip()) - 1]
    if not marks or marks[0].start() > 0:
        head = text[: marks[0].start() if marks else len(text)].strip()
        if head:
            out.append(("", head))
    for m, nxt in zip(marks, [*marks[1:], None], strict=True):
        body = text[m.end() : nxt.start() if nxt else len(text)].strip()
        if body:
            out.append((m["title"].strip(), body))
    return out


def split_answer(body: str, answer_chars: int) -> list[str]:
    """Cut a section into parts of about ``answer_chars``, at blank lines (else at lines).

    Args:
        body: Section text.
        answer_chars: Soft limit per part.

    Returns:
        Non-empty parts whose concatenation (with blank lines) is the section.
    """
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", body):
        if len(para) <= answer_chars:
            pieces.append(para)
            continue
        lines, chunk = para.split("\n"), ""
        for line in lines:
            if chunk and len(chunk) + 1 + len(line) > answer_chars:
                pieces.append(chunk)
                chunk = line
            else:
                chunk = f"{chunk}\n{line}" if chunk else line
        pieces.append(chunk)
    parts: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > answer_chars:
            parts.append(current)
            current = piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    if current.strip():
        parts.append(current)
    return [p.strip("\n") for p in parts if p.strip()]


def pydoc_records(answer_chars: int = 600) -> list[Record]:
    """Build instruction records (``instruction``, ``input``, ``output``, ``topic``) from pydoc.

    Args:
        answer_chars: Soft limit on an answer's length in characters.

    Returns:
        Records in topic order; origin ``pydoc:<topic>#<n>``, group ``<topic>``.
    """
    records: list[Record] = []
    for topic, text in sorted(topics().items()):
        n = 0
        for heading, body in sections(text):
            title = heading or topic
            parts = split_answer(body, answer_chars)
            for k, part in enumerate(parts, start=1):
                where = f" (part {k} of {len(parts)})" if len(parts) > 1 else ""
                instruction = (
                    f"Explain the Python reference manual section '{title}'{where}."
                    if heading
                    else f"Explain the Python topic '{topic}'{where}."
                )
                n += 1
                records.append(
                    Record(
                        data={
                            "instruction": instruction,
                            "input": "",
                            "output": part,
                            "topic": topic,
                        },
                        origin=f"pydoc:{topic}#{n}",
                        group=topic,
                    )
                )
    return records


def write_pydoc_alpaca(cache_dir: str | Path | None = None, answer_chars: int = 600) -> Path:
    """Write the pydoc records as an alpaca-format JSON file in the data cache (once).

    The file is built at run time from the running interpreter, so nothing large is committed
    and every machine can build it offline. Records keep a ``topic`` field, so
    ``data.group_by=topic`` splits it by topic.

    Args:
        cache_dir: Cache root (default ``$LLAMAHOME_CACHE`` or ``~/.cache/llamahome``).
        answer_chars: Soft limit on an answer's length in characters.

    Returns:
        The path of the JSON file.
    """
    records = pydoc_records(answer_chars)
    rows = [r.data for r in records]
    key = fingerprint(sys.version, answer_chars, rows)
    path = cache_root(cache_dir) / "data" / "samples" / f"pydoc_alpaca-{key}.json"
    if not path.is_file():
        # DDP ranks may write it at once: each writes whole, the last rename wins.
        with atomic_write(path, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, ensure_ascii=False, indent=1)
    return path
