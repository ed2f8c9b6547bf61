"""Child-process helpers shared by the supervisor and the embedded database."""
from __future__ import annotations

import ctypes
import os
import signal
import socket

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` asking Linux to signal the child when its parent dies (even by kill -9).

    This is what keeps a ``kill -9`` of run.py (or of pytest) from leaving services or the database running,
    holding ports and files. Call it in the parent, before the fork: a parent that died between the fork and
    the ``prctl`` sends no signal, so the child checks that its parent is still the one that started it.
    Linux sends the signal when the *thread* that forked exits, so fork from a thread that lives as long as
    the process.
    """
    parent = os.getpid()

    def _preexec():
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except OSError:
            return
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)
    return _preexec


def set_title(title: str) -> None:
    """Name this process in ``ps`` and ``/proc/PID/cmdline`` (e.g. ``bookshop orders :8004``)."""
    import setproctitle
    setproctitle.setproctitle(title)


def service_title(name: str, port: int) -> str:
    return f"bookshop {name} :{port}"


DATABASE_TITLE = "bookshop database"
SUPERVISOR_TITLE = "bookshop supervisor"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
