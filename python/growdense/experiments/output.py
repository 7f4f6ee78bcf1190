"""Writing a reproduction's files: CSV tables, strict JSON and markdown tables."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

__all__ = ["write_csv", "write_json", "jsonable", "markdown_table"]


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``rows`` (dicts with the same keys, in order) as a CSV file with a header; empty if no rows."""
    if not rows:
        Path(path).write_text("")
        return
    keys = list(rows[0])
    for row in rows[1:]:
        keys += [k for k in row if k not in keys]
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as ``None`` (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (``None`` cells empty), ending with a newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
