"""api.model_loader without a server: which urls register, and the signature of proxied versions."""

from __future__ import annotations

import asyncio
import json
import re
import zipfile
from pathlib import Path

import pytest

from api.config import parse_config
from api.core.registry import Registry
from api.core.types import Backend, ModelSettings
from api.errors import BadRequest, NotFound, http_status
from api.model_loader import ModelLoader, archive_signature, load_by_model


def test_a_proxied_versions_signature_comes_from_the_archive_in_the_store(
    tmp_path: Path,
) -> None:
    signature = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]}
    with zipfile.ZipFile(tmp_path / "m.mar", "w") as archive:
        archive.writestr("signature.json", json.dumps(signature))
    with zipfile.ZipFile(tmp_path / "plain.mar", "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", "{}")
    (tmp_path / "broken.mar").write_bytes(b"not a zip")
    assert archive_signature(tmp_path, "m.mar") == signature
    assert archive_signature(tmp_path, "plain.mar") is None
    assert archive_signature(tmp_path, "broken.mar") is None
    assert archive_signature(tmp_path, "missing.mar") is None
    assert archive_signature(tmp_path, "../m.mar") is None
    assert archive_signature(tmp_path, "torchserve://127.0.0.1:8080") is None


# -- which urls a registration may name ----------------------------------------------------------


def loader_for(store: Path, **raw: str) -> ModelLoader:
    async def never(path: Path, settings: ModelSettings, work_dir: Path) -> Backend:
        raise AssertionError("resolve() loads nothing")

    config = parse_config({"model_store": str(store), **raw}, base_dir=store.parent)
    return ModelLoader(config, Registry(), store.parent / "work", never)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    (store / "sub").mkdir(parents=True)
    (store / "m.mar").write_bytes(b"zip")
    (store / "sub" / "n.mar").write_bytes(b"zip")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "evil.mar").write_bytes(b"zip")
    return store


def refused(loader: ModelLoader, url: str) -> str:
    with pytest.raises(BadRequest) as info:
        loader.resolve(url)
    assert http_status(info.value) == 400
    return info.value.message


def test_archives_in_the_model_store_resolve_by_name_path_or_file_url(store: Path) -> None:
    loader = loader_for(store)
    assert loader.resolve("m.mar") == store / "m.mar"
    assert loader.resolve("sub/n.mar") == store / "sub" / "n.mar"
    assert loader.resolve("sub/../m.mar") == store / "m.mar"  # still inside
    assert loader.resolve(str(store / "m.mar")) == store / "m.mar"
    assert loader.resolve((store / "sub" / "n.mar").as_uri()) == store / "sub" / "n.mar"
    with pytest.raises(NotFound):
        loader.resolve("missing.mar")


def test_by_default_nothing_outside_the_model_store_registers(store: Path) -> None:
    loader = loader_for(store)
    outside = store.parent / "outside" / "evil.mar"
    for url in (
        "../outside/evil.mar",
        "sub/../../outside/evil.mar",
        str(outside),
        outside.as_uri(),
        "file://localhost" + str(outside),
        str(store.parent / "outside"),  # a directory: TorchServe's no-archive format
        "/etc/passwd",
        "../../../../../../etc/passwd",
    ):
        assert "outside the model store" in refused(loader, url), url


def test_a_url_that_is_not_a_local_file_is_refused(store: Path) -> None:
    loader = loader_for(store)
    assert "names another host" in refused(loader, "file://example.com/m.mar")
    assert "does not download" in refused(loader, "https://example.com/m.mar")
    assert "unsupported scheme" in refused(loader, "ftp://example.com/m.mar")
    (store / "loop").symlink_to(store / "loop")
    for url in ("m\x00.mar", "x" * 5000 + ".mar", "loop/m.mar"):
        assert "not a usable path" in refused(loader, url)


def test_a_symlink_escaping_the_store_only_counts_when_the_operator_placed_it(
    store: Path,
) -> None:
    outside = store.parent / "outside"
    (store / "linked.mar").symlink_to(outside / "evil.mar")  # the operator's own link
    (store / "escape").symlink_to(outside)
    loader = loader_for(store)
    assert loader.resolve("linked.mar") == outside / "evil.mar"
    assert loader.resolve("escape/evil.mar") == outside / "evil.mar"
    # '..' after a link is resolved on the real path, which is outside.
    assert "outside the model store" in refused(loader, "escape/../outside/evil.mar")


def test_allowed_urls_opts_a_folder_in_matched_on_the_real_path(store: Path) -> None:
    outside = store.parent / "outside"
    loader = loader_for(store, allowed_urls=f"{re.escape(outside.as_uri())}/.*")
    assert loader.resolve(str(outside / "evil.mar")) == outside / "evil.mar"
    assert loader.resolve((outside / "evil.mar").as_uri()) == outside / "evil.mar"
    # A url that only looks like it is under the allowed folder.
    sneaky = outside.as_uri() + "/../store/../../../etc/passwd"
    assert "outside the model store" in refused(loader, sneaky)
    # TorchServe's own default opts back in to every local path.
    anything = loader_for(store, allowed_urls=r"file://.*|http(s)?://.*")
    assert anything.resolve(str(outside / "evil.mar")) == outside / "evil.mar"
    assert "does not download" in refused(anything, "http://example.com/m.mar")


