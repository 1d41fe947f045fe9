"""Repositories uploaded as archives (zip, tar, tar.gz), read safely in memory.

`archive_files(data, media_type)` is the one reader of an archive's files: the upload
check (documents.intake), the pages (documents.parsing) and a sandbox workspace filled
from a repository all read through it, so each sees the same files and the same
refusals. Nothing is ever written to disk here. It returns the regular files, in the
archive's order, each with a safe relative path, its bytes and a mode of 0o644 or 0o755
(the owner's execute bit kept; setuid, setgid and sticky bits never), or raises
`documents.intake.Refused` with the reason:

- a path that is absolute (`/etc/x`, `C:\\x`, `\\\\host\\x`) or has a `..` part (even
  one that would land inside), control characters or bytes that are not UTF-8, a part
  over 255 characters or a whole path over `PATH_MAX_CHARS`; `\\` counts as a
  separator, as Windows tools write it;
- a symbolic link that points outside the archive (absolute, or climbing out with
  `..`); a link that stays inside is skipped, not kept: a workspace holds no links,
  which would lead out of it again once files move;
- a hard link, a device, a fifo, a socket or any other special entry;
- the same path twice, or a path that is both a file and a folder;
- an encrypted member, or one the reader cannot unpack (a corrupt archive);
- a bomb: more entries than PARLEY_ARCHIVE_MAX_FILES, more bytes unpacked in all than
  PARLEY_ARCHIVE_MAX_BYTES, a file over PARLEY_ARCHIVE_MAX_FILE_BYTES, or a zip member
  (or a whole gzip stream) compressed more than PARLEY_ARCHIVE_MAX_RATIO to 1. A zip
  is checked from its directory before a byte is unpacked (and a member never unpacks
  to more than its directory says: zipfile stops there, and checks the CRC); a gzip
  stream is unpacked only up to the cap.

Folders are implied by the files' paths. An archive inside the archive is a file like
any other: it is never opened.
"""

from __future__ import annotations

import io
import posixpath
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass

from django.conf import settings

from documents.intake import Refused, looks_like_tar
from documents.models import Document

MediaType = Document.MediaType

ARCHIVE_TYPES = frozenset({MediaType.ZIP, MediaType.TAR, MediaType.TAR_GZ})
# As long as a page's label (documents.models.Page.label) may be.
PATH_MAX_CHARS = 500
PART_MAX_CHARS = 255
# A symbolic link's target is a short path: anything longer is not read.
LINK_MAX_BYTES = 4096
# Below this many bytes unpacked, a high ratio is no bomb (a run of blanks compresses well).
RATIO_FLOOR_BYTES = 1 << 20


@dataclass(frozen=True)
class ArchiveFile:
    path: str  # relative, parts joined by "/", no "." or ".." parts
    data: bytes
    mode: int  # 0o644, or 0o755 for a file its owner may execute

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class ArchiveLimits:
    max_files: int
    max_bytes: int
    max_file_bytes: int
    max_ratio: int

    @classmethod
    def from_settings(cls) -> ArchiveLimits:
        return cls(
            max_files=settings.PARLEY_ARCHIVE_MAX_FILES,
            max_bytes=settings.PARLEY_ARCHIVE_MAX_BYTES,
            max_file_bytes=settings.PARLEY_ARCHIVE_MAX_FILE_BYTES,
            max_ratio=settings.PARLEY_ARCHIVE_MAX_RATIO,
        )


def is_archive(media_type: str) -> bool:
    """Whether documents of this type are repositories (archives of files)."""
    return media_type in ARCHIVE_TYPES


def archive_files(
    data: bytes, media_type: str, *, limits: ArchiveLimits | None = None
) -> list[ArchiveFile]:
    """The archive's regular files (see the module's docstring), or `Refused`."""
    limits = limits or ArchiveLimits.from_settings()
    if media_type == MediaType.ZIP:
        return _Collector(limits).zip(data)
    if media_type == MediaType.TAR:
        return _Collector(limits).tar(data)
    if media_type == MediaType.TAR_GZ:
        # The tar stream holds headers and padding beside the files' bytes.
        stream_cap = limits.max_bytes + 1024 * limits.max_files + (1 << 20)
        unpacked = gunzip(data, limit=stream_cap, max_ratio=limits.max_ratio)
        if not looks_like_tar(unpacked):
            raise Refused(415, "This gzip file does not hold a tar archive.")
        return _Collector(limits).tar(unpacked)
    raise Refused(415, f"Documents of type {media_type!r} are not archives.")


