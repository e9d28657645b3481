"""Files only their owner may read: :func:`private_dir` makes a folder (and its missing parents)
0700 whatever the umask (the state database's folder, the index versions); :func:`private_file`
a file 0600 (a SQLite database and its -wal/-shm files)."""

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


def private_file(path: Path) -> None:
    """Make sure ``path`` exists readable by its owner only: missing folders are created 0700, a
    missing file 0600; an existing file (and its SQLite -wal/-shm files) owned by this user with
    group or other bits is tightened to 0600. Folders that already exist are left as they are."""
    import logging
    import stat

    path = Path(path)
    private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        if st.st_mode & 0o077 and st.st_uid == os.getuid():
            logging.getLogger("ray.serve").warning(
                f"{f}: was readable by others (mode {stat.filemode(st.st_mode)}); setting it to 0600")
            os.chmod(f, 0o600)
