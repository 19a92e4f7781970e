"""File-system primitives for the user's folders, on two walks that never follow a link out:
`open_beneath` (every read of a producer's file: links followed only inside the watched
folder) and `open_dir` (every write under a folder producers can write to: no link followed
at all, folders made on the way). On them: how a path is recorded (`path_key`, `PathStat`),
why a file cannot be read (`unreadable`), hashing, writing atomically, moving without
overwriting, and the two acts on a file itself, the after-action (move to the done folder,
delete; only the very file that was read) and quarantine with an error sidecar. What a
stored document leaves beside its file (text sidecars, searchable PDFs) is
`daemon.outputs`'s; when each act happens, `daemon.outcomes`'s. A file that cannot be moved
or written is logged, never a failure of the document: its text is stored already.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from daemon.config import Settings
from daemon.errors import DocumentError

log = logging.getLogger("daemon.files")

HASH_CHUNK = 1 << 20


# --- paths ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathStat:
    """A file's identity as stat gives it, the one the watcher and the ledger share: equal
    again later means the same file with the same content (ctime included: any write or
    rename changes it, as does a replacement by `cp -p`, `touch -r` or a coarse SMB
    timestamp). The watcher waits for it to stay equal before a file is ready; the ledger
    keeps what it was when hashed, so a restart does not read an unchanged file again."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int

    @classmethod
    def of(cls, info: os.stat_result) -> PathStat:
        return cls(info.st_size, info.st_mtime_ns, info.st_ctime_ns, _signed(info.st_ino),
                   _signed(info.st_dev))

    def columns(self) -> dict[str, int]:
        return {"st_size": self.size, "st_mtime_ns": self.mtime_ns,
                "st_ctime_ns": self.ctime_ns, "st_ino": self.ino, "st_dev": self.dev}


def _signed(value: int) -> int:
    """A 64-bit unsigned inode or device number as the signed BIGINT the database holds."""
    return value - (1 << 64) if value >= 1 << 63 else value


# A path whose name is not UTF-8 (bytes Python holds as lone surrogates) is recorded with this
# prefix, its backslashes doubled and each such byte written \xNN: text a database takes, read
# back to the very bytes. A path that is UTF-8 is recorded as it is (it starts with "/").
RAW_PATH = "raw:"
_RAW_BYTE = re.compile(r"[\udc80-\udcff]")
_RAW_ESCAPE = re.compile(r"\\(\\|x([0-9a-f]{2}))")


def path_key(path: Path | str) -> str:
    """How the ledger records a path: absolute, links not resolved (the name the file came
    as), and in text a database takes whatever bytes its name holds (`recordable`)."""
    return recordable(os.path.abspath(path))


def recordable(text: str) -> str:
    """`text` as is when it is UTF-8, else spelled `RAW_PATH` and escaped."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return RAW_PATH + _RAW_BYTE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}",
                                        text.replace("\\", "\\\\"))
    return text


def path_of(key: str) -> Path:
    """The path a ledger record names (`path_key` undone)."""
    if not key.startswith(RAW_PATH):
        return Path(key)
    return Path(_RAW_ESCAPE.sub(
        lambda m: "\\" if m.group(1) == "\\" else chr(0xDC00 + int(m.group(2), 16)),
        key[len(RAW_PATH):]))


def is_within(resolved: Path, root: Path, *, strictly: bool = False) -> bool:
    """`resolved` (a path already resolved) is `root` or below it; below it only if `strictly`."""
    return root in resolved.parents or (not strictly and resolved == root)


def resolves_within(path: Path, root: Path, *, strictly: bool = False) -> bool:
    """`path`, links followed, is inside `root` (False when it cannot be resolved: a loop)."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        return False
    return is_within(resolved, root, strictly=strictly)


def holds(path: Path, sha256: str, root: Path, max_bytes: int) -> bool | None:
    """Whether `path` still holds the content `sha256`; None when it cannot be read (through
    `open_beneath`, as every read of a producer's file)."""
    try:
        digest, _, _ = sha256_beneath(path, root, max_bytes)
    except (OSError, DocumentError):
        return None
    return digest == sha256


