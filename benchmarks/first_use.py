"""First-use work shared by processes that start together: build a cache folder exactly once.

``build_once(folder, build)`` returns at once when ``folder`` exists. Otherwise it takes an exclusive lock on
``folder + ".lock"``; the first process to hold it calls ``build(tmp)`` on a fresh temporary folder beside
``folder`` and renames it into place, and every process that waited finds the folder there when it gets the lock,
so it never builds again and never sees a half-written folder. A build that raises leaves no folder and no
temporary files behind, and the next caller tries again. Standard library only (POSIX ``fcntl`` locks).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from typing import Callable


def build_once(folder: str, build: Callable[[str], None]) -> str:
    """Make ``folder`` with ``build`` unless it exists; safe when several processes call it at once.

    Args:
        folder: The cache folder. It only ever appears complete: it is renamed into place after ``build``.
        build: Writes the folder's contents into the (empty, existing) folder it is given.

    Returns:
        ``folder``.
    """
    if os.path.isdir(folder):
        return folder
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    with open(folder + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        if os.path.isdir(folder):  # another process built it while this one waited
            return folder
        tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".", suffix=".tmp", dir=parent)
        try:
            build(tmp)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder
