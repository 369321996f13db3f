"""Process lifecycle: dying with the parent, and a bounded SIGTERM shutdown."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time

from corral.runner.protocol import PARENT_PID_ENV

log = logging.getLogger("runner")

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Exit when the parent goes, even if it was SIGKILLed.

    Linux delivers SIGTERM through prctl(PR_SET_PDEATHSIG); elsewhere (macOS)
    a watchdog thread polls the parent pid. The watchdog runs everywhere as a
    backstop, and also watches CORRAL_PARENT_PID when the supervisor sets it.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except OSError:
            pass
        if os.getppid() != parent:  # the parent died before prctl took effect
            _parent_gone()
    watched = int(os.environ.get(PARENT_PID_ENV, "0") or 0)
    threading.Thread(target=_watch, args=(parent, watched), name="parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(parent: int, watched: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent or (watched > 0 and not _alive(watched)):
            _parent_gone()
            return


def _parent_gone() -> None:
    log.info("parent process is gone; shutting down")
    os.kill(os.getpid(), signal.SIGTERM)
    hard_exit_after(2.0, 0)


def hard_exit_after(seconds: float, code: int) -> None:
    """Exit no matter what after `seconds` (a stuck shutdown must not linger)."""

    def _later() -> None:
        time.sleep(seconds)
        log.info("shutdown took too long; exiting now")
        logging.shutdown()
        os._exit(code)

    threading.Thread(target=_later, name="hard-exit", daemon=True).start()
