"""Fault injection for the reliability suite, loaded by a `crossinit` subprocess through PYTHONPATH.

Does nothing unless CROSSINIT_FAULT is set. It wraps the file-system calls that change something
(os.open and open() for writing, mkdir, rename, replace, unlink, rmdir) and counts those that touch
CROSSINIT_FAULT_ROOT (or any call relative to a directory fd, which only shutil.rmtree makes in crossinit).
CROSSINIT_FAULT_OPS=rename,replace restricts what is counted; an open for writing is "create" when the file
does not exist yet, else "open" (a full disk refuses the first, not the second). SQLite writes its files
from C, out of reach of these wrappers: what is counted of the catalog is each transaction's COMMIT
("commit", on the database's path), the one moment its changes reach the file.

    CROSSINIT_FAULT=count:FILE        append one line per counted call to FILE, and carry on
    CROSSINIT_FAULT=kill-before:N     SIGKILL this process just before the N-th counted call
    CROSSINIT_FAULT=hang-before:N:F   just before the N-th counted call, create F and sleep forever
    CROSSINIT_FAULT=errno:NAME        every counted call fails with OSError(errno.NAME) (EROFS, ENOSPC ...)
    CROSSINIT_FAULT=collective-timeout:S   in a process started by `accelerate launch` (LOCAL_RANK set),
                                      torch.distributed's default collective timeout (30 minutes) becomes
                                      S seconds, so a test can wait longer than the default would allow

SIGKILL is what `kill -9` sends: no finally blocks, no atexit, nothing flushed; the OS releases flocks.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import signal
import sqlite3
import time

_SPEC = os.environ.get("CROSSINIT_FAULT", "")
_ROOT = os.path.realpath(os.environ.get("CROSSINIT_FAULT_ROOT", "/nonexistent")) + os.sep
_OPS = {op for op in os.environ.get("CROSSINIT_FAULT_OPS", "").split(",") if op}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_count = 0


def _under_root(path: object) -> bool:
    try:
        text = os.fsdecode(os.fspath(path))
    except TypeError:
        return False
    return os.path.realpath(os.path.abspath(text)).startswith(_ROOT) or os.path.abspath(text).startswith(_ROOT)


def _event(op: str, path: object, dir_fd: object = None) -> None:
    global _count
    if _OPS and op not in _OPS:
        return
    if dir_fd is None and not _under_root(path):
        return
    _count += 1
    kind, _, arg = _SPEC.partition(":")
    if kind == "count":
        with _real_open(arg, "a", encoding="utf-8") as log:
            log.write(f"{_count} {op} {os.fsdecode(os.fspath(path))}\n")
    elif kind == "kill-before" and _count == int(arg):
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang-before":
        nth, _, ready = arg.partition(":")
        if _count == int(nth):
            _real_open(ready, "w").close()
            while True:
                time.sleep(60)
    elif kind == "errno":
        code = getattr(errno, arg)
        raise OSError(code, os.strerror(code), os.fsdecode(os.fspath(path)))


def _wrap(name: str, op: str) -> None:
    real = getattr(os, name)

    def wrapper(path, *args, **kwargs):
        _event(op, path, kwargs.get("dir_fd") or kwargs.get("src_dir_fd"))
        return real(path, *args, **kwargs)

    setattr(os, name, wrapper)


_real_open = builtins.open

if _SPEC.startswith("collective-timeout:"):
    if "LOCAL_RANK" in os.environ:  # a worker, not the launcher: its own rendezvous keeps its timeouts
        from datetime import timedelta

        import torch.distributed.constants as _constants
        import torch.distributed.distributed_c10d as _c10d

        _short = timedelta(seconds=float(_SPEC.partition(":")[2]))
        _constants.default_pg_timeout = _c10d.default_pg_timeout = _short
elif _SPEC:
    _real_os_open = os.open

    def _opened(path: object) -> str:
        try:
            return "open" if os.path.exists(path) else "create"
        except (TypeError, ValueError):
            return "open"

    def _os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS:
            _event(_opened(path), path, kwargs.get("dir_fd"))
        return _real_os_open(path, flags, *args, **kwargs)

    def _open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            _event(_opened(file), file)
        return _real_open(file, mode, *args, **kwargs)

    os.open = _os_open
    builtins.open = _open
    io.open = _open
    for _name, _op in (("mkdir", "mkdir"), ("rename", "rename"), ("replace", "replace"), ("unlink", "unlink")):
        _wrap(_name, _op)
    _wrap("rmdir", "rmdir")

    class _Counted(sqlite3.Connection):
        """A connection that reports each COMMIT before it runs (crossinit commits with an explicit COMMIT)."""

        where = ""

        def execute(self, sql, *args, **kwargs):
            if sql.strip().upper() == "COMMIT":
                _event("commit", self.where)
            return super().execute(sql, *args, **kwargs)

    _real_connect = sqlite3.connect

    def _connect(database, *args, **kwargs):
        kwargs.setdefault("factory", _Counted)
        connection = _real_connect(database, *args, **kwargs)
        if isinstance(connection, _Counted):
            connection.where = os.fsdecode(database)
        return connection

    sqlite3.connect = _connect
