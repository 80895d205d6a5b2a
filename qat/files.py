"""Writes a kill cannot leave half done: write a temporary file beside the target, then rename."""

from __future__ import annotations

import json
import os


def write_atomic(path: str, data: bytes) -> int:
    """Replace `path` with `data` in one rename; returns the number of bytes written."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return len(data)


def write_json(path: str, payload: dict) -> None:
    write_atomic(path, json.dumps(payload, indent=2).encode())
