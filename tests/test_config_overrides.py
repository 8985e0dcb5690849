"""load_config in TorchServe's order: the file, `$$VAR$$` references, the command line's flags,
then `TS_<KEY>` variables when the file enables them (ConfigManager's precedence)."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.config import ENVIRONMENT_KEYS, ConfigError, Overrides, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.properties"
    path.write_text(text)
    return path


def test_flags_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(
        tmp_path,
        "model_store=/elsewhere\nload_models=a.mar\nenable_model_api=false\n"
        "disable_token_authorization=false\n",
    )
    config = load_config(
        path,
        overrides=Overrides(
            model_store=Path("store"),
            models=("m=m.mar", "n.mar"),
            disable_token_auth=True,
            enable_model_api=True,
        ),
        environ={},
    )
    assert config.model_store == tmp_path / "store"  # relative to the working directory
    assert config.load_models == "m=m.mar,n.mar"
    assert config.enable_model_api and config.disable_token_authorization
    assert load_config(path, overrides=Overrides(models=("ALL",)), environ={}).load_models == "all"


def test_flags_only_turn_auth_off_and_the_model_api_on(tmp_path: Path) -> None:
    path = write(tmp_path, "disable_token_authorization=true\nenable_model_api=true\n")
    config = load_config(path, overrides=Overrides(), environ={})
    assert config.disable_token_authorization and config.enable_model_api


def test_environment_variables_need_enable_envvars_config(tmp_path: Path) -> None:
    environ = {"TS_JOB_QUEUE_SIZE": "7", "TS_MODEL_STORE": "/env/store"}
    plain = write(tmp_path, "job_queue_size=3\n")
    assert load_config(plain, environ=environ).job_queue_size == 3
    enabled = write(tmp_path, "job_queue_size=3\nenable_envvars_config=true\n")
    config = load_config(
        enabled, overrides=Overrides(model_store=Path("/flag/store")), environ=environ
    )
    assert config.job_queue_size == 7
    assert config.model_store == Path("/env/store")  # variables win over flags, as in TorchServe


def test_environment_names_are_torchserves(tmp_path: Path) -> None:
    assert ENVIRONMENT_KEYS["TS_INFERENCE_ADDRESS"] == "inference_address"
    assert ENVIRONMENT_KEYS["TS_TOKEN_EXPIRATION_TIME_MIN"] == "token_expiration_min"
    path = write(tmp_path, "enable_envvars_config=true\n")
    config = load_config(
        path,
        environ={
            "TS_INFERENCE_ADDRESS": "http://127.0.0.1:9080",
            "TS_DISABLE_TOKEN_AUTHORIZATION": "true",
            "TS_ALLOWED_URLS": "http://.*",  # only with use_env_allowed_urls=true
        },
    )
    assert config.inference_address.port == 9080
    assert config.disable_token_authorization
    assert config.allowed_urls == []


def test_references_are_replaced_and_an_unset_one_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "job_queue_size=$$QUEUE$$\n")
    assert load_config(path, environ={"QUEUE": "9"}).job_queue_size == 9
    with pytest.raises(ConfigError, match=r"\$\$QUEUE\$\$"):
        load_config(path, environ={})


def test_a_bad_value_names_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="job_queue_size='lots' is not an integer"):
        load_config(write(tmp_path, "job_queue_size=lots\n"), environ={})


def test_no_file_without_overrides_is_the_default_config() -> None:
    assert load_config(None, environ={}).snapshot_file is None
    config = load_config(None, overrides=Overrides(model_store=Path("/s")), environ={})
    assert config.model_store == Path("/s") and config.snapshot_file is None
