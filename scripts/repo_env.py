"""What the benchmark scripts share to start the job from this checkout: the repository root, and an
environment whose PYTHONPATH puts it (or another folder holding a pipeline package) first while keeping
the caller's entries (a folder of extra wheels, for instance). The scripts import it as a sibling module
(`python3 scripts/NAME.py`)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def repo_env(root: Path = REPO, **extra: str) -> dict[str, str]:
    """os.environ with root (this checkout unless told) first on PYTHONPATH, plus extra variables."""
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}