def open_dir(folder: Path, base: Path, *, create: bool = False) -> int:
    """A descriptor of the directory `folder`, walked from `base` one component at a time
    without following a link: whoever can write below `base` (a producer, in the watched
    folder) cannot plant one that leads a write elsewhere (LeadsOutside, an OSError). With
    `create`, missing folders are made on the way. `base` itself is trusted (the watched
    folder resolved, or a folder the operator configured); `folder` must be `base` or
    lexically below it."""
    absolute, start = Path(os.path.abspath(folder)), Path(os.path.abspath(base))
    if absolute != start and start not in absolute.parents:
        raise LeadsOutside(folder)
    if create:
        start.mkdir(parents=True, exist_ok=True)
    fd = os.open(start, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in absolute.relative_to(start).parts:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                inner = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
                inner = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a link, or a file
                    raise LeadsOutside(folder) from None
                raise
            os.close(fd)
            fd = inner
        return fd
    except BaseException:
        os.close(fd)
        raise


def base_of(folder: Path, root: Path) -> Path:
    """Where a walk to `folder` starts: the watched folder for one inside it (producers write
    there), else the folder itself (one the operator configured elsewhere)."""
    absolute = Path(os.path.abspath(folder))
    return root if absolute == root or root in absolute.parents else absolute


def move_into(path: Path, folder: Path, *, source_base: Path | None = None,
              target_base: Path | None = None, expected: tuple[int, int] | None = None
              ) -> Path | None:
    """Move `path` into `folder` as `NAME`, or `STEM.N.SUFFIX` when that is taken: never over
    an existing file, even one another worker created a moment ago, because the new name is
    made with link(2), which fails when it exists, and only then is the old name removed.
    Across file systems the content is first copied to a hidden name in `folder` and synced, so
    a crash leaves the original or a hidden copy, never a partial file under a real name. Moves
    the name only: a symlink is moved as a link, its target is never touched. Both folders are
    reached through descriptors walked from their bases (`open_dir`): a folder on the way
    swapped for a link is refused, not followed. With `expected` (st_dev, st_ino), only that
    file is moved: a file renamed onto the name meanwhile is left where it is (None)."""
    source = open_dir(path.parent, source_base or path.parent)
    try:
        target = open_dir(folder, target_base or folder, create=True)
        try:
            name = _move(path.name, source, target, path, expected)
        finally:
            os.close(target)
    finally:
        os.close(source)
    return None if name is None else folder / name


def _move(name: str, source: int, target: int, named: Path,
          expected: tuple[int, int] | None) -> str | None:
    try:
        moved = _link_new_name(name, source, target, named)
        if expected is not None and _identity(moved, target) != expected:
            os.unlink(moved, dir_fd=target)  # another file took the name: not this one's
            return None
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        if exc.errno != errno.EXDEV:  # a file system without hard links: as before
            return _rename_checked(name, source, target, named)
        copy = _copy_beside(name, source, target, expected)
        if copy is None:
            return None
        try:
            moved = _link_new_name(copy, target, target, named)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(copy, dir_fd=target)
    if expected is None:
        os.unlink(name, dir_fd=source)
    else:
        _remove_if(name, source, expected)
    return moved


def _identity(name: str, folder: int) -> tuple[int, int]:
    info = os.stat(name, dir_fd=folder, follow_symlinks=False)
    return info.st_dev, info.st_ino


def _remove_if(name: str, folder: int, expected: tuple[int, int]) -> bool:
    """Remove `name` only while it is the file `expected` (st_dev, st_ino): it is first set
    aside under a hidden name (atomically, whatever is there at that moment), checked there,
    then removed, or put back when another file had taken the name (under the name again,
    or the next free one). A producer's file renamed onto the name is never removed unread."""
    aside = f".{name}.{os.urandom(4).hex()}.removing"
    os.rename(name, aside, src_dir_fd=folder, dst_dir_fd=folder)
    if _identity(aside, folder) == expected:
        os.unlink(aside, dir_fd=folder)
        return True
    back = _link_new_name(aside, folder, folder, Path(name))
    os.unlink(aside, dir_fd=folder)
    log.warning("%s was replaced after it was read: the new file is left as %s", name, back)
    return False


_NO_LINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP}


def _new_names(named: Path) -> Iterator[str]:
    yield named.name
    for n in itertools.count(1):
        yield f"{named.stem}.{n}{named.suffix}"


def _link_new_name(name: str, source: int, target: int, named: Path) -> str:
    for new in _new_names(named):
        try:
            os.link(name, new, src_dir_fd=source, dst_dir_fd=target, follow_symlinks=False)
            return new
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def _copy_beside(name: str, source: int, target: int,
                 expected: tuple[int, int] | None = None) -> str | None:
    """A synced copy of `name` (the link itself, for a symlink) under a hidden name in the
    folder `target`; None when `name` is not the file `expected` (any more)."""
    if expected is not None and _identity(name, source) != expected:
        return None
    while True:
        temp = f".{name}.{os.urandom(4).hex()}.moving"
        try:
            if stat.S_ISLNK(os.lstat(name, dir_fd=source).st_mode):
                os.symlink(os.readlink(name, dir_fd=source), temp, dir_fd=target)
                return temp
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            with os.fdopen(os.open(name, flags, dir_fd=source), "rb") as original, \
                    os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                                      os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=target),
                              "wb") as copy:
                shutil.copyfileobj(original, copy)
                copy.flush()
                os.fsync(copy.fileno())
            return temp
        except FileExistsError:
            continue


