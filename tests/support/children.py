"""The servers the suite and the bench start stop when the process that started them
dies, even by SIGKILL (a run cut short by a timeout leaves no redis-server or uvicorn)."""

from __future__ import annotations

import shutil
import threading


def tied_to_starter(argv: list[str]) -> list[str]:
    """``argv`` run so that the child gets SIGTERM when the thread that started it ends
    (Linux's parent-death signal, set by util-linux's ``setpriv``). Only from the main
    thread: a worker thread's end (``asyncio.to_thread``) would stop a server the rest of
    the run still uses. Without ``setpriv``, ``argv`` as it is."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return argv
    return [setpriv, "--pdeathsig", "TERM", "--", *argv]
