"""Files on the ground floor: atomic writes, durable appends and bounded reads.

Nothing here imports the rest of bpfree (only :mod:`bpfree.errors`), so every floor may use it.

Writes: readers see the old file or the new one, never half (temp file + fsync + rename), with
the permissions an ordinary ``open`` gives (0666 less the umask), and a failing disk raises a
:class:`WriteError` naming the file. Appends (live histories, telemetry) go through one
``O_APPEND`` write per line, flushed and fsynced.

Reads: every file bpfree reads back is untrusted until parsed. :func:`read_bounded` accepts only
a regular file (a FIFO, device or socket is refused without blocking), refuses one larger than its
bound before reading it, and never reads more than the bound. :func:`load_json` adds a nesting
bound, a digit bound on integers and no NaN/Infinity; :func:`read_jsonl` reads a line-per-record
file whose last line may be torn by a kill.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bpfree.errors import UnreadableFile, UserError, WriteError

# Bounds for the files bpfree writes and reads back (generous for what it writes, far below harm).
MAX_RESULT_BYTES = 64 * 2**20  # result.json: curves of long runs with fine evaluation grids
MAX_CONFIG_BYTES = 2**20  # config.json, compare.json, markers
MAX_HISTORY_BYTES = 256 * 2**20  # history.jsonl
MAX_TABLE_BYTES = 1024 * 2**20  # telemetry tables (100 ms rows over days)
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 64


def printable_path(path: Path | str) -> str:
    """A path as text that can always be printed and written (undecodable bytes shown escaped)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def umask() -> int:
    """The process umask, read without changing it where Linux states it (os.umask sets it, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write ``path`` through ``write(handle)`` so readers see the old file or the new one, never half.

    The new file gets the permissions an ordinary ``open`` would give it (0666 less the umask),
    not the 0600 of a temporary file, so colleagues on a shared cluster can read results.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise WriteError(f"{printable_path(path)}: cannot write ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on POSIX
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):  # disk full, quota, read-only: the old file (if any) is intact
            raise WriteError(f"{printable_path(path)}: cannot write ({exc.strerror or exc}); the previous version, if any, is intact") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    # backslashreplace: a path with undecodable bytes (surrogate escapes) in a report is shown escaped
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8", "backslashreplace")))


def atomic_write_bytes(path: Path, blob: bytes | memoryview) -> None:
    atomic_write(path, lambda handle: handle.write(blob))


def json_bytes(data: Any, indent: int | None = 2) -> bytes:
    """JSON as written by bpfree: no NaN or Infinity (a record with them is a bug, not data)."""
    return json.dumps(data, indent=indent, sort_keys=False, allow_nan=False).encode()


def atomic_write_json(path: Path, data: Any) -> None:
    blob = json_bytes(data)
    atomic_write(path, lambda handle: handle.write(blob))


def append_line(path: Path, line: str, sync: bool = True) -> None:
    """Append one line (a newline is added) in a single ``O_APPEND`` write, then fsync.

    A reader sees whole lines, except that a kill during the write may leave the last one torn;
    :func:`read_jsonl` tolerates that. Raises :class:`WriteError` naming the file.
    """
    data = (line.rstrip("\n") + "\n").encode("utf-8", "backslashreplace")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise WriteError(f"{printable_path(path)}: cannot append ({exc.strerror or exc})") from None


def ensure_writable_dir(path: Path, flag: str = "--output") -> Path:
    """Create a directory or fail with one line saying why (naming the ``flag`` that chose it)."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise UserError(f"output directory {printable_path(path)}: not writable ({exc.strerror or exc}); choose another with {flag}") from None
    return path


