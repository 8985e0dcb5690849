"""Opening archives: what a valid one yields, and every way a bad one is refused by name."""

from __future__ import annotations

import bz2
import io
import stat
import subprocess
import sys
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from api.backends.archive import MAX_METADATA_BYTES, ArchiveError, archive_identity, open_archive
from api.backends.extract import ArchiveLimits, MiB
from api.errors import BadRequest, http_status
from tests.backends.conftest import BuildArchive, manifest, write_zip
from tests.support.bombs import many_small_members_bomb

HANDLER = "def handle(data, context):\n    return data\n"


def refused(path: Path, *, work_dir: Path, limits: ArchiveLimits | None = None) -> str:
    with pytest.raises(ArchiveError) as info:
        open_archive(path, work_dir=work_dir, limits=limits)
    message = info.value.message
    assert str(path) in message, message
    assert list(work_dir.glob("*")) == [], "a refused archive leaves nothing behind"
    return message


def test_mar_built_by_torch_model_archiver(build_archive: BuildArchive, tmp_path: Path) -> None:
    path = build_archive(
        "tiny",
        "handler.py",
        {
            "handler.py": HANDLER,
            "weights.pt": b"\x00weights",
            "signature.json": '{"inputs": [{"name": "x"}]}',
            "model-config.yaml": "minWorkers: 2\nhandler:\n  topk: 3\n",
        },
        serialized="weights.pt",
        version="2.1",
        config="model-config.yaml",
    )
    work = tmp_path / "work"
    archive = open_archive(path, work_dir=work)

    assert (archive.name, archive.version) == ("tiny", "2.1")
    assert archive.model_dir.parent == work.resolve()
    assert archive.model_dir.name.startswith("tiny-2.1-")
    assert archive.manifest["model"]["handler"] == "handler.py"
    assert archive.handler.source == "archive"
    assert archive.handler.module == "handler"
    assert archive.handler.file == archive.model_dir / "handler.py"
    assert archive.serialized_file == archive.model_dir / "weights.pt"
    assert archive.serialized_file.read_bytes() == b"\x00weights"
    assert archive.signature == {"inputs": [{"name": "x"}]}
    assert archive.model_config == {"minWorkers": 2, "handler": {"topk": 3}}

    archive.remove()
    assert not archive.model_dir.exists()


def test_two_loads_of_one_archive_get_separate_directories(
    build_archive: BuildArchive, tmp_path: Path
) -> None:
    v1 = open_archive(build_archive("m", "h.py", {"h.py": HANDLER}), work_dir=tmp_path / "w")
    v2 = open_archive(
        build_archive("m", "h.py", {"h.py": HANDLER}, version="2.0"), work_dir=tmp_path / "w"
    )
    again = open_archive(v1.path, work_dir=tmp_path / "w")
    assert len({v1.model_dir, v2.model_dir, again.model_dir}) == 3
    assert v2.model_dir.name.startswith("m-2.0-")


def test_no_archive_directory_is_used_in_place(build_archive: BuildArchive) -> None:
    path = build_archive("flat", "h.py", {"h.py": HANDLER}, archive_format="no-archive")
    archive = open_archive(path)
    assert archive.model_dir == path.resolve()
    assert archive.extracted_to is None
    archive.remove()
    assert path.is_dir(), "a directory the user handed in is never deleted"


def test_tgz_keeps_files_under_one_top_directory(
    build_archive: BuildArchive, tmp_path: Path
) -> None:
    path = build_archive("packed", "h.py", {"h.py": HANDLER}, archive_format="tgz")
    archive = open_archive(path, work_dir=tmp_path / "w")
    assert archive.model_dir.name == "packed"
    assert (archive.model_dir / "h.py").is_file()


@pytest.mark.parametrize(
    ("spec", "module"),
    [
        ("base_handler", "handlers.builtin.base_handler"),
        ("image_classifier", "handlers.builtin.image_classifier"),
        ("ts.torch_handler.object_detector", "handlers.builtin.object_detector"),
        # TorchServe handlers torchgate does not reimplement run as TorchServe ships them.
        ("densenet_handler", "ts.torch_handler.densenet_handler"),
    ],
)
def test_builtin_handler_name(
    build_archive: BuildArchive, tmp_path: Path, spec: str, module: str
) -> None:
    path = build_archive("b", "base_handler", {"w.pt": b"x"}, serialized="w.pt")
    archive = open_archive(path, work_dir=tmp_path / "w", handler=spec)
    assert (archive.handler.source, archive.handler.module) == ("builtin", module)


