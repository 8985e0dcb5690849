"""`torchgate models ...`: the management API from a shell, tables for people, --json for scripts.

    torchgate models list
    torchgate models describe digits [2.0|all]
    torchgate models register digits_v2.mar [--model-name NAME] [--initial-workers N] ...
    torchgate models scale digits [2.0] --min-worker 2 [--max-worker 4]
    torchgate models set-default digits 2.0
    torchgate models unregister digits [2.0]
    torchgate models traffic digits [--weights 1.0=95,2.0=5 [--sticky-header H] [--shadow V:P]
                                     | --clear]

Where the management API is: `--url`, else `TORCHGATE_MANAGEMENT_URL`, else
`management_address` in the config (`--ts-config`, `TS_CONFIG_FILE` or ./config.properties),
else http://127.0.0.1:8081. The token: `--token`, else `TORCHGATE_TOKEN`, else the
`management` key of key_file.json (beside the config, or in the working directory), when
that file exists. A refusal prints the server's message and exits 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8081"


class CommandError(Exception):
    """The request failed; the message is printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchgate models", description="Manage the models of a running server."
    )
    _common_flags(parser, default=True)
    common = argparse.ArgumentParser(add_help=False)
    _common_flags(common, default=False)  # also accepted after the action
    sub = parser.add_subparsers(dest="action", required=True)
    add = functools.partial(sub.add_parser, parents=[common])

    add("list", help="registered models")
    describe = add("describe", help="a model's versions and workers")
    describe.add_argument("name")
    describe.add_argument("version", nargs="?", default="all", help="a version, or all")

    register = add("register", help="load an archive (needs enable_model_api)")
    register.add_argument(
        "archive", metavar="URL", help="a .mar file name in the model store, or an allowed URL"
    )
    register.add_argument("--model-name")
    register.add_argument("--batch-size", type=int)
    register.add_argument("--max-batch-delay", type=float, help="milliseconds")
    register.add_argument("--initial-workers", type=int)
    register.add_argument("--response-timeout", type=float, help="seconds")
    register.add_argument("--async", dest="asynchronous", action="store_true")

    scale = add("scale", help="set workers (and batching) of a version")
    scale.add_argument("name")
    scale.add_argument("version", nargs="?")
    scale.add_argument("--min-worker", type=int)
    scale.add_argument("--max-worker", type=int)
    scale.add_argument("--batch-size", type=int)
    scale.add_argument("--max-batch-delay", type=float, help="milliseconds")
    scale.add_argument("--async", dest="asynchronous", action="store_true")

    default = add("set-default", help="make a version the default")
    default.add_argument("name")
    default.add_argument("version")

    unregister = add("unregister", help="unload a version (needs enable_model_api)")
    unregister.add_argument("name")
    unregister.add_argument("version", nargs="?")

    traffic = add("traffic", help="show, set or clear a model's traffic policy")
    traffic.add_argument("name")
    change = traffic.add_mutually_exclusive_group()
    change.add_argument("--weights", help="VERSION=WEIGHT,... e.g. 1.0=95,2.0=5")
    change.add_argument("--clear", action="store_true", help="back to the default version")
    traffic.add_argument("--sticky-header", help="header that keeps a user on one version")
    traffic.add_argument("--no-sticky", action="store_true", help="no sticking")
    traffic.add_argument("--shadow", metavar="VERSION[:PERCENT]", help="copy traffic there")
    return parser


def _common_flags(parser: argparse.ArgumentParser, *, default: bool) -> None:
    def value(v: Any) -> Any:
        return v if default else argparse.SUPPRESS

    parser.add_argument(
        "--url", default=value(None), help="management API address (env TORCHGATE_MANAGEMENT_URL)"
    )
    parser.add_argument(
        "--ts-config", dest="ts_config", default=value(None), help="read management_address here"
    )
    parser.add_argument("--token", default=value(None), help="management key (env TORCHGATE_TOKEN)")
    parser.add_argument(
        "--json", action="store_true", default=value(False), help="print the JSON answer"
    )
    parser.add_argument("--timeout", type=float, default=value(300.0), help="seconds (300)")


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    options = parser.parse_args(list(argv))
    try:
        request = _request(options)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        with httpx.Client(
            base_url=management_url(options), headers=_auth(options), timeout=options.timeout
        ) as client:
            answer = _send(client, *request)
            if options.action == "list" and not options.json:
                answer = _all_pages(client, answer)
    except CommandError as exc:
        print(f"torchgate models: {exc}", file=sys.stderr)
        return 1
    if options.json:
        print(json.dumps(answer, indent=2))
    else:
        print(render(options.action, answer))
    return 0


