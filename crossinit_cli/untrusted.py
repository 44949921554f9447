"""Reading files crossinit did not write (embeddings to import, a tool's settings, the config file, photos):
only regular files, never more than a cap that suits what the file is, never blocking, and read once.

- A FIFO, a device (`/dev/zero`, a terminal), a socket or a folder is refused in one line before it is read:
  the path is checked with `os.stat`, then opened with `O_NONBLOCK` (opening a FIFO swapped in after the
  check does not wait for a writer) and checked again through the open handle.
- The size the file system reports must be within the cap, and no more than the cap is ever read, so a
  file that grows while it is read cannot make crossinit allocate more.
- `read_bytes` reads the whole file into memory in chunks (Ctrl-C is honoured between them) and compares
  what it got with the size: a file shrunk or grown while read is a one-line error. Nothing is memory-mapped,
  so a writer truncating the file cannot kill the process with SIGBUS.
- A pickle is walked opcode by opcode before anything unpickles it (`screen_pickle`): one whose objects,
  written out in full, would be enormous (shared tuples nested as a dict key: a "hash bomb" whose hashing
  never ends) or nested deeper than Python can hash is refused in bounded time.

`OSError`s of the file system (no such file, permission denied) pass through for the caller to word;
everything this module refuses is a `CrossinitError` naming the file.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

from crossinit_cli.errors import CrossinitError

KIB = 1024
MIB = 1024 * KIB
SETTINGS_BYTES = 4 * MIB
"""A tool's settings file (webui-user.sh, cmd_args.py, config.json, extra_model_paths.yaml): a few KiB."""
CONFIG_BYTES = 1 * MIB
"""crossinit's own config.toml: a few lines."""
_CHUNK = 1 * MIB


class NotRegular(CrossinitError):
    """The path is a FIFO, a device, a socket or a folder."""


