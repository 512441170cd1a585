"""The command line's data channel: one JSON object per line on stdout (logs go to stderr)."""

from __future__ import annotations

import json
import sys


def emit(obj: object) -> None:
    """Write ``obj`` as one JSON line on stdout and flush (a reader sees each line as it is written)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