def _request(options: argparse.Namespace) -> tuple[str, str, dict[str, Any], Any]:
    """(method, path, query, JSON body) for the action; ValueError on a bad option."""
    name: str = getattr(options, "name", "")
    version: str | None = getattr(options, "version", None)
    action = options.action
    if action == "list":
        return "GET", "/models", {}, None
    if action == "describe":
        return "GET", _path(name, version), {}, None
    if action == "register":
        query = {
            "url": options.archive,
            "model_name": options.model_name,
            "batch_size": options.batch_size,
            "max_batch_delay": options.max_batch_delay,
            "initial_workers": options.initial_workers,
            "response_timeout": options.response_timeout,
            "synchronous": "false" if options.asynchronous else "true",
        }
        return "POST", "/models", query, None
    if action == "scale":
        query = {
            "min_worker": options.min_worker,
            "max_worker": options.max_worker,
            "batch_size": options.batch_size,
            "max_batch_delay": options.max_batch_delay,
            "synchronous": "false" if options.asynchronous else "true",
        }
        return "PUT", _path(name, version), query, None
    if action == "set-default":
        return "PUT", f"{_path(name, version)}/set-default", {}, None
    if action == "unregister":
        return "DELETE", _path(name, version), {}, None
    # traffic
    if options.clear:
        return "DELETE", f"{_path(name)}/traffic", {}, None
    if options.weights is None:
        if options.sticky_header or options.no_sticky or options.shadow:
            raise ValueError("traffic: --sticky-header, --no-sticky and --shadow need --weights")
        return "GET", f"{_path(name)}/traffic", {}, None
    return "PUT", f"{_path(name)}/traffic", {}, _policy(options)


def _policy(options: argparse.Namespace) -> dict[str, Any]:
    weights: dict[str, float] = {}
    for item in options.weights.split(","):
        version, sep, weight = item.strip().partition("=")
        try:
            weights[version] = float(weight)
        except ValueError:
            raise ValueError(f"--weights: {item!r} is not VERSION=WEIGHT") from None
        if not sep or not version:
            raise ValueError(f"--weights: {item!r} is not VERSION=WEIGHT")
    policy: dict[str, Any] = {"weights": weights}
    if options.no_sticky:
        policy["sticky_header"] = None
    elif options.sticky_header:
        policy["sticky_header"] = options.sticky_header
    if options.shadow:
        version, _, percent = options.shadow.partition(":")
        try:
            policy["shadow"] = {"version": version, "percent": float(percent or 100)}
        except ValueError:
            raise ValueError(f"--shadow: {options.shadow!r} is not VERSION[:PERCENT]") from None
    return policy


def _path(name: str, version: str | None = None) -> str:
    quoted = httpx.URL(f"/models/{name}").raw_path.decode()
    return quoted if version is None else f"{quoted}/{version}"


def management_url(options: argparse.Namespace) -> str:
    url = options.url or os.environ.get("TORCHGATE_MANAGEMENT_URL")
    if not url:
        config = _config_raw(options)
        url = config.get("management_address", DEFAULT_URL)
    if "://" not in url:
        url = f"http://{url}"
    parsed = httpx.URL(url)
    if parsed.host in ("0.0.0.0", "::"):  # a wildcard bind: talk to it on loopback
        parsed = parsed.copy_with(host="127.0.0.1")
    return str(parsed).rstrip("/")


def _config_path(options: argparse.Namespace) -> Path | None:
    chosen = os.environ.get("TS_CONFIG_FILE") or options.ts_config
    if chosen:
        return Path(chosen)
    default = Path("config.properties")
    return default if default.is_file() else None


def _config_raw(options: argparse.Namespace) -> dict[str, str]:
    from api.config import read_properties

    path = _config_path(options)
    if path is None:
        return {}
    try:
        return read_properties(path.read_text())
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read {path}: {exc}") from None


