"""Property tests of archive extraction (`api.backends.extract` through `archive.open_archive`).

Each example builds a zip (.mar) or tar.gz whose members are drawn from what an attacker would
try: names with `..`, absolute and drive paths, backslashes, NUL bytes, empty and `.` parts;
duplicates; symbolic and hard links; directories; declared sizes far beyond the data; and, often
enough that the rest gets reached, a valid manifest. Opening it either succeeds, with every file
inside the extraction directory and holding the bytes the archive gave it, or raises
`ArchiveError`, leaving nothing behind. Either way nothing is written outside the work
directory, and no link is ever created.
"""

from __future__ import annotations

import io
import json
import stat
import tarfile
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from api.backends.archive import ArchiveError, open_archive
from api.backends.extract import ArchiveLimits
from tests.support.fuzzing import fuzz_settings

MANIFEST = "MAR-INF/MANIFEST.json"
MANIFEST_BYTES = json.dumps({"model": {"modelName": "fuzz", "handler": "base_handler"}}).encode()
# Small limits, so that drawn sizes and counts cross them often.
LIMITS = ArchiveLimits(max_total_bytes=4096, max_members=12, max_ratio=20.0, ratio_min_bytes=512)

SAFE = st.lists(
    st.sampled_from(["a", "b", "model.pt", "MAR-INF", "x.py", "é"]), min_size=1, max_size=3
)
RISKY = st.sampled_from(["..", ".", "", "C:", "c:\\x", "\x00", "a\\..\\..", "/"])
SEGMENTS = st.one_of(SAFE.map("/".join), RISKY)
# Mostly safe names, so that archives with no bad member (extracted, then checked) are common.
NAMES = st.one_of(
    *[SAFE.map("/".join)] * 6,
    st.lists(SEGMENTS, min_size=1, max_size=4).map("/".join),
    st.lists(SEGMENTS, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts)),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12),
)


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "file", "dir", "symlink", "hardlink"
    data: bytes
    declared: int | None  # a size the header claims instead of len(data)


ENTRIES = st.builds(
    Entry,
    name=NAMES,
    kind=st.sampled_from(["file"] * 8 + ["dir", "symlink", "hardlink"]),
    data=st.one_of(st.binary(max_size=64), st.integers(0, 6000).map(lambda n: b"\0" * n)),
    declared=st.sampled_from([None] * 12 + [0, 1, 5000, 2**31, 2**40]),
)


def write_zip(path: Path, entries: list[Entry]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name": wanted here
        for entry in entries:
            name = entry.name + ("/" if entry.kind == "dir" else "")
            info = zipfile.ZipInfo(name)
            if entry.kind in ("symlink", "hardlink"):
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, entry.data, zipfile.ZIP_DEFLATED)
            if entry.declared is not None:
                # Only the central directory lies: that is the size readers plan with.
                archive.infolist()[-1].file_size = entry.declared


def write_tar(path: Path, entries: list[Entry]) -> None:
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            elif entry.kind in ("symlink", "hardlink"):
                info.type = tarfile.SYMTYPE if entry.kind == "symlink" else tarfile.LNKTYPE
                info.linkname = "/etc/passwd"
                archive.addfile(info)
            elif entry.declared is None:
                info.size = len(entry.data)
                archive.addfile(info, io.BytesIO(entry.data))
            else:
                # A header claiming `declared` bytes, followed by only the real data.
                info.size = entry.declared
                archive.fileobj.write(info.tobuf(archive.format, archive.encoding, "strict"))
                archive.fileobj.write(entry.data.ljust(-(-len(entry.data) // 512) * 512, b"\0"))
                archive.offset += 512 + -(-len(entry.data) // 512) * 512


ARCHIVES = st.tuples(
    st.sampled_from(["zip", "tar"]),
    st.lists(ENTRIES, max_size=5),
    st.booleans(),  # whether a valid manifest comes first
)


def files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*")}


@fuzz_settings(100)
@given(ARCHIVES)
# Found by this test: zipfile cuts a name at its first NUL, and info.is_dir() then raised
# IndexError on the empty name (a 500 at registration) instead of the archive being refused.
@example(("zip", [Entry("\x00", "file", b"x", None)], True))
@example(("tar", [Entry("0", "file", b"", 1)], True))  # reads a byte of the end-of-archive block
def test_extraction_stays_inside_or_refuses(archive: tuple[str, list[Entry], bool]) -> None:
    kind, entries, with_manifest = archive
    if with_manifest:
        entries = [Entry(MANIFEST, "file", MANIFEST_BYTES, None), *entries]
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = Path(tmp)
        path = sandbox / ("fuzz.mar" if kind == "zip" else "fuzz.tar.gz")
        (write_zip if kind == "zip" else write_tar)(path, entries)
        work = sandbox / "work"
        try:
            opened = open_archive(path, work_dir=work, limits=LIMITS)
        except ArchiveError:
            assert not work.exists() or not any(work.iterdir()), "a refused archive left files"
        else:
            assert opened.extracted_to is not None
            target = opened.extracted_to.resolve()
            assert target.is_relative_to(work.resolve())
            files = [entry for entry in entries if entry.kind == "file"]
            for file in target.rglob("*"):
                assert not file.is_symlink(), f"{file} is a link"
                assert file.resolve().is_relative_to(target)
                if not file.is_file():
                    continue
                relative = file.relative_to(target).as_posix()
                sources = [entry for entry in files if entry.name.strip("/") == relative]
                data = file.read_bytes()
                # An honest member gives exactly its bytes; a tar header that lies about its size
                # takes that many bytes of the stream after it (its own archive's), never more.
                assert not sources or any(
                    data == entry.data if entry.declared is None else len(data) <= entry.declared
                    for entry in sources
                )
            opened.remove()
        outside = files_under(sandbox) - {path} - files_under(work) - {work}
        assert not outside, f"written outside the work directory: {sorted(outside)}"


@fuzz_settings(40)
@given(st.lists(st.sampled_from(["a", "MAR-INF/MANIFEST.json", "b/c"]), min_size=2, max_size=6))
def test_duplicate_names_are_refused(names: list[str]) -> None:
    """A second member with a name seen before is refused: it would overwrite the first."""
    entries = [Entry(MANIFEST, "file", MANIFEST_BYTES, None)]
    entries += [Entry(name, "file", b"x", None) for name in names]
    duplicated = len({e.name for e in entries}) < len(entries)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dup.mar"
        write_zip(path, entries)
        try:
            open_archive(path, work_dir=Path(tmp) / "work", limits=LIMITS).remove()
        except ArchiveError as exc:
            assert duplicated and "appears twice" in str(exc)
        else:
            assert not duplicated
