"""Files only their owner may read: :func:`private_dir` makes a folder (and its missing parents)
0700 whatever the umask (the governor's database, the index versions)."""

from __future__ import annotations

import os
from pathlib import Path


def private_dir(path: Path) -> None:
    """``path`` made (with its missing parents) 0700, whatever the umask; one that exists is left alone."""
    missing = []
    d = Path(path)
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:  # made by someone else meanwhile: not ours to change
            continue
        os.chmod(d, 0o700)