# -- bounded reads ----------------------------------------------------------------------------------
def read_bounded(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else raises :class:`UnreadableFile`.

    Opened non-blocking (a FIFO never hangs the reader), checked on the open descriptor (no race
    between the check and the read), and never read past the bound (a file that grows is cut off
    and refused).
    """
    shown = printable_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UnreadableFile(f"{shown}: not found") from None
    except OSError as exc:
        raise UnreadableFile(f"{shown}: cannot open ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile(f"{shown}: not a regular file")
        if info.st_size > max_bytes:
            raise UnreadableFile(f"{shown}: {info.st_size} bytes, more than the {max_bytes} allowed for this file")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise UnreadableFile(f"{shown}: grew past the {max_bytes} bytes allowed for this file while being read")
        return b"".join(chunks)
    except OSError as exc:
        raise UnreadableFile(f"{shown}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def read_appended(path: Path, offset: int, max_bytes: int = 1 << 20) -> tuple[bytes, int]:
    """The whole lines appended to a regular file since ``offset``: (their bytes, the offset after them).

    For following a file another process appends to (a live history): at most ``max_bytes`` are
    read per call, a line still being written is left for the next call, and a file that shrank
    (replaced) is read again from its start. Anything but a regular file raises :class:`UnreadableFile`.
    """
    shown = printable_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UnreadableFile(f"{shown}: not found") from None
    except OSError as exc:
        raise UnreadableFile(f"{shown}: cannot open ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile(f"{shown}: not a regular file")
        if info.st_size < offset:
            offset = 0
        os.lseek(fd, offset, os.SEEK_SET)
        blob = os.read(fd, max(0, min(max_bytes, info.st_size - offset)))
    except OSError as exc:
        raise UnreadableFile(f"{shown}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    end = blob.rfind(b"\n") + 1
    if end == 0 and len(blob) >= max_bytes:  # one line longer than the bound: skip it rather than stall
        return b"", offset + len(blob)
    return blob[:end], offset + end


def _check_depth(text: str, max_depth: int) -> None:
    """Refuse JSON nested deeper than ``max_depth`` (counted outside strings) before parsing it."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                raise ValueError(f"nested deeper than {max_depth} levels")
        elif char in "]}":
            depth -= 1


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict, bounded JSON: depth, integer digits, no NaN/Infinity; ValueError says what is wrong."""
    _check_depth(text, max_depth)
    try:
        return json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def load_json(path: Path, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_JSON_DEPTH, expect: type | None = dict) -> Any:
    """A JSON file read by :func:`read_bounded` and :func:`parse_json`; ``expect`` the top-level type.

    Every problem raises :class:`UnreadableFile` with one line naming the file.
    """
    blob = read_bounded(path, max_bytes)
    shown = printable_path(path)
    try:
        data = parse_json(blob.decode("utf-8"), max_depth)
    except UnicodeDecodeError:
        raise UnreadableFile(f"{shown}: not UTF-8 text") from None
    except ValueError as exc:
        raise UnreadableFile(f"{shown}: {exc}") from None
    if expect is not None and not isinstance(data, expect):
        raise UnreadableFile(f"{shown}: expected a JSON {'object' if expect is dict else expect.__name__}, got {type(data).__name__}")
    return data


@dataclass
class JsonLines:
    """The records of a JSON-lines file: whole lines parsed, a torn last line set aside."""

    records: list[dict[str, Any]] = field(default_factory=list)
    torn_tail: bool = False  # the last line was cut by a kill mid-write (ignored)
    bad_lines: list[int] = field(default_factory=list)  # 1-based numbers of malformed lines before the last


def read_jsonl(path: Path, max_bytes: int = MAX_HISTORY_BYTES, max_depth: int = 16) -> JsonLines:
    """Each line a JSON object; a malformed last line is a torn write (tolerated), earlier ones are named."""
    blob = read_bounded(path, max_bytes)
    out = JsonLines()
    lines = blob.split(b"\n")
    last_complete = blob.endswith(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        is_last = number == len(lines) or (number == len(lines) - 1 and last_complete)
        try:
            record = parse_json(raw.decode("utf-8"), max_depth)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except (UnicodeDecodeError, ValueError):
            if is_last and number == len(lines):  # no newline after it: cut mid-write
                out.torn_tail = True
            else:
                out.bad_lines.append(number)
            continue
        out.records.append(record)
    return out


__all__ = [
    "MAX_CONFIG_BYTES", "MAX_HISTORY_BYTES", "MAX_JSON_DEPTH", "MAX_RESULT_BYTES", "MAX_TABLE_BYTES", "JsonLines",
    "UnreadableFile", "WriteError", "append_line", "atomic_write", "atomic_write_bytes", "atomic_write_json",
    "atomic_write_text", "ensure_writable_dir", "json_bytes", "load_json", "parse_json", "printable_path",
    "read_appended", "read_bounded", "read_jsonl", "umask",
]