def test_handler_with_function_name(build_archive: BuildArchive, tmp_path: Path) -> None:
    path = build_archive("f", "h.py", {"h.py": HANDLER})
    archive = open_archive(path, work_dir=tmp_path / "w", handler="h.py:predict", name="renamed")
    assert (archive.handler.module, archive.handler.function) == ("h", "predict")
    assert archive.name == "renamed"


# -- refused -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("member", "why"),
    [
        ("../evil.py", "escapes"),
        ("a/../../evil.py", "escapes"),
        ("..\\evil.py", "escapes"),
        ("/etc/evil.py", "absolute"),
        ("C:/evil.py", "absolute"),
    ],
)
def test_member_escaping_the_directory(tmp_path: Path, member: str, why: str) -> None:
    path = write_zip(
        tmp_path / "evil.mar",
        {"MAR-INF/MANIFEST.json": manifest(), "handler.py": HANDLER, member: "x"},
    )
    message = refused(path, work_dir=tmp_path / "w")
    assert why in message and repr(member) in message


def test_symlink_member(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "link.mar", {"MAR-INF/MANIFEST.json": manifest()})
    with zipfile.ZipFile(path, "a") as archive:
        info = zipfile.ZipInfo("handler.py")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    assert "symbolic link" in refused(path, work_dir=tmp_path / "w")


def test_tar_link_member(tmp_path: Path) -> None:
    path = tmp_path / "link.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("m/handler.py")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        archive.addfile(info)
    assert "link or special file" in refused(path, work_dir=tmp_path / "w")


def test_zip_bomb_by_compression_ratio(tmp_path: Path) -> None:
    path = write_zip(
        tmp_path / "bomb.mar",
        {"MAR-INF/MANIFEST.json": manifest(), "handler.py": HANDLER, "w.pt": bytes(4 << 20)},
    )
    assert "zip bomb" in refused(path, work_dir=tmp_path / "w")


def test_total_size_limit(tmp_path: Path) -> None:
    path = write_zip(
        tmp_path / "big.mar",
        {"MAR-INF/MANIFEST.json": manifest(), "handler.py": HANDLER, "w.pt": b"x" * 5000},
    )
    message = refused(path, work_dir=tmp_path / "w", limits=ArchiveLimits(max_total_bytes=4096))
    assert "more than 4096 bytes" in message


def test_tar_bomb_total_size(tmp_path: Path) -> None:
    path = tmp_path / "big.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("m/w.pt")
        info.size = 1 << 20
        archive.addfile(info, io.BytesIO(bytes(info.size)))
    limits = ArchiveLimits(max_total_bytes=1000)
    assert "more than 1000 bytes" in refused(path, work_dir=tmp_path / "w", limits=limits)


def test_member_count_limit(tmp_path: Path) -> None:
    members = {f"f{i}.txt": "x" for i in range(20)}
    path = write_zip(tmp_path / "many.mar", {"MAR-INF/MANIFEST.json": manifest(), **members})
    limits = ArchiveLimits(max_members=10)
    assert "more than 10 members" in refused(path, work_dir=tmp_path / "w", limits=limits)


def test_missing_manifest(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "plain.mar", {"handler.py": HANDLER})
    assert "missing MAR-INF/MANIFEST.json" in refused(path, work_dir=tmp_path / "w")


