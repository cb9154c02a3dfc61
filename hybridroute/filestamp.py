"""Cheap identity of a file on disk, for the watchers that re-read a file only when it
changed: TLS certificates (`certs.credentials`), the policy (`router.policy.store`) and
the audit trail's certificate notes (`router.audit.notes`).

A stat, no read: cheap enough to take per TLS handshake or per poll. The ctime is part
of it so that a file that could not be read is read again once its owner or mode is
fixed: chown and chmod change neither the inode, the size nor the mtime.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["Stamp", "stamp"]

# (device, inode, size, mtime_ns, ctime_ns), or None when the file cannot be stat'ed.
Stamp = tuple[int, int, int, int, int] | None


def stamp(path: Path) -> Stamp:
    """The file's identity, contents and access as of now; None if it is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
