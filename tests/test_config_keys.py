"""`api.config_keys`: the key table, the start-up warnings and the effective configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from api.config import parse_config
from api.config_keys import (
    IGNORED,
    KEYS,
    SUPPORTED,
    UNSUPPORTED,
    check_keys,
    effective_config,
    ignored_keys,
    report,
)


def test_every_key_torchserve_0_12_reads_is_classified() -> None:
    # The names ConfigManager (TorchServe 0.12) reads from config.properties.
    torchserve = """debug inference_address management_address metrics_address load_models
        blacklist_env_vars default_workers_per_model default_response_timeout
        default_startup_timeout unregister_model_timeout number_of_netty_threads
        netty_client_threads job_queue_size number_of_gpu metrics_config metrics_mode
        model_metrics_auto_detect disable_system_metrics ipex_enable cpu_launcher_enable
        cpu_launcher_args ipex_gpu_enable async_logging cors_allowed_origin cors_allowed_methods
        cors_allowed_headers decode_input_request keystore keystore_pass keystore_type
        certificate_file private_key_file max_request_size max_response_size
        limit_max_image_pixels default_service_handler service_envelope model_server_home
        model_store prefer_direct_buffer allowed_urls install_py_dep_per_model enable_metrics_api
        grpc_inference_address grpc_management_address grpc_inference_port grpc_management_port
        grpc_inference_max_connection_age_ms grpc_management_max_connection_age_ms
        grpc_inference_max_connection_age_grace_ms grpc_management_max_connection_age_grace_ms
        enable_grpc_ssl initial_worker_port initial_distribution_port workflow_store
        cpp_log_config ts_open_inference_protocol token_expiration_min ts_header_key_sequence_id
        ts_header_key_sequence_start ts_header_key_sequence_end disable_token_authorization
        enable_model_api use_native_io io_ratio metric_time_interval enable_envvars_config
        model_snapshot models system_metrics_cmd use_env_allowed_urls
        vmargs""".split()  # noqa: SIM905  (vmargs: read by ts/model_server.py for the JVM)
    assert not [name for name in torchserve if name not in KEYS]
    assert {key.status for key in KEYS.values()} == {SUPPORTED, IGNORED, UNSUPPORTED}


def test_unknown_keys_get_the_nearest_known_one() -> None:
    warnings = check_keys(
        {"inferance_address": "http://127.0.0.1:8080", "torchgate.max_conections": "10"}
    )
    assert warnings == [
        "unknown config key inferance_address; did you mean inference_address? (ignored)",
        "unknown config key torchgate.max_conections; did you mean torchgate.max_connections? "
        "(ignored)",
    ]
    assert check_keys({"zzz_nothing_alike": "1"}) == [
        "unknown config key zzz_nothing_alike (ignored)"
    ]


def test_unsupported_keys_warn_unless_at_torchserve_default() -> None:
    assert check_keys({"ipex_enable": "false", "debug": "false", "keystore_type": "PKCS12"}) == []
    (warning,) = check_keys({"ipex_enable": "true"})
    assert warning.startswith("config key ipex_enable is not supported by torchgate")
    assert check_keys({"async_logging": "true", "number_of_netty_threads": "4"}) == []


def test_ignored_keys_are_named_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Not warned about (they need nothing here), but not dropped in silence either."""
    raw = {"number_of_netty_threads": "4", "metrics_format": "prometheus", "job_queue_size": "9"}
    assert ignored_keys(raw) == [
        "number_of_netty_threads (Netty: torchgate runs on one asyncio loop)",
        "metrics_format (in KServe's example config; TorchServe 0.12 does not read it)",
    ]
    with caplog.at_level("INFO", logger="torchgate.config"):
        report(parse_config(raw, base_dir=tmp_path))
    said = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert said == [f"config keys with no effect in torchgate: {'; '.join(ignored_keys(raw))}"]
    caplog.clear()
    with caplog.at_level("INFO", logger="torchgate.config"):
        report(parse_config({"job_queue_size": "9"}, base_dir=tmp_path))
    assert not [r for r in caplog.records if "no effect" in r.getMessage()]


def test_a_python_other_than_the_running_one_is_warned_about(tmp_path: Path) -> None:
    """Workers are forked from torchgate's interpreter: TorchServe's `python` key cannot pick
    another (say a venv with the handlers' packages), so naming one is not silent."""
    assert check_keys({"python": sys.executable}) == []
    # Another venv on the same base interpreter: its python is a link to the same file.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "v")], check=True)
    (warning,) = check_keys({"python": str(tmp_path / "v" / "bin" / "python")})
    assert "is not supported by torchgate" in warning
    (warning,) = check_keys({"python": os.path.realpath(sys.executable)})  # the bare base
    assert ignored_keys({"python": sys.executable}) == [
        "python (workers run this interpreter (another one is warned about))"
    ]
    (warning,) = check_keys({"python": "/opt/other-venv/bin/python3"})
    assert warning.startswith("config key python=/opt/other-venv/bin/python3 is not supported")
    assert sys.executable in warning and ignored_keys({"python": "/opt/x/python"}) == []


def test_effective_config_masks_secrets(tmp_path: Path) -> None:
    raw = {"keystore_pass": "hunter2", "cors_allowed_origin": "*", "job_queue_size": "7"}
    lines = effective_config(parse_config(raw, base_dir=tmp_path))
    text = "\n".join(lines)
    assert "hunter2" not in text
    assert "keystore_pass: ********" in lines
    assert "cors_allowed_origin: *" in lines
    assert "job_queue_size: 7" in lines
    assert "inference_address: http://127.0.0.1:8080" in lines


def test_a_supported_key_warns_for_values_served_otherwise() -> None:
    assert check_keys({"metrics_mode": "prometheus"}) == []
    (warning,) = check_keys({"metrics_mode": "log"})
    assert warning.startswith("config key metrics_mode=log is not supported by torchgate")
    assert "no metric log files" in warning


def test_metrics_api_and_token_lifetime_are_read(tmp_path: Path) -> None:
    config = parse_config({}, base_dir=tmp_path)
    assert config.enable_metrics_api and config.token_expiration_min == 60
    assert [api for api, _ in config.http_addresses()] == ["inference", "management", "metrics"]
    raw = {"enable_metrics_api": "False", "token_expiration_min": "0.5"}
    config = parse_config(raw, base_dir=tmp_path)
    assert not config.enable_metrics_api and config.token_expiration_min == 0.5
    assert [api for api, _ in config.http_addresses()] == ["inference", "management"]
    for bad in ("soon", "0", "-1"):
        with pytest.raises(ValueError, match="token_expiration_min"):
            parse_config({"token_expiration_min": bad}, base_dir=tmp_path)


def test_disable_system_metrics_is_read(tmp_path: Path) -> None:
    assert not parse_config({}, base_dir=tmp_path).disable_system_metrics
    raw = {"disable_system_metrics": "TRUE"}
    assert parse_config(raw, base_dir=tmp_path).disable_system_metrics