def _rename_checked(name: str, source: int, target: int, named: Path) -> str:
    for new in _new_names(named):
        try:
            os.lstat(new, dir_fd=target)
        except FileNotFoundError:
            os.rename(name, new, src_dir_fd=source, dst_dir_fd=target)
            return new
    raise AssertionError("unreachable")


def write_error_sidecar(target: Path, text: str, base: Path | None = None) -> Path:
    """`NAME.error.txt` beside `target`, created new: never through a link planted there,
    never over an existing file; its folder reached from `base` (`open_dir`)."""
    folder = open_dir(target.parent, base or target.parent)
    try:
        n = 0
        while True:
            name = f"{target.name}.error{f'.{n}' if n else ''}.txt"
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                             os.O_CLOEXEC, 0o644, dir_fd=folder)
            except FileExistsError:
                n += 1
                continue
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as handle:
                handle.write(text)  # a name that is not UTF-8 written back as its own bytes
            return target.with_name(name)
    finally:
        os.close(folder)


# --- after a document is done or failed ----------------------------------------------------


def done_folder(settings: Settings, root: Path) -> Path:
    return root / (settings.watch.done_folder or Path("done"))


def after_done(path: Path, sha256: str, settings: Settings, root: Path) -> None:
    """keep, move to the done folder, or delete `path` — only if it still holds the
    stored content (a new file may have taken the name meanwhile)."""
    after = settings.watch.after
    if after == "keep":
        return
    try:
        digest, _, opened = sha256_beneath(path, root, settings.watch.max_file_bytes)
    except (OSError, DocumentError):
        return  # gone, unreadable, or leads out of the folder
    if digest != sha256:
        return
    hashed = (opened.st_dev, opened.st_ino)  # the name must still lead to this file
    try:
        if after == "delete":
            folder = open_dir(path.parent, root)
            try:
                _remove_if(path.name, folder, hashed)
            finally:
                os.close(folder)
        else:
            done = done_folder(settings, root)
            move_into(path, done, source_base=root, target_base=base_of(done, root),
                      expected=hashed)
    except OSError as exc:
        log.warning("could not %s %s after processing: %s", after, path, exc)


def quarantine(path: Path, reason: str, settings: Settings, root: Path,
               sha256: str | None = None) -> Path | None:
    """Move a failed file to `watch.failed_dir` with a sidecar saying why, when configured;
    returns where it went (None: not moved). With `sha256`, only while `path` still holds that
    content: a file rewritten since is new content of its own, not the failure."""
    if settings.watch.failed_dir is None or not (path.is_file() or path.is_symlink()):
        return None
    if sha256 is not None and not path.is_symlink() and \
            holds(path, sha256, root, settings.watch.max_file_bytes) is False:
        # (unreadable or too large: it is the failure, move it)
        log.info("not moving %s to the failed folder: it holds new content now", path)
        return None
    try:
        if not resolves_within(path.parent, root):
            return None
        folder = root / settings.watch.failed_dir
        base = base_of(folder, root)
        target = move_into(path, folder, source_base=root, target_base=base)
        if target is None:
            return None
        write_error_sidecar(target, f"{path}\n{reason}\n", base)
        return target
    except OSError as exc:
        log.warning("could not move %s to the failed folder: %s", path, exc)
        return None


# --- text sidecars ----------------------------------------------------------------------------


SIDECAR_MODE = 0o644  # readable by whoever reads the folder, as the error sidecars are


def write_atomic(target: Path, content: str | bytes, *, mode: int = SIDECAR_MODE,
                 base: Path | None = None) -> None:
    """Temporary file in the target's folder (created exclusively, hidden from the watcher),
    then rename: it appears whole or not at all, and replaces the name itself, never following
    a link planted at it; the folder is reached from `base` (`open_dir`: a producer's link on
    the way is refused), made if missing. Readable like the error sidecars by default
    (producers in the group read the text of their own scans)."""
    folder = open_dir(target.parent, base or target.parent, create=True)
    try:
        data = content.encode() if isinstance(content, str) else content
        while True:
            temp = f".{target.name}.{os.urandom(4).hex()}.tmp"
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                             os.O_CLOEXEC, mode, dir_fd=folder)
                break
            except FileExistsError:
                continue
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temp, target.name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=folder)
            raise
    finally:
        os.close(folder)



