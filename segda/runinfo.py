"""Versions and source commit recorded in every run.json and report, so results can be traced to code."""

from __future__ import annotations

import subprocess
from pathlib import Path

import segda


def run_info() -> dict:
    import accelerate
    import peft
    import torch
    import transformers

    return {"versions": {"segda": segda.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__,
                         "accelerate": accelerate.__version__},
            "commit": _commit()}


def _commit() -> str | None:
    try:  # fixed argv, no shell: nothing from data or config reaches this command
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(segda.__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
