"""Reading JSONL files (metrics, score files) with errors that name the file and line.

Kept free of torch and Megatron imports so light tools (``tools/review_run.py``) can use it.
"""

import json
from typing import Any, Iterator, Tuple


def read_jsonl(path: str) -> Iterator[Tuple[int, Any]]:
    """(1-based line number, parsed value) for every non-blank line of ``path``.

    A line that is not valid JSON raises ValueError ``PATH:LINE: not valid JSON (reason, column
    C): 'the line'``.
    """
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}): "
                                 f"{line.strip()[:80]!r}") from None
            yield lineno, value