class TooLarge(CrossinitError):
    """The file is larger than what such a file may be."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _refuse_irregular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise NotRegular(f"{path} is not a regular file ({_kind(mode)})")


def open_regular(path: Path, limit: int) -> BinaryIO:
    """`path` opened for reading, once it is known to be a regular file of at most `limit` bytes.

    Symbolic links are followed (an import of a linked file is fine); what they lead to must be a regular
    file. Raises NotRegular, a CrossinitError for a file over `limit`, or the file system's OSError."""
    path = Path(path)
    _refuse_irregular(path, os.stat(path).st_mode)  # before opening: opening a FIFO or a device can block
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        _refuse_irregular(path, info.st_mode)  # swapped for something else between the two looks
        if info.st_size > limit:
            too_much = f"{path} is {_size(info.st_size)}; more than the {_size(limit)} such a file may be"
            raise TooLarge(too_much, info.st_size)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path, limit: int) -> bytes:
    """Every byte of the regular file `path` (at most `limit`), read once; see `open_regular` for what is
    refused. A file whose size changes while it is read is refused in one line."""
    path = Path(path)
    with open_regular(path, limit) as handle:
        expected = os.fstat(handle.fileno()).st_size
        chunks, total = [], 0
        while total <= limit:
            chunk = handle.read(min(_CHUNK, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    if total > limit:
        raise TooLarge(f"{path} grew past {_size(limit)} while it was read", total)
    if total != expected:
        raise CrossinitError(f"{path} changed while it was read ({expected} bytes, then {total}); try again")
    return b"".join(chunks)


def read_text(path: Path, limit: int, *, errors: str = "strict") -> str:
    """`read_bytes` decoded as UTF-8 (a UnicodeDecodeError for bad bytes unless `errors` says otherwise)."""
    return read_bytes(path, limit).decode("utf-8", errors=errors)


def _size(count: int) -> str:
    if count >= MIB:
        return f"{count / MIB:.0f} MiB"
    if count >= KIB:
        return f"{count / KIB:.0f} KiB"
    return f"{count} bytes"


# ---- pickles --------------------------------------------------------------------------------------------------

MAX_PICKLE_OPS = 100_000
"""An embedding's pickle is a few hundred opcodes (the tensors' bytes are stored beside it)."""
MAX_PICKLE_NODES = 1_000_000
"""How many objects a pickle may stand for when every shared reference is written out in full: what hashing,
comparing or printing it may visit. A real embedding's is under a thousand."""
MAX_PICKLE_DEPTH = 200
"""How deeply its objects may nest (C code hashing a nested tuple recurses once per level)."""

# Opcodes that add what is below them on the stack to the object under them, rather than make a new one.
_ADDS_TO_OBJECT = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


class _Malformed(ValueError):
    pass


class _TooCostly(Exception):
    pass


def screen_pickle(data: bytes, where: object, *, pickles: int = 1) -> None:
    """Refuse, in one line naming `where`, pickle bytes that would take unbounded time to unpickle or use.

    Walks the opcodes of up to `pickles` pickles written one after another (torch's legacy format has five)
    without running any, and builds the graph of objects they make: which object holds which, shared
    references (memo gets) included. Refused: more than MAX_PICKLE_OPS opcodes, a graph that written out
    in full has more than MAX_PICKLE_NODES objects (a tuple of shared tuples 12 deep as a dict key makes the
    unpickler hash ~10^12 of them), nesting deeper than MAX_PICKLE_DEPTH: a CrossinitError. Bytes that are not
    a pickle: ValueError, for the caller to word."""
    import pickletools

    stream = io.BytesIO(data)
    ops = 0
    for _ in range(pickles):
        if stream.tell() >= len(data):
            break
        graph = _Graph(ops)
        try:
            root = _walk(pickletools.genops(stream), graph)
        except _Malformed as exc:
            raise ValueError(f"malformed pickle: {exc}") from None
        except (ValueError, EOFError, TypeError, IndexError, KeyError) as exc:
            raise ValueError(f"malformed pickle: {str(exc).splitlines()[0][:120]}") from None
        except _TooCostly as exc:
            raise CrossinitError(f"{where} was refused: its pickle {exc}") from None
        ops = graph.ops
        if root is not None:  # every object, not only what the root holds: a dict dropped after it was built
            _measure(graph.children, where)  # was hashed all the same


_MARK = -1


class _Graph:
    """The objects a pickle's opcodes make, as numbers: `children[i]` lists what object i refers to."""

    def __init__(self, ops: int) -> None:
        self.children: list[list[int]] = []
        self.stack: list[int] = []
        self.memo: dict[int, int] = {}
        self.ops = ops  # opcodes walked so far, this pickle's and those before it

    def pop(self, count: int = 1) -> list[int]:
        stack = self.stack
        if count > len(stack) or _MARK in stack[len(stack) - count :]:
            raise _Malformed("stack underflow")
        taken = stack[len(stack) - count :]
        del stack[len(stack) - count :]
        return taken

    def pop_mark(self) -> list[int]:
        if _MARK not in self.stack:
            raise _Malformed("no mark")
        at = len(self.stack) - 1 - self.stack[::-1].index(_MARK)
        taken = self.stack[at + 1 :]
        del self.stack[at:]
        return taken

    def top(self) -> int:
        if not self.stack or self.stack[-1] == _MARK:
            raise _Malformed("no object where one was expected")
        return self.stack[-1]

    def step(self, opcode, arg: object) -> None:  # opcode: a pickletools.OpcodeInfo
        """Apply one opcode to the stack and the memo."""
        import pickletools

        name, before = opcode.name, opcode.stack_before
        if name == "MARK":
            self.stack.append(_MARK)
        elif name in _MEMO_PUT or name == "MEMOIZE":
            self.memo[len(self.memo) if name == "MEMOIZE" else int(arg)] = self.top()
        elif name in _MEMO_GET:
            if int(arg) not in self.memo:
                raise _Malformed("memo get before put")
            self.stack.append(self.memo[int(arg)])
        elif name == "POP":
            self.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            self.stack.append(self.top())
        elif name in _ADDS_TO_OBJECT:  # the object under the items grows; it stays the same object
            added = self.pop_mark() if pickletools.markobject in before else self.pop(len(before) - 1)
            self.children[self.top()].extend(added)
        else:  # a new object made of what it takes off the stack
            if pickletools.markobject in before:
                taken = self.pop_mark()
                taken = self.pop(before.index(pickletools.markobject)) + taken
            else:
                taken = self.pop(len(before))
            for _ in opcode.stack_after:
                self.children.append(taken)
                self.stack.append(len(self.children) - 1)
                taken = []


def _walk(opcodes, graph: _Graph) -> int | None:
    """Walk one pickle's opcodes into `graph`; returns its root object (None without a STOP)."""
    for opcode, arg, _ in opcodes:
        graph.ops += 1
        if graph.ops > MAX_PICKLE_OPS:
            raise _TooCostly(f"has more than {MAX_PICKLE_OPS:,} operations; an embedding's has a few hundred")
        if opcode.name == "STOP":
            return graph.pop()[0]
        graph.step(opcode, arg)
    return None


def _measure(children: list[list[int]], where: object) -> None:
    """Refuse a graph in which any object's tree (shared objects counted each time they are reached) is too
    large or too deep."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    todo: list[tuple[int, bool]] = [(node, False) for node in reversed(range(len(children)))]
    on_path: set[int] = set()
    while todo:
        node, done = todo.pop()
        if done:
            on_path.discard(node)
            held = [c for c in children[node] if c in size]  # a child still on the path is a cycle: counted once
            size[node] = min(1 + sum(size[c] for c in held), MAX_PICKLE_NODES + 1)
            depth[node] = 1 + max((depth[c] for c in held), default=0)
            if size[node] > MAX_PICKLE_NODES:
                raise CrossinitError(
                    f"{where} was refused: its pickle stands for more than {MAX_PICKLE_NODES:,} objects through "
                    "shared references (a hash bomb?); an embedding's has a few hundred"
                )
            if depth[node] > MAX_PICKLE_DEPTH:
                raise CrossinitError(f"{where} was refused: its pickle nests objects more than {MAX_PICKLE_DEPTH} deep")
            continue
        if node in size or node in on_path:
            continue
        on_path.add(node)
        todo.append((node, True))
        todo.extend((c, False) for c in children[node] if c not in size and c not in on_path)