def _auth(options: argparse.Namespace) -> dict[str, str]:
    token = options.token or os.environ.get("TORCHGATE_TOKEN")
    if not token:
        token = _key_file_token(options)
    return {"Authorization": f"Bearer {token}"} if token else {}


def _key_file_token(options: argparse.Namespace) -> str | None:
    """TorchServe writes key_file.json in its working directory; torchgate beside its config
    (or where torchgate.key_file says)."""
    path = _config_path(options)
    candidates = [Path("key_file.json")]
    if path is not None:
        key_file = Path(_config_raw(options).get("torchgate.key_file", "key_file.json"))
        candidates.insert(0, key_file if key_file.is_absolute() else path.parent / key_file)
    for candidate in candidates:
        try:
            document = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        key = document.get("management", {}).get("key") if isinstance(document, dict) else None
        if isinstance(key, str):
            return key
    return None


def _send(client: httpx.Client, method: str, path: str, query: dict[str, Any], body: Any) -> Any:
    params = {k: v for k, v in query.items() if v is not None}
    try:
        response = client.request(method, path, params=params, json=body)
    except httpx.HTTPError as exc:
        raise CommandError(f"cannot reach the management API at {client.base_url}: {exc}") from None
    try:
        answer = response.json()
    except ValueError:
        answer = {"message": response.text.strip()}
    if response.is_error:
        raise CommandError(f"{_message(answer)} (HTTP {response.status_code})")
    return answer


def _message(answer: Any) -> str:
    if isinstance(answer, dict):
        if answer.get("message"):
            return str(answer["message"])
        detail = answer.get("detail")
        if isinstance(detail, list):  # FastAPI's validation errors
            return "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', ())[1:])}: {d.get('msg')}"
                for d in detail
                if isinstance(d, dict)
            )
        if detail:
            return str(detail)
    return json.dumps(answer)


def _all_pages(client: httpx.Client, first: dict[str, Any]) -> dict[str, Any]:
    models = list(first.get("models", []))
    token = first.get("nextPageToken")
    while token:
        page = _send(client, "GET", "/models", {"next_page_token": token}, None)
        models += page.get("models", [])
        token = page.get("nextPageToken")
    return {"models": models}


def render(action: str, answer: Any) -> str:
    """A table (list, describe, traffic) or the status line of the answer."""
    if action == "list":
        rows = [[m.get("modelName", ""), m.get("modelUrl", "")] for m in answer["models"]]
        return table(["MODEL", "URL"], rows) if rows else "no models registered"
    if action == "describe":
        return table(
            [
                "MODEL",
                "VERSION",
                "DEFAULT",
                "STATUS",
                "WORKERS",
                "MIN-MAX",
                "BATCH",
                "DELAY MS",
                "QUEUED",
            ],
            [_version_row(v) for v in (answer if isinstance(answer, list) else [answer])],
        )
    if action == "traffic":
        policy = answer.get("policy")
        lines = [f"{answer.get('model_name')}: default version {answer.get('default_version')}"]
        if policy is None:
            lines.append("policy: none (every request goes to the default version)")
        else:
            weights = policy.get("weights", {})
            lines.append(table(["VERSION", "WEIGHT"], [[v, f"{w:g}"] for v, w in weights.items()]))
            lines.append(f"sticky header: {policy.get('sticky_header') or 'none'}")
            shadow = policy.get("shadow")
            if shadow:
                lines.append(f"shadow: {shadow.get('version')} ({shadow.get('percent'):g} %)")
        return "\n".join(lines)
    return (
        str(answer.get("status", json.dumps(answer))) if isinstance(answer, dict) else str(answer)
    )


def _version_row(version: dict[str, Any]) -> list[str]:
    workers = version.get("workers", [])
    ready = sum(1 for w in workers if w.get("status") == "READY")
    queue = version.get("jobQueueStatus", {})
    return [
        str(version.get("modelName", "")),
        str(version.get("modelVersion", "")),
        "yes" if version.get("defaultVersion") else "",
        str(version.get("status", "")),
        f"{ready}/{len(workers)} ready",
        f"{version.get('minWorkers')}-{version.get('maxWorkers')}",
        str(version.get("batchSize", "")),
        f"{version.get('maxBatchDelay', '')}",
        str(queue.get("pendingRequests", "")),
    ]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]
    lines = [header, *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)).rstrip()
        for line in lines
    )
