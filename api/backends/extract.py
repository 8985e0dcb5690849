"""Read and extract untrusted zip and tar archives, refusing anything unsafe before writing.

Checked for every member before a single byte lands on disk:

- its path: absolute, drive-qualified, containing `..` or NUL, or a duplicate -> refused, since
  it could escape (or overwrite inside) the extraction directory;
- its kind: symlinks, hard links, devices, fifos and sparse files -> refused; only files and
  directories;
- for zip, how it is stored: only stored and deflated members, unencrypted, as
  torch-model-archiver writes them;
- sizes, bounded by `ArchiveLimits`: entry count (root entries such as "./" included), total
  uncompressed size, and the compression ratio (per member for zip, and for the whole archive,
  zip or tar) that gives zip bombs away.

Declared sizes can lie, but zipfile (for stored and deflated members) and tarfile never read past
a member's declared size (zipfile then checks the CRC), so bounding the declared sizes bounds what
is written. What tarfile decompresses besides members' data (headers, padding, the data of
entries it skips) is bounded by checking its position in the decompressed stream as it goes, and
the extended headers it reads whole (GNU long names, pax records) by `MAX_TAR_EXTENDED_HEADER`.
Errors carry no archive name: `archive.py` adds it.
"""

from __future__ import annotations

import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from api.config import Config

GiB = 1024**3
MiB = 1024**2
_DRIVE = re.compile(r"^[A-Za-z]:")
_COPY_CHUNK = 1024 * 1024
# Member names quoted in errors are cut to this many characters: a name can be 64 KiB long.
_NAME_SHOWN = 200

# zipfile decompresses bzip2 and LZMA members with no bound on the output (it cuts to the
# declared size only afterwards), so a few hundred bytes could take gigabytes of memory before
# the CRC fails. torch-model-archiver writes deflated members, and TorchServe reads only these two.
_ZIP_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_ZIP_METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}
_ZIP_ENCRYPTED = 0x1 | 0x40  # general purpose flags: encrypted, strong encryption
_ZIP_PATCH_DATA = 0x20  # compressed patch data, which zipfile cannot read

# tarfile reads a GNU long name or a pax header whole into memory, before the member it
# describes, and on Python before 3.11.10 searches a pax header with a regular expression
# whose time grows with the square of its size (CVE-2024-6232: 64 KiB took 8 s, holding the
# interpreter lock). Real names and pax records take a few hundred bytes, Python's tarfile
# writes some 30 per member (a fractional mtime). So a member's extended headers may take
# MAX_TAR_EXTENDED_HEADER bytes, and an archive's their squares up to
# MAX_TAR_EXTENDED_COST: 64 headers of 2 KiB (about 10 ms each), or a million of 16 bytes.
MAX_TAR_EXTENDED_HEADER = 2 * 1024
MAX_TAR_EXTENDED_COST = 64 * MAX_TAR_EXTENDED_HEADER**2


class ExtractError(Exception):
    """The archive is unsafe or unreadable; the message says which member and why."""


@dataclass(frozen=True, slots=True)
class ArchiveLimits:
    """Bounds on what an archive may unpack to. Raise them for genuinely huge models."""

    max_total_bytes: int = 4 * GiB
    max_members: int = 10_000
    # Deflate tops out near 1000:1; real model files compress 1-10:1. Members under
    # `ratio_min_bytes` are not checked: a small file of spaces is no bomb.
    max_ratio: float = 100.0
    ratio_min_bytes: int = 1 * MiB

    @classmethod
    def of(cls, config: Config) -> ArchiveLimits:
        """config.properties' torchgate.archive_max_* keys."""
        return cls(
            max_total_bytes=config.archive_max_bytes,
            max_members=config.archive_max_members,
            max_ratio=config.archive_max_ratio,
        )


@dataclass(frozen=True, slots=True)
class Member:
    path: PurePosixPath  # validated: relative, no "..", no "."
    size: int
    is_dir: bool


class ArchiveReader(Protocol):
    """A validated archive: its members, and a way to read or extract them."""

    members: dict[PurePosixPath, Member]

    def read(self, path: PurePosixPath, limit: int) -> bytes: ...

    def extract_all(self, dest: Path) -> None: ...

    def close(self) -> None: ...


def _quoted(name: str) -> str:
    """`name` quoted for an error message, cut to its first `_NAME_SHOWN` characters."""
    if len(name) <= _NAME_SHOWN:
        return repr(name)
    return f"{name[:_NAME_SHOWN]!r}... ({len(name)} characters)"