# --- opening without following links out ------------------------------------------------------

MAX_LINKS = 40  # as the kernel's own limit on links followed in one lookup


class LeadsOutside(OSError):
    """The name, its links followed, leads out of the watched folder."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.EXDEV, "leads outside the watched folder", str(path))


def open_beneath(path: Path, root: Path) -> int:
    """A read-only descriptor of the regular file `path`, opened one component at a time from
    `root` (resolved) with O_NOFOLLOW: a link is followed only by reading it here and only
    while it stays inside `root`; `..` never climbs above it. What is checked is what is
    opened: a name swapped for a link between a check and an open cannot lead out. Raises
    LeadsOutside, FileNotFoundError, IsADirectoryError, OSError(ELOOP) for a loop, or
    OSError(EINVAL) for something that is not a regular file (a FIFO, a device)."""
    absolute = Path(os.path.abspath(path))
    if not is_within(absolute, root, strictly=True):
        raise LeadsOutside(path)
    parts = list(absolute.relative_to(root).parts)
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
    links = 0
    try:
        while parts:
            part = parts.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if len(fds) == 1:
                    raise LeadsOutside(path)
                os.close(fds.pop())
                continue
            last = not parts
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            flags |= os.O_NONBLOCK if last else os.O_DIRECTORY  # a FIFO must not block us
            try:
                fd = os.open(part, flags, dir_fd=fds[-1])
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                try:
                    target = os.readlink(part, dir_fd=fds[-1])
                except OSError:
                    raise exc from None  # not a link: a file where a folder was expected
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, "symlink loop", str(path)) from None
                if os.path.isabs(target):
                    absolute_target = Path(os.path.normpath(target))
                    if not is_within(absolute_target, root, strictly=True):
                        raise LeadsOutside(path) from None
                    for extra in fds[1:]:
                        os.close(extra)
                    del fds[1:]
                    parts = list(absolute_target.relative_to(root).parts) + parts
                else:
                    parts = list(Path(target).parts) + parts
                continue
            if last:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    os.close(fd)
                    if stat.S_ISDIR(info.st_mode):
                        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
                    raise OSError(errno.EINVAL, "not a regular file", str(path))
                os.set_blocking(fd, True)
                return fd
            fds.append(fd)
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    finally:
        for fd in fds:
            os.close(fd)


def unreadable(exc: BaseException) -> str:
    """Why a producer's file cannot be read, said the same way wherever it is found: the
    watcher's settle check, intake's hash, the pipeline's read, `ocr-daemon retry`'s read
    again. `open_beneath` and the reads on it raise what this maps."""
    if isinstance(exc, LeadsOutside):
        return "symlink points outside the watched folder"
    if isinstance(exc, DocumentError):
        return exc.reason
    if isinstance(exc, FileNotFoundError):
        return "vanished before it was read"
    if isinstance(exc, PermissionError):
        return "permission denied: the daemon's user cannot read it"
    if isinstance(exc, IsADirectoryError):
        return "a directory, not a file"
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(exc, OSError) and exc.errno == errno.EINVAL:
        return "not a regular file"
    if isinstance(exc, OSError):
        return f"cannot read: {exc.strerror or exc}"
    return f"cannot read: {type(exc).__name__}: {exc}"


def read_beneath(path: Path, root: Path, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The content of `path` opened with `open_beneath`, and what it was (fstat); a file over
    `max_bytes` is refused."""
    fd = open_beneath(path, root)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DocumentError(f"file is larger than watch.max_file_bytes={max_bytes}")
    return data, info


def sha256_beneath(path: Path, root: Path, max_bytes: int) -> tuple[str, int, os.stat_result]:
    """SHA-256, size and fstat of `path` opened with `open_beneath`, read in chunks."""
    with os.fdopen(open_beneath(path, root), "rb") as handle:
        info = os.fstat(handle.fileno())
        digest, size = sha256_handle(handle, max_bytes)
    return digest, size, info


def sha256_handle(handle: BinaryIO, max_bytes: int) -> tuple[str, int]:
    """SHA-256 and size of what is left to read in `handle`, in chunks; over `max_bytes` is
    refused."""
    digest = hashlib.sha256()
    size = 0
    while chunk := handle.read(HASH_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise DocumentError(f"file is larger than watch.max_file_bytes={max_bytes}")
        digest.update(chunk)
    return digest.hexdigest(), size