def test_manifest_not_json(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": "{not json"})
    assert "not valid JSON" in refused(path, work_dir=tmp_path / "w")


def test_manifest_without_handler(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": manifest(handler="")})
    assert "names no handler" in refused(path, work_dir=tmp_path / "w")


def test_handler_file_missing(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": manifest("gone.py")})
    assert "handler file 'gone.py' is not in the archive" in refused(path, work_dir=tmp_path / "w")


def test_unknown_handler_name(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": manifest("no_such_handler")})
    assert "built-in handlers" in refused(path, work_dir=tmp_path / "w")


def test_serialized_file_missing(tmp_path: Path) -> None:
    path = write_zip(
        tmp_path / "m.mar",
        {"MAR-INF/MANIFEST.json": manifest(serializedFile="model.pt"), "handler.py": HANDLER},
    )
    message = refused(path, work_dir=tmp_path / "w")
    assert "serializedFile 'model.pt', which is not in the archive" in message


def test_serialized_file_outside_the_archive(tmp_path: Path) -> None:
    path = write_zip(
        tmp_path / "m.mar",
        {"MAR-INF/MANIFEST.json": manifest(serializedFile="../../etc/hosts"), "handler.py": ""},
    )
    assert "points outside the archive" in refused(path, work_dir=tmp_path / "w")


def test_invalid_signature(tmp_path: Path) -> None:
    path = write_zip(
        tmp_path / "m.mar",
        {"MAR-INF/MANIFEST.json": manifest(), "handler.py": HANDLER, "signature.json": "[1"},
    )
    assert "signature.json is not valid JSON" in refused(path, work_dir=tmp_path / "w")


def test_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "model.mar"
    path.write_text("just text")
    assert "not a model archive" in refused(path, work_dir=tmp_path / "w")


def test_corrupt_zip(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.mar"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("MAR-INF/MANIFEST.json", manifest())
        archive.writestr("handler.py", HANDLER)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"return data", b"return DATA"))  # the CRC no longer matches
    assert "corrupt archive" in refused(path, work_dir=tmp_path / "w")


def test_missing_path(tmp_path: Path) -> None:
    assert "does not exist" in refused(tmp_path / "nope.mar", work_dir=tmp_path / "w")


def test_directory_without_manifest(tmp_path: Path) -> None:
    directory = tmp_path / "model"
    directory.mkdir()
    with pytest.raises(ArchiveError, match=r"missing MAR-INF/MANIFEST\.json"):
        open_archive(directory)


def test_archive_errors_are_bad_requests() -> None:
    error = ArchiveError("Model archive x.mar: broken")
    assert isinstance(error, BadRequest)
    assert http_status(error) == 400


def test_many_small_members_bomb_is_refused_before_extracting(tmp_path: Path) -> None:
    # The archive: 430 KB unpacking to 401 MB, each member passing the per-member check.
    path = many_small_members_bomb(tmp_path / "bomb.mar")
    assert path.stat().st_size < 500_000
    message = refused(path, work_dir=tmp_path / "w")  # which checks nothing was written
    assert "the archive expands 401" in message and "zip bomb" in message


def test_whole_archive_ratio_limit_is_configurable(tmp_path: Path) -> None:
    path = many_small_members_bomb(tmp_path / "bomb.mar", members=3)
    opened = open_archive(path, work_dir=tmp_path / "w", limits=ArchiveLimits(max_ratio=1_000_000))
    try:
        assert opened.name == "bomb"
    finally:
        opened.remove()


def test_a_real_archive_passes_the_whole_archive_ratio(
    build_archive: BuildArchive, tmp_path: Path
) -> None:
    # Text compresses well, but nowhere near the default 100:1.
    vocab = "\n".join(f"token{i}" for i in range(200_000))
    path = build_archive("text", "handler.py", {"handler.py": HANDLER, "vocab.txt": vocab})
    opened = open_archive(path, work_dir=tmp_path / "w")
    opened.remove()


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [("noname.mar", "noname"), ("my-model.v2.mar", "my_model_v2"), ("tarred.tar.gz", "tarred")],
)
def test_a_manifest_without_model_name_is_named_after_the_file(
    tmp_path: Path, file_name: str, expected: str
) -> None:
    """As TorchServe: the file's name without its extension, other characters than letters,
    digits and '_' made '_'."""
    files = {"MAR-INF/MANIFEST.json": manifest(modelName=None), "handler.py": HANDLER}
    if file_name.endswith(".tar.gz"):
        path = tmp_path / file_name
        with tarfile.open(path, "w:gz") as tar:
            for name, text in files.items():
                data = text.encode()
                info = tarfile.TarInfo(f"tarred/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        path = write_zip(tmp_path / file_name, files)
    assert open_archive(path, work_dir=tmp_path / "w").name == expected


# -- refused before they cost memory or CPU ---------------------------------------------------


@pytest.mark.parametrize(
    ("compression", "method"), [(zipfile.ZIP_BZIP2, "bzip2"), (zipfile.ZIP_LZMA, "LZMA")]
)
def test_zip_member_compressed_other_than_deflate(
    tmp_path: Path, compression: int, method: str
) -> None:
    # zipfile decompresses these without bounding the output: 337 bytes of bzip2 took 819 MB.
    path = write_zip(tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": manifest(), "handler.py": ""})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("weights.bin", bytes(1000), compress_type=compression)
    message = refused(path, work_dir=tmp_path / "w")
    assert f"member 'weights.bin' is compressed with {method} (zip method {compression})" in message


def test_manifest_compressed_with_bzip2_is_refused_unread(tmp_path: Path) -> None:
    # The manifest is read at start-up (load_models=all): it gets the same check.
    path = tmp_path / "m.mar"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_BZIP2) as archive:
        archive.writestr("MAR-INF/MANIFEST.json", manifest())
    with pytest.raises(ArchiveError, match=r"'MAR-INF/MANIFEST.json' is compressed with bzip2"):
        archive_identity(path)


def test_encrypted_zip_member(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": manifest(), "handler.py": ""})
    data = bytearray(path.read_bytes())
    # zipfile writes no encrypted members: set the flag in the local and central headers.
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        header = data.rindex(signature)  # handler.py's, the last member
        data[header + flags_at] |= 0x1
    path.write_bytes(data)
    assert "member 'handler.py' is encrypted" in refused(path, work_dir=tmp_path / "w")


def _tar_bz2(path: Path, *blocks: bytes) -> Path:
    path.write_bytes(bz2.compress(b"".join(blocks) + bytes(2 * tarfile.BLOCKSIZE)))
    return path


def test_tar_root_entries_count_toward_the_member_limit(tmp_path: Path) -> None:
    # The archive held 300,000 "./" headers in 4 KB: 12 s of CPU, then accepted.
    root = tarfile.TarInfo("./")
    root.type = tarfile.DIRTYPE
    path = _tar_bz2(tmp_path / "roots.tar.bz2", root.tobuf() * 20_000)
    assert path.stat().st_size < 1000
    # Over the default ratio too (10 MB of headers from 358 bytes): lift it, to see the count.
    limits = ArchiveLimits(max_ratio=1e9)
    assert "more than 10000 members" in refused(path, work_dir=tmp_path / "w", limits=limits)


def test_tar_data_of_root_entries_counts_toward_the_total(tmp_path: Path) -> None:
    # A root entry is never extracted, but tarfile decompresses its data to skip it.
    root = tarfile.TarInfo(".")
    root.size = 2 * MiB
    path = _tar_bz2(tmp_path / "root.tar.bz2", root.tobuf(), bytes(root.size))
    limits = ArchiveLimits(max_total_bytes=MiB)
    message = refused(path, work_dir=tmp_path / "w", limits=limits)
    assert f"more than {MiB} bytes" in message


def _long_name_header(size: int) -> bytes:
    header = tarfile.TarInfo("././@LongLink")
    header.type = tarfile.GNUTYPE_LONGNAME
    header.size = size
    return header.tobuf(format=tarfile.GNU_FORMAT)


def test_tar_long_name_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # A 308-byte file with a 200 MB long name took 431 MB.
    name = b"a" * (8 * MiB)
    member = tarfile.TarInfo("short")
    path = _tar_bz2(tmp_path / "long.tar.bz2", _long_name_header(len(name)), name, member.tobuf())
    tracemalloc.start()
    try:
        message = refused(path, work_dir=tmp_path / "w")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"GNU long name or pax header of {len(name)} bytes" in message
    assert peak < 2 * MiB, f"{peak} bytes allocated: the long name was read"


def test_tar_chain_of_small_long_names_is_bounded_too(tmp_path: Path) -> None:
    link = _long_name_header(1024) + b"a" * 1024
    path = _tar_bz2(tmp_path / "chain.tar.bz2", link * 200, tarfile.TarInfo("short").tobuf())
    assert "GNU long name or pax header" in refused(path, work_dir=tmp_path / "w")


def _python_tgz(path: Path, files: dict[str, bytes], pax: dict[str, str] | None = None) -> Path:
    """A .tar.gz as torch-model-archiver's tgz format writes it: Python's tarfile, pax format,
    each member with a pax header (its fractional mtime, and `pax` if given)."""
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"m/{name}")
            info.size, info.mtime = len(data), 1733333333.25
            info.pax_headers = dict(pax or {})
            archive.addfile(info, io.BytesIO(data))
    return path


def test_tar_of_many_small_files_from_python_s_tarfile_is_accepted(tmp_path: Path) -> None:
    """Each member's pax header compresses some 100:1: the ratio is the data's, not the
    headers' (1,500 small files were refused as a bomb)."""
    files = {f"conf/{i}.json": b"{}" for i in range(1500)}
    files["MAR-INF/MANIFEST.json"] = manifest().encode()
    files["handler.py"] = b"def handle(data, context):\n    return data\n"
    archive = open_archive(_python_tgz(tmp_path / "many.tar.gz", files), work_dir=tmp_path / "w")
    assert (archive.model_dir / "conf" / "1499.json").read_bytes() == b"{}"
    archive.remove()


def test_tar_pax_headers_are_bounded_by_their_cost_in_all(tmp_path: Path) -> None:
    """A pax header is searched in a time that grows with its size squared on Python before
    3.11.10 (CVE-2024-6232): many of the largest allowed are refused, quickly."""
    files = {f"{i}.txt": b"x" for i in range(200)}
    path = _python_tgz(tmp_path / "pax.tar.gz", files, pax={"comment": "1" * 1400})
    assert "too many GNU long names or pax headers" in refused(path, work_dir=tmp_path / "w")


def test_tar_sparse_member(tmp_path: Path) -> None:
    sparse = tarfile.TarInfo("m/weights.bin")
    sparse.type = tarfile.GNUTYPE_SPARSE
    path = _tar_bz2(tmp_path / "sparse.tar.bz2", sparse.tobuf(format=tarfile.GNU_FORMAT))
    assert "member 'm/weights.bin' is a sparse file" in refused(path, work_dir=tmp_path / "w")


def test_tarfile_still_has_the_hooks_the_bounds_override() -> None:
    # _BoundedTarInfo overrides these private methods of CPython's tarfile: if one is renamed,
    # the bound on it silently goes.
    for hook in ("_proc_member", "_proc_gnusparse_00", "_proc_gnusparse_01", "_proc_gnusparse_10"):
        assert callable(getattr(tarfile.TarInfo, hook, None)), hook


def test_a_long_member_name_is_cut_in_the_error(tmp_path: Path) -> None:
    member = "../" + "a" * 10_000
    path = write_zip(tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": manifest(), member: "x"})
    message = refused(path, work_dir=tmp_path / "w")
    assert "escapes" in message and "(10003 characters)" in message
    assert len(message) < 1000


# -- handlers resolved without running code -----------------------------------------------------

TRAP = "torchgate_trap_package"


@pytest.fixture
def trap_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An installed package whose import exits the process."""
    package = tmp_path / "site" / TRAP
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise SystemExit('imported in the frontend')\n")
    (package / "handler.py").write_text(HANDLER)
    monkeypatch.syspath_prepend(str(package.parent))
    return TRAP


def test_installed_handler_is_found_without_importing_its_package(
    trap_package: str, tmp_path: Path
) -> None:
    path = write_zip(tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": manifest()})
    archive = open_archive(path, work_dir=tmp_path / "w", handler=f"{trap_package}.handler")
    assert (archive.handler.source, archive.handler.module) == (
        "installed",
        f"{trap_package}.handler",
    )
    assert trap_package not in sys.modules


def test_missing_handler_in_an_installed_package_is_refused_without_importing_it(
    trap_package: str, tmp_path: Path
) -> None:
    path = write_zip(tmp_path / "m.mar", {"MAR-INF/MANIFEST.json": manifest()})
    with pytest.raises(ArchiveError, match="neither a file in the archive"):
        open_archive(path, work_dir=tmp_path / "w", handler=f"{trap_package}.nothing.here")
    assert trap_package not in sys.modules


def test_handler_in_a_package_the_frontend_must_not_import(tmp_path: Path) -> None:
    # torch is installed, and loading it into the frontend costs seconds and hundreds of MB
    # (in a fresh interpreter: this test session imports torch anyway).
    code = (
        "import sys\n"
        "from api.backends.archive import _importable\n"
        "assert _importable('torch.nn.functional')\n"
        "assert not _importable('torch.no_such_module')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- metadata files bounded before they are parsed ---------------------------------------------


@pytest.mark.parametrize("file_name", ["signature.json", "model-config.yaml"])
def test_metadata_file_larger_than_the_limit(tmp_path: Path, file_name: str) -> None:
    big = '{"a": "' + "x" * MAX_METADATA_BYTES + '"}'
    config = {"configFile": file_name} if file_name.endswith(".yaml") else {}
    path = write_zip(
        tmp_path / "m.mar",
        {"MAR-INF/MANIFEST.json": manifest(**config), "handler.py": HANDLER, file_name: big},
    )
    limits = ArchiveLimits(max_ratio=1e9)  # 1 MiB of "x" compresses past the default ratio
    message = refused(path, work_dir=tmp_path / "w", limits=limits)
    assert f"{file_name} is larger than {MAX_METADATA_BYTES} bytes" in message