def gunzip(data: bytes, *, limit: int, max_ratio: int) -> bytes:
    """A gzip stream (members one after another) unpacked, never past `limit` bytes."""
    out = bytearray()
    pending = data
    try:
        while pending:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            while True:
                out += inflater.decompress(pending, limit + 1 - len(out))
                if len(out) > limit:
                    raise Refused(400, f"This archive unpacks to more than {limit} bytes.")
                if inflater.eof:
                    pending = inflater.unused_data
                    break
                if not inflater.unconsumed_tail:
                    raise Refused(400, "This gzip file is truncated.")
                pending = inflater.unconsumed_tail
            # Blocks of zeros may pad the end (tape-sized records).
            if not pending.strip(b"\0"):
                break
    except zlib.error as exc:
        raise Refused(400, f"This gzip file is corrupt ({exc}).") from None
    if len(out) > RATIO_FLOOR_BYTES and len(out) > max_ratio * len(data):
        raise Refused(
            400,
            f"This archive looks like a bomb: it is compressed more than {max_ratio} to 1.",
        )
    return bytes(out)


_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def safe_path(name: str) -> str:
    """The member's path made relative and plain ("" for the archive's root), or
    `Refused` for one that could land outside the archive (see the docstring)."""
    shown = repr(name[:100])
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a tar name's bytes that are not UTF-8 (kept as surrogates)
        raise Refused(400, f"This archive has a path that is not UTF-8: {shown}.") from None
    if _CONTROL.search(name):
        raise Refused(400, f"This archive has a path with control characters: {shown}.")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        raise Refused(400, f"This archive has an absolute path: {shown}.")
    parts = [part for part in unified.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise Refused(400, f"This archive has a path that climbs out with '..': {shown}.")
    if any(len(part) > PART_MAX_CHARS for part in parts):
        raise Refused(400, f"This archive has a name longer than {PART_MAX_CHARS}: {shown}.")
    path = "/".join(parts)
    if len(path) > PATH_MAX_CHARS:
        raise Refused(400, f"This archive has a path longer than {PATH_MAX_CHARS}: {shown}.")
    return path


def _link_check(path: str, target: str) -> None:
    """A symbolic link at `path` pointing at `target` must stay inside the archive."""
    unified = target.replace("\\", "/")
    landing = posixpath.normpath(posixpath.join(posixpath.dirname(path), unified))
    if (
        not unified
        or unified.startswith("/")
        or _DRIVE.match(unified)
        or landing == ".."
        or landing.startswith("../")
    ):
        raise Refused(
            400,
            f"This archive has a symbolic link that points outside it: {path!r} -> "
            f"{target[:100]!r}.",
        )


def _mode(bits: int) -> int:
    return 0o755 if bits & stat.S_IXUSR else 0o644


class _Collector:
    """The files of one archive, checked against the limits as they are added."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.files: list[ArchiveFile] = []
        self.paths: set[str] = set()
        self.folders: set[str] = set()
        self.entries = 0
        self.total = 0

    # --- checks shared by the formats --------------------------------------------

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_files:
            raise Refused(400, f"This archive holds more than {self.limits.max_files} entries.")

    def sized(self, path: str, size: int) -> None:
        if size > self.limits.max_file_bytes:
            raise Refused(
                400,
                f"{path!r} in this archive is {size} bytes; files may be up to "
                f"{self.limits.max_file_bytes} bytes.",
            )
        self.total += size
        if self.total > self.limits.max_bytes:
            raise Refused(400, f"This archive unpacks to more than {self.limits.max_bytes} bytes.")

    def add(self, path: str, data: bytes, bits: int) -> None:
        if path in self.paths:
            raise Refused(400, f"This archive holds {path!r} twice.")
        if path in self.folders:
            raise Refused(400, f"This archive has {path!r} as a file and as a folder.")
        parents = [path.rsplit("/", depth)[0] for depth in range(1, path.count("/") + 1)]
        for parent in parents:
            if parent in self.paths:
                raise Refused(400, f"This archive has {parent!r} as a file and as a folder.")
        self.folders.update(parents)
        self.paths.add(path)
        self.files.append(ArchiveFile(path=path, data=data, mode=_mode(bits)))

    # --- zip -----------------------------------------------------------------------

    def zip(self, data: bytes) -> list[ArchiveFile]:
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
            members = archive.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError):
            raise Refused(400, "This file is a corrupt zip archive.") from None
        if len(members) > self.limits.max_files:
            raise Refused(400, f"This archive holds more than {self.limits.max_files} entries.")
        # From the directory, before anything is unpacked: the totals and the ratios.
        declared = 0
        for member in members:
            declared += member.file_size
            if declared > self.limits.max_bytes:
                raise Refused(
                    400, f"This archive unpacks to more than {self.limits.max_bytes} bytes."
                )
            ratio = self.limits.max_ratio
            if member.file_size > RATIO_FLOOR_BYTES and member.file_size > ratio * max(
                member.compress_size, 1
            ):
                raise Refused(
                    400,
                    f"This archive looks like a zip bomb: {member.filename[:100]!r} is "
                    f"compressed more than {ratio} to 1.",
                )
            if member.flag_bits & 0x1:
                raise Refused(400, "This archive is encrypted; upload it unlocked.")
        for member in members:
            self.entry()
            path = safe_path(member.filename)
            # Unix tools keep the file's type and mode in the high bits (create_system 3).
            bits = member.external_attr >> 16 if member.create_system == 3 else 0
            kind = stat.S_IFMT(bits)
            if member.is_dir() or kind == stat.S_IFDIR or not path:
                continue
            if kind == stat.S_IFLNK:
                target = self._zip_read(archive, member, limit=LINK_MAX_BYTES)
                _link_check(path, target.decode("utf-8", "replace"))
                continue
            if kind not in (0, stat.S_IFREG):
                raise Refused(
                    400, f"This archive has a special file (not a regular one): {path!r}."
                )
            self.sized(path, member.file_size)
            self.add(path, self._zip_read(archive, member, limit=member.file_size), bits)
        return self.files

    @staticmethod
    def _zip_read(archive: zipfile.ZipFile, member: zipfile.ZipInfo, *, limit: int) -> bytes:
        try:
            with archive.open(member) as stream:
                return stream.read(limit)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, OSError) as exc:
            detail = f"{type(exc).__name__}: {str(exc)[:200]}"
            raise Refused(
                400, f"{member.filename[:100]!r} in this zip archive cannot be read ({detail})."
            ) from None
        except zlib.error:
            raise Refused(400, "This file is a corrupt zip archive.") from None

    # --- tar -----------------------------------------------------------------------

    def tar(self, data: bytes) -> list[ArchiveFile]:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
                for member in archive:
                    self._tar_member(archive, member)
        except tarfile.TarError as exc:
            raise Refused(400, f"This file is a corrupt tar archive ({str(exc)[:200]}).") from None
        return self.files

    def _tar_member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.entry()
        path = safe_path(member.name)
        if member.isdir() or not path:
            return
        if member.issym():
            _link_check(path, member.linkname)
            return
        if member.islnk():
            raise Refused(400, f"This archive has a hard link: {path!r} -> {member.linkname!r}.")
        if member.ischr() or member.isblk():
            raise Refused(400, f"This archive has a device file: {path!r}.")
        if member.isfifo():
            raise Refused(400, f"This archive has a fifo (named pipe): {path!r}.")
        if not member.isreg():
            raise Refused(400, f"This archive has a special file (not a regular one): {path!r}.")
        self.sized(path, member.size)
        stream = archive.extractfile(member)
        content = stream.read() if stream is not None else b""
        if len(content) != member.size:
            raise Refused(400, f"This tar archive is truncated: {path!r} is cut short.")
        self.add(path, content, member.mode)