def test_a_bad_model_name_override_is_refused_before_the_archive_is_opened(
    store: Path,
) -> None:
    loader = loader_for(store)

    async def scenario() -> None:
        for name in ("../../x", "a\nb"):
            with pytest.raises(BadRequest, match="Invalid model name"):
                await loader.register("m.mar", ModelSettings(), model_name=name)

    asyncio.run(scenario())


def test_api_registrations_reach_torchserve_only_where_allowed_urls_names_it(
    store: Path,
) -> None:
    async def scenario(loader: ModelLoader, url: str) -> str:
        with pytest.raises(BadRequest) as info:
            await loader.register(url, ModelSettings(), requested=True)
        return info.value.message

    # TorchServe's default allows every http(s) url, never a TorchServe target.
    loose = loader_for(store, allowed_urls=r"file://.*|http(s)?://.*")
    message = asyncio.run(scenario(loose, "torchserve://10.0.0.1:8080/m/1.0"))
    assert "torchserve://10.0.0.1:8080 is not named by allowed_urls" in message
    # Named host, but its management_url points elsewhere.
    named = loader_for(store, allowed_urls=r"torchserve://ts:808[01]")
    url = "torchserve://ts:8080/m/1.0?management_url=http://169.254.169.254:80"
    message = asyncio.run(scenario(named, url))
    assert "torchserve://169.254.169.254:80 is not named" in message
    tls = "torchserve+https://ts:8443/m/1.0?management_url=none"
    assert "torchserve+https://ts:8443 is not named" in asyncio.run(scenario(named, tls))
    # A client cannot name the file the gateway reads TorchServe's keys from (it would read
    # any file, /dev/zero too, and send what it holds to the target): the operator's to name.
    keys = "torchserve://ts:8080/m/1.0?key_file=/dev/zero"
    assert "key_file is set in config.properties" in asyncio.run(scenario(named, keys))


def test_startup_loads_models_at_once_and_each_models_versions_in_order() -> None:
    """`load_by_model`: a slow model does not hold up another; one model's versions keep
    their order (the default first); errors come back in the items' order."""
    events: list[str] = []

    async def load(item: tuple[str, float]) -> None:
        what, seconds = item
        events.append(f"start {what}")
        await asyncio.sleep(seconds)
        if what == "b 2.0":
            raise ValueError("broken archive")
        events.append(f"done {what}")

    items = [
        ("a", "a 1.0", ("a 1.0", 0.2)),
        ("b", "b 1.0", ("b 1.0", 0.01)),
        ("a", "a 2.0", ("a 2.0", 0.0)),
        ("b", "b 2.0", ("b 2.0", 0.0)),
    ]
    errors = asyncio.run(load_by_model(items, load))
    assert errors == ["b 2.0: broken archive"]
    assert events.index("done b 1.0") < events.index("done a 1.0"), "b does not wait for a"
    assert events.index("done a 1.0") < events.index("start a 2.0"), "a's versions in order"
    assert "done a 2.0" in events


def test_load_models_items_split_at_their_first_equals_sign_as_torchserve_splits_them(
    tmp_path: Path,
) -> None:
    """TorchServe splits `name=url` at the first `=` (`split("=", 2)`), so a file or URL may
    hold `=` of its own; a plain item is the url alone."""
    store = tmp_path / "store"
    store.mkdir()
    for file in ("a=b.mar", "plain.mar"):
        (store / file).write_bytes(b"zip")
    loaded: list[tuple[str, str | None]] = []

    async def load(
        path: Path, settings: ModelSettings, work_dir: Path, name: str | None = None
    ) -> Backend:
        loaded.append((path.name, name))
        raise ValueError("not an archive")

    config = parse_config(
        {"model_store": str(store), "load_models": "named=a=b.mar, plain.mar"}, base_dir=tmp_path
    )
    loader = ModelLoader(config, Registry(), tmp_path / "work", load)
    errors = asyncio.run(loader.load_startup_models())
    assert sorted(loaded) == [("a=b.mar", "named"), ("plain.mar", None)]
    assert len(errors) == 2


def test_an_archives_identity_is_read_within_the_configured_archive_limits(
    tmp_path: Path,
) -> None:
    """A big archive the operator allowed (torchgate.archive_max_members) is known by its
    manifest's name and version at start, as when it is extracted: that groups its versions
    (loaded in order, the default first) and matches its models={...} entry."""
    store = tmp_path / "store"
    store.mkdir()
    manifest = {"model": {"modelName": "big", "modelVersion": "2.0", "handler": "h.py"}}
    with zipfile.ZipFile(store / "big.mar", "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        for index in range(10_001):  # past the default bound of 10,000 members
            archive.writestr(f"shard/{index}", b"")
    loader = loader_for(store, **{"torchgate.archive_max_members": "20000"})
    assert asyncio.run(loader._identity("big.mar", None)) == ("big", "2.0")
