"""Lines for the person running a job, on stderr: what the job did on its own to carry on."""
from __future__ import annotations

import sys


def warn(message: str) -> None:
    print(f"infinipipe: warning: {message}", file=sys.stderr, flush=True)