def safe_member_path(name: str) -> PurePosixPath | None:
    """The relative path a member name stands for; None for the archive root entry.

    Raises ExtractError for names that could land outside the extraction directory.
    """
    if "\x00" in name:
        raise ExtractError(f"member {_quoted(name)} has a NUL byte in its name")
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or _DRIVE.match(normalized):
        raise ExtractError(f"member {_quoted(name)} has an absolute path")
    parts = [part for part in normalized.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ExtractError(f"member {_quoted(name)} escapes the extraction directory ('..')")
    return PurePosixPath(*parts) if parts else None


class _Tally:
    """Counts members and bytes as they are listed, failing as soon as a limit is passed."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.members: dict[PurePosixPath, Member] = {}
        self.entries = 0
        self.total = 0

    def add(self, name: str, size: int, is_dir: bool) -> PurePosixPath | None:
        # Root entries ("./", ".") count too: each costs a header to read, and a few KB of
        # bzip2 hold hundreds of thousands of them.
        self.entries += 1
        if self.entries > self.limits.max_members:
            raise ExtractError(f"more than {self.limits.max_members} members")
        path = safe_member_path(name)
        if path is None:
            return None
        if path in self.members:
            raise ExtractError(f"member {_quoted(name)} appears twice")
        self.total += size
        self.check_total(self.total)
        self.members[path] = Member(path, size, is_dir)
        return path

    def check_total(self, size: int) -> None:
        if size > self.limits.max_total_bytes:
            raise ExtractError(
                f"unpacks to more than {self.limits.max_total_bytes} bytes (the limit; raise it "
                f"for larger models)"
            )

    def check_ratio(self, what: str, size: int, compressed: int) -> None:
        limits = self.limits
        if size >= limits.ratio_min_bytes and size > limits.max_ratio * max(compressed, 1):
            raise ExtractError(
                f"{what} expands {size} bytes from {compressed} (ratio above "
                f"{limits.max_ratio:g}): refusing a likely zip bomb"
            )


def _write(source: IO[bytes], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # "x": never overwrite, and never follow a link planted at the target.
    with source, open(target, "xb") as out:
        shutil.copyfileobj(source, out, _COPY_CHUNK)


def _check_zip_member(info: zipfile.ZipInfo) -> None:
    """Refuse what the central directory says cannot be read safely, before reading any of it."""
    name = _quoted(info.filename)
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ExtractError(f"member {name} is a symbolic link")
    if info.compress_type not in _ZIP_METHODS:
        method = _ZIP_METHOD_NAMES.get(info.compress_type, "an unsupported method")
        raise ExtractError(
            f"member {name} is compressed with {method} (zip method {info.compress_type}); only "
            f"stored and deflated members are accepted, as torch-model-archiver writes them"
        )
    if info.flag_bits & _ZIP_ENCRYPTED:
        raise ExtractError(f"member {name} is encrypted")
    if info.flag_bits & _ZIP_PATCH_DATA:
        raise ExtractError(f"member {name} holds compressed patch data (zip flag 0x20)")


class ZipReader:
    def __init__(self, path: Path, limits: ArchiveLimits) -> None:
        self._zip = zipfile.ZipFile(path)  # closed by close()
        try:
            tally = _Tally(limits)
            self._infos: dict[PurePosixPath, zipfile.ZipInfo] = {}
            for info in self._zip.infolist():
                _check_zip_member(info)
                # Not info.is_dir(): it raises IndexError on an empty name (zipfile cuts a name
                # at its first NUL byte, so "\x00" reads back as "").
                is_dir = info.filename.endswith("/")
                member = tally.add(info.filename, info.file_size, is_dir)
                if member is None:
                    continue
                tally.check_ratio(
                    f"member {_quoted(info.filename)}", info.file_size, info.compress_size
                )
                self._infos[member] = info
            # Many small members each pass the per-member check (they are under
            # `ratio_min_bytes`) while the whole unpacks to hundreds of times its size.
            tally.check_ratio("the archive", tally.total, path.stat().st_size)
            self.members = tally.members
        except BaseException:
            self._zip.close()
            raise

    def read(self, path: PurePosixPath, limit: int) -> bytes:
        info = self._infos[path]
        if info.file_size > limit:
            raise ExtractError(f"member {str(path)!r} is larger than {limit} bytes")
        return self._zip.read(info)

    def extract_all(self, dest: Path) -> None:
        for path, info in self._infos.items():
            if info.is_dir():
                (dest / path).mkdir(parents=True, exist_ok=True)
            else:
                _write(self._zip.open(info), dest / path)

    def close(self) -> None:
        self._zip.close()


_TAR_EXTENDED_HEADERS = frozenset(
    {
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
    }
)


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header that refuses, before reading them, extended headers past
    `MAX_TAR_EXTENDED_HEADER` and sparse files (tarfile reads their block maps whole too).

    Overrides tarfile's private `_proc_*` hooks (CPython 3.11's tarfile.py);
    tests/backends/test_archive.py fails if they are renamed.
    """

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _TAR_EXTENDED_HEADERS:
            # `archive.offset` stays at the member's first header until all of its headers are
            # read, so this bounds a chain of extended headers as well as each one.
            end = self.offset + tarfile.BLOCKSIZE + self.size
            if end - archive.offset > MAX_TAR_EXTENDED_HEADER:
                raise ExtractError(
                    f"a GNU long name or pax header of {self.size} bytes at offset {self.offset} "
                    f"(a member's extended headers may take {MAX_TAR_EXTENDED_HEADER} bytes)"
                )
            if isinstance(archive, _BoundedTarFile):
                archive.extended_cost += self.size**2
                if archive.extended_cost > MAX_TAR_EXTENDED_COST:
                    raise ExtractError("too many GNU long names or pax headers")
        elif self.type == tarfile.GNUTYPE_SPARSE:
            raise ExtractError(f"member {_quoted(self.name)} is a sparse file")
        return super()._proc_member(archive)  # type: ignore[misc]

    def _refuse_sparse(self, member: tarfile.TarInfo, *_: object) -> None:
        raise ExtractError(f"member {_quoted(member.name)} is a sparse file")

    # The sparse formats pax headers declare (GNU.sparse.*: 0.0, 0.1, 1.0).
    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse


class _BoundedTarFile(tarfile.TarFile):
    """A TarFile reading `_BoundedTarInfo` headers, and keeping none once returned."""

    tarinfo = _BoundedTarInfo
    members: list[tarfile.TarInfo]  # undocumented, and missing from typeshed
    extended_cost = 0  # the sum of the squares of the extended headers' sizes read so far

    def next(self) -> tarfile.TarInfo | None:
        info = super().next()
        # tarfile lists every header it reads, for getmembers() and to find link targets: neither
        # is used here (links are refused), and the listing of a tar bomb fills memory.
        self.members.clear()
        return info


def _open_tar(path: Path) -> tarfile.TarFile | None:
    """The tar archive at `path`, its first header read with `_BoundedTarInfo`; None when it
    is not one (tarfile.is_tarfile's test, without opening it a second time)."""
    try:
        return _BoundedTarFile.open(path, "r:*")
    except tarfile.TarError:
        return None


class TarReader:
    def __init__(self, tar: tarfile.TarFile, path: Path, limits: ArchiveLimits) -> None:
        self._tar = tar  # closed by close()
        try:
            tally = _Tally(limits)
            compressed = path.stat().st_size
            self._infos: dict[PurePosixPath, tarfile.TarInfo] = {}
            # next() rather than getmembers(): a tar bomb is refused as soon as its running
            # total passes the limit, not after decompressing all of it.
            while (info := self._tar.next()) is not None:
                if not (info.isfile() or info.isdir()):
                    raise ExtractError(f"member {_quoted(info.name)} is a link or special file")
                member = tally.add(info.name, info.size if info.isfile() else 0, info.isdir())
                # Declared sizes leave out what tarfile decompresses besides members' data:
                # headers, padding, the data of skipped root entries. Its position in the
                # decompressed stream counts all of it against the total; the ratio is the
                # data's, as for zip: headers compress some 100:1, and a real archive of many
                # small files (a pax header each, from Python's tarfile) would pass it.
                tally.check_total(self._tar.offset)
                tally.check_ratio("the archive", tally.total, compressed)
                if member is not None:
                    self._infos[member] = info
            self.members = tally.members
        except BaseException:
            self._tar.close()
            raise

    def read(self, path: PurePosixPath, limit: int) -> bytes:
        info = self._infos[path]
        if info.size > limit:
            raise ExtractError(f"member {str(path)!r} is larger than {limit} bytes")
        source = self._tar.extractfile(info)
        if source is None:
            raise ExtractError(f"member {str(path)!r} is not a file")
        with source:
            return source.read()

    def extract_all(self, dest: Path) -> None:
        for path, info in self._infos.items():
            if info.isdir():
                (dest / path).mkdir(parents=True, exist_ok=True)
                continue
            source = self._tar.extractfile(info)
            if source is None:
                raise ExtractError(f"member {_quoted(info.name)} is not a file")
            _write(source, dest / path)

    def close(self) -> None:
        self._tar.close()


# What zipfile, tarfile and zlib raise for a damaged archive (RuntimeError: zipfile's answer
# to encrypted members).
_CORRUPT = (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, RuntimeError)


@contextmanager
def open_reader(path: Path, limits: ArchiveLimits) -> Iterator[ArchiveReader]:
    """A validated zip or tar archive, closed on exit. A corrupt one (found while listing or
    while reading inside the block) raises ExtractError "corrupt archive: ..."."""
    reader: ArchiveReader
    try:
        if zipfile.is_zipfile(path):
            reader = ZipReader(path, limits)
        elif (tar := _open_tar(path)) is not None:
            reader = TarReader(tar, path, limits)
        else:
            raise ExtractError(
                "not a model archive: expected a .mar (zip), a .tar.gz or an extracted directory"
            )
        try:
            yield reader
        finally:
            reader.close()
    except _CORRUPT as exc:
        raise ExtractError(f"corrupt archive: {exc}") from exc
