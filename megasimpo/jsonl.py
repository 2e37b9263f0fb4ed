"""Reading JSONL files (metrics, score files) with errors that name the file and line.

Kept free of torch and Megatron imports so light tools (``tools/review_run.py``) can use it.
"""

import json
from typing import Any, Iterator, Tuple


def json_error(path: str, lineno: int, line: str, err: json.JSONDecodeError) -> ValueError:
    """``PATH:LINE: not valid JSON (reason, column C): '...text at C...'``: the column counts
    characters of the line as it is in the file (leading blanks included), and the text shown
    is the line from that column's neighbourhood, so the two always agree."""
    line = line.rstrip("\r\n")
    start = max(0, err.colno - 41)
    excerpt = ("..." if start else "") + line[start:start + 80] + (
        "..." if len(line) > start + 80 else "")
    return ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}, column {err.colno}): "
                      f"{excerpt!r}")


def read_jsonl(path: str) -> Iterator[Tuple[int, Any]]:
    """(1-based line number, parsed value) for every non-blank line of ``path``.

    A line that is not valid JSON raises ValueError ``PATH:LINE: not valid JSON (reason, column
    C): '...'`` (``json_error``).
    """
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise json_error(path, lineno, line, e) from None
            yield lineno, value
