"""The TorchServe backend: a model version served by a running TorchServe, proxied over REST.

The gateway keeps routing, A/B, auth, queue bounds and metrics in front; TorchServe batches on
its own side, so this backend says `batches = False` and every `predict` gets one request.

Chosen per model version, in config.properties' `models={...}`::

    "2.0": {"marName": "digits_v2.mar",
            "torchgate.backend": {"kind": "torchserve",
                                  "inference_url": "http://torchserve:8080",
                                  "management_url": "http://torchserve:8081",
                                  "model_name": "digits", "model_version": "2.0"}}

or through the management API, `POST /models?url=torchserve://torchserve:8080/digits/2.0`
(`torchserve+https://` for TLS; query parameters inside the url set the other keys). The keys,
all but `inference_url` optional (`SPEC_KEYS`):

    inference_url      TorchServe's inference API (`/predictions`, `/ping`)
    management_url     its management API, for the health check's describe call; default: the
                       inference port + 1 (TorchServe's layout); null: health from /ping alone
    model_name         the model's name in TorchServe (default: the gateway's name)
    model_version      its version there (default: the gateway's version)
    timeout_s          read timeout of one prediction (default: the version's responseTimeout)
    connect_timeout_s  connect timeout (default 5)
    concurrency        requests the gateway keeps in flight to TorchServe (default 16): the
                       version's torchgate workers, each forwarding one request at a time
    health_interval_s  seconds between health checks (default 2)
    signature          the version's signature.json as a JSON object (v2 metadata); default none
    key_file           TorchServe's key_file.json, for a TorchServe with token authorization on
                       (0.12's default): its `inference` key goes with predictions and /ping,
                       its `management` key with describe. Read again at every health check, so
                       keys TorchServe regenerates (`/token`) are picked up. Default: no key

Health: at start and every `health_interval_s` the backend asks TorchServe for `/ping` and
`GET /models/{model}/{version}`; while TorchServe is unreachable, or has no READY worker for the
model, `unavailable` holds the reason, the registry reports the version not ready (v2 ready,
describe) and refuses its requests with 503 and that reason. Other versions never notice, and
the server's health (`/ping`) only once it has lasted maxRetryTimeoutInSec, as a local worker
that keeps failing to start.
A request that meets a dead TorchServe before the check does gets 502 (`BackendUnavailable`);
one TorchServe does not answer within `timeout_s` gets 504. Recovery needs no restart: the next
check that succeeds makes the version ready again, and the pooled client reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
import orjson

from api.backends import BACKEND_KEY
from api.core.types import (
    API_TORCHSERVE_REST,
    API_V1_REST,
    InferenceRequest,
    ModelSettings,
    Prediction,
    header_value,
)
from api.errors import BackendUnavailable, BadRequest, DeadlineExceeded, Overloaded

log = logging.getLogger(__name__)
# httpx logs an INFO line for every request: each prediction and each health check (two every
# health_interval_s per version) would fill the server's log.
logging.getLogger("httpx").setLevel(logging.WARNING)

KIND = "torchserve"
# TorchServe's key_file.json is a few hundred bytes; it is read on the event loop.
KEY_FILE_MAX_BYTES = 64 * 1024
URL_SCHEMES = {"torchserve": "http", "torchserve+http": "http", "torchserve+https": "https"}
SPEC_KEYS = frozenset(
    {
        "kind",
        "inference_url",
        "management_url",
        "model_name",
        "model_version",
        "timeout_s",
        "connect_timeout_s",
        "concurrency",
        "health_interval_s",
        "signature",
        "key_file",
    }
)

# Client headers that describe the client's connection or carry the gateway's own credentials:
# never forwarded. Content-Type and Content-Length are set for the re-encoded body.
_REQUEST_DROP = frozenset(
    {
        "host",
        "authorization",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "content-length",
        "content-type",
        "accept-encoding",
        "x-request-id",
        # Set by TorchServe's frontend from the path torchgate calls it on.
        "explain",
        "url_path",
    }
)
# TorchServe's per-connection and per-response headers; a handler's own headers pass through.
_RESPONSE_DROP = frozenset(
    {
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "date",
        "server",
        "x-request-id",
        "cache-control",
        "pragma",
        "expires",
    }
)
JSON = "application/json"
# Requests in flight to one TorchServe, from one version (its `concurrency`, and what the scale
# API may set): each is a lane and a pooled connection, so a number from a registration URL
# must not be able to ask for millions.
MAX_CONCURRENCY = 1024


@dataclass(frozen=True, slots=True)
class TorchServeSpec:
    """Where a version's TorchServe is and how to talk to it (see the module docstring)."""

    inference_url: str
    model_name: str | None = None
    model_version: str | None = None
    management_url: str | None = None
    timeout_s: float | None = None
    connect_timeout_s: float = 5.0
    concurrency: int = 16
    health_interval_s: float = 2.0
    signature: Mapping[str, Any] | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("inference_url", "management_url"):
            value = getattr(self, name)
            if value is not None:
                parts = urlsplit(value)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise BadRequest(f"TorchServe backend: {name} must be an http(s) URL: {value}")
                object.__setattr__(self, name, value.rstrip("/"))
        for name in ("timeout_s", "connect_timeout_s", "health_interval_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise BadRequest(f"TorchServe backend: {name} must be a number > 0, got {value!r}")
        if type(self.concurrency) is not int or not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise BadRequest(
                f"TorchServe backend: concurrency must be 1..{MAX_CONCURRENCY}: "
                f"{self.concurrency!r}"
            )
        if self.signature is not None and not isinstance(self.signature, Mapping):
            raise BadRequest("TorchServe backend: signature must be a JSON object")
        if self.key_file is not None and not isinstance(self.key_file, str):
            raise BadRequest("TorchServe backend: key_file must be a path")

    @classmethod
    def from_config(cls, data: Any) -> TorchServeSpec:
        """Read `"torchgate.backend": {...}`; raises BadRequest naming what is wrong."""
        if not isinstance(data, Mapping):
            raise BadRequest(f"{BACKEND_KEY} must be a JSON object, got {data!r}")
        if data.get("kind") != KIND:
            raise BadRequest(f"{BACKEND_KEY}: kind must be 'local' or '{KIND}': {data!r}")
        unknown = sorted(set(data) - SPEC_KEYS)
        if unknown:
            raise BadRequest(f"{BACKEND_KEY}: unknown key(s) {', '.join(unknown)}")
        if not isinstance(data.get("inference_url"), str):
            raise BadRequest(f"{BACKEND_KEY}: inference_url is required (http://host:port)")
        values = {k: v for k, v in data.items() if k != "kind"}
        for key in ("model_name", "model_version"):
            if values.get(key) is not None:
                values[key] = str(values[key])
        if "management_url" not in values:
            values["management_url"] = _next_port(values["inference_url"])
        for key in ("timeout_s", "connect_timeout_s", "health_interval_s"):
            if isinstance(values.get(key), str):
                values[key] = _number(values[key], key)
        if isinstance(values.get("concurrency"), str):
            values["concurrency"] = int(_number(values["concurrency"], "concurrency"))
        return cls(**values)

    @classmethod
    def from_url(cls, url: str) -> TorchServeSpec:
        """`torchserve://HOST:PORT/MODEL[/VERSION][?management_url=...&timeout_s=...]`."""
        parts = urlsplit(url)
        path = [p for p in parts.path.split("/") if p]
        if parts.scheme not in URL_SCHEMES or not parts.hostname or not 1 <= len(path) <= 2:
            raise BadRequest(
                f"TorchServe url must be torchserve://HOST:PORT/MODEL[/VERSION], got {url!r}"
            )
        data: dict[str, Any] = dict(parse_qsl(parts.query, keep_blank_values=True))
        if data.get("management_url") in ("", "none", "null"):
            data["management_url"] = None
        data.update(
            kind=KIND,
            inference_url=f"{URL_SCHEMES[parts.scheme]}://{parts.netloc}",
            model_name=path[0],
            model_version=path[1] if len(path) == 2 else None,
        )
        return cls.from_config(data)

    @property
    def url(self) -> str:
        """The version's model url, as describe and the snapshot show it."""
        parts = urlsplit(self.inference_url)
        scheme = "torchserve" if parts.scheme == "http" else "torchserve+https"
        version = f"/{quote(self.model_version, safe='')}" if self.model_version else ""
        return f"{scheme}://{parts.netloc}/{quote(self.model_name or '', safe='')}{version}"

    def to_json(self) -> dict[str, Any]:
        data = {"kind": KIND, **dataclasses.asdict(self)}
        if self.signature is not None:
            data["signature"] = dict(self.signature)
        return {k: v for k, v in data.items() if v is not None or k == "management_url"}


def spec_for(url: str, extra: Mapping[str, Any] | None) -> TorchServeSpec:
    """The spec a registration names: `extra[BACKEND_KEY]` wins over a torchserve:// url."""
    backend = (extra or {}).get(BACKEND_KEY)
    return TorchServeSpec.from_config(backend) if backend else TorchServeSpec.from_url(url)


async def open_backend(
    spec: TorchServeSpec,
    settings: ModelSettings,
    *,
    name: str | None = None,
    version: str | None = None,
) -> TorchServeBackend:
    """Build the backend for gateway model `name`/`version` and run its first health check.

    TorchServe being down is not an error here (the version registers, not ready, and becomes
    ready when TorchServe answers), except when the TorchServe version must be asked for.
    """
    name = name or spec.model_name
    if not name:
        raise BadRequest("TorchServe backend: no model name")
    spec = dataclasses.replace(spec, model_name=spec.model_name or name)
    if spec.model_version is None and version is not None:
        spec = dataclasses.replace(spec, model_version=version)
    backend = TorchServeBackend(spec, settings, name=name, version=version)
    try:
        if spec.model_version is None:
            await backend.resolve_default_version()
        await backend.check()
    except BaseException:
        await backend.close()
        raise
    backend.watch()
    return backend


class TorchServeBackend:
    """`api.core.types.Backend` for one model version hosted by TorchServe."""

    batches = False
    worker_processes = False  # its workers are in-flight slots: not bounded like processes
    max_workers = MAX_CONCURRENCY  # but bounded (the registry's scale checks)

    def __init__(
        self,
        spec: TorchServeSpec,
        settings: ModelSettings,
        *,
        name: str,
        version: str | None = None,
    ) -> None:
        self.spec = spec
        self.name = name
        # The gateway's version; "" until `resolve_default_version` learns TorchServe's.
        self.version = version or spec.model_version or ""
        self.signature: Mapping[str, Any] | None = spec.signature
        self.timeout_s = spec.timeout_s or settings.response_timeout_s
        # The gateway's workers for this version are its in-flight slots (see module docstring).
        self.settings = dataclasses.replace(
            settings, min_workers=spec.concurrency, max_workers=spec.concurrency
        )
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout_s, connect=spec.connect_timeout_s),
            # The version's lanes bound the predictions in flight, and the scale API changes
            # their number at run time: the pool must not bound them lower (the requests
            # past it waited for a connection, then failed), and a health check never waits
            # behind busy predictions.
            limits=httpx.Limits(
                max_connections=MAX_CONCURRENCY + 2, max_keepalive_connections=MAX_CONCURRENCY
            ),
            trust_env=False,  # a service-to-service call: no proxies from the environment
            # A stream is relayed as read (`_relay`), not decoded: nothing on the way may
            # compress it.
            headers={"accept-encoding": "identity"},
        )
        # None while TorchServe serves the model; otherwise why not (the 503's message).
        self.unavailable: str | None = f"{self._what} has not been checked yet"
        self.unavailable_since: float | None = time.monotonic()  # None while it serves
        # Shown by describe as "backend"; BACKEND_KEY is what a snapshot needs to restore it.
        self.info: dict[str, Any] = {"kind": KIND, "url": spec.url, "status": "UNKNOWN"}
        self.manifest: Mapping[str, Any] = _manifest(spec)
        self._watcher: asyncio.Task[None] | None = None
        # TorchServe's keys by kind ("inference", "management"), from `spec.key_file`.
        self._keys: dict[str, str] = {}
        self._read_keys()

    def _read_keys(self) -> str | None:
        """Load TorchServe's keys from `spec.key_file`; why they could not be read, or None."""
        if self.spec.key_file is None:
            return None
        try:
            with open(self.spec.key_file, "rb") as file:
                raw = file.read(KEY_FILE_MAX_BYTES + 1)
            if len(raw) > KEY_FILE_MAX_BYTES:
                raise ValueError(f"larger than {KEY_FILE_MAX_BYTES} bytes")
            document = orjson.loads(raw)
            self._keys = {kind: str(document[kind]["key"]) for kind in ("inference", "management")}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"cannot read TorchServe's keys from {self.spec.key_file} ({exc})"
        return None

    def _auth(self, kind: str) -> dict[str, str]:
        key = self._keys.get(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}

    @property
    def _what(self) -> str:
        return f"TorchServe at {self.spec.inference_url} (model {self._target})"

    @property
    def _target(self) -> str:
        return f"{self.spec.model_name}/{self.spec.model_version}"

    @property
    def _path(self) -> str:
        """`MODEL/VERSION` in TorchServe's URLs."""
        spec = self.spec
        return f"{quote(spec.model_name or '', safe='')}/{quote(spec.model_version or '', safe='')}"

    # -- Backend protocol -----------------------------------------------------------------------

    async def start_worker(self, index: int) -> TorchServeWorker:
        return TorchServeWorker(self)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        await self.client.aclose()

    # -- predictions ----------------------------------------------------------------------------

    async def forward(self, request: InferenceRequest) -> Prediction:
        """Send one request to TorchServe; its answer, whatever the status, is the prediction.

        `/explanations` when the request asks to explain (the REST transport's `explain: True`
        header). A streamed answer (`ts_stream_next: true`, chunked) is relayed to the
        request's `stream` piece by piece as it arrives, the last piece being the final answer;
        a stream cut short raises BackendUnavailable after the pieces already relayed.

        Raises BackendUnavailable (cannot connect, connection lost), DeadlineExceeded (no answer
        within `timeout_s`) or Overloaded (no free connection in time).
        """
        outgoing = encode_request(request)
        # REST's /explanations and KServe v1's :explain both set TorchServe's header.
        explain = request.api in (API_TORCHSERVE_REST, API_V1_REST) and (
            header_value(request.headers, "explain") == "True"
        )
        endpoint = "explanations" if explain else "predictions"
        path = f"{endpoint}/{self._path}"
        # `/predictions/{m}/{v}/{more}`: TorchServe hands `more` to the handler as url_path.
        url_path = header_value(request.headers, "url_path")
        if request.api == API_TORCHSERVE_REST and url_path:
            path += "/" + _below_the_version(url_path)
        with self._translated(f"Model {self.name} version {self.version}"):
            async with self.client.stream(
                "POST",
                f"{self.spec.inference_url}/{path}",
                params=tuple(outgoing.params),
                # Client header values were read as Latin-1 (ASGI's bytes): sent back as those
                # bytes. httpx takes text as ASCII, and a byte past it failed the request 500.
                headers=httpx.Headers(
                    {**outgoing.headers, **self._auth("inference")}, encoding="latin-1"
                ),
                content=outgoing.content,
                files=outgoing.files,
            ) as response:
                if request.stream is not None and response.headers.get(STREAM_NEXT) == "true":
                    return await _relay(response, request.stream)
                await response.aread()
        return decode_response(response, v2=request.kserve_v2)

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """httpx's errors as torchgate's, once (api.errors' rule), with the cause kept."""
        try:
            yield
        except httpx.ConnectTimeout as exc:
            raise BackendUnavailable(f"{what}: {self._what} did not accept a connection") from exc
        except httpx.PoolTimeout as exc:
            raise Overloaded(
                f"{what}: every connection to {self._what} is busy",
                retry_after=1,
            ) from exc
        except httpx.TimeoutException as exc:
            raise DeadlineExceeded(
                f"{what}: {self._what} did not answer within {self.timeout_s:g} s"
            ) from exc
        except httpx.HTTPError as exc:  # refused, reset, closed mid-answer, protocol errors
            raise BackendUnavailable(
                f"{what}: {self._what} is unreachable ({type(exc).__name__}: {exc})"
            ) from exc

    # -- health ---------------------------------------------------------------------------------

    def watch(self) -> None:
        """Start the periodic health check (until `close`)."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(
                self._watch(), name=f"torchserve health {self.name}/{self.version}"
            )

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.spec.health_interval_s)
            await self.check()

    async def check(self) -> None:
        """One health check: sets `unavailable` and `info`; never raises (but cancellation)."""
        try:
            problem, workers = await self._probe()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a malformed answer must not stop the health loop
            problem, workers = f"{self._what}: health check failed: {exc!r}", None
        if problem != self.unavailable:
            if problem is None:
                log.info("%s/%s: %s is serving again", self.name, self.version, self._what)
            else:
                log.warning("%s/%s: %s", self.name, self.version, problem)
        if problem is None:
            self.unavailable_since = None
        elif self.unavailable_since is None:
            self.unavailable_since = time.monotonic()
        self.unavailable = problem
        self.info.update(
            status="UNAVAILABLE" if problem else "READY",
            message=problem or "",
            checked_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        if workers is not None:
            self.info["torchserve_workers"] = workers

    async def _probe(self) -> tuple[str | None, dict[str, int] | None]:
        """(why the model cannot be served or None, TorchServe's worker counts if known)."""
        timeout = min(self.spec.connect_timeout_s + 1.0, self.timeout_s)
        prefix = f"Model {self.name} version {self.version} is unavailable"
        unreadable = self._read_keys()
        if unreadable is not None:
            return f"{prefix}: {unreadable}", None
        try:
            ping = await self.client.get(
                f"{self.spec.inference_url}/ping", timeout=timeout, headers=self._auth("inference")
            )
            if self.spec.management_url is None:
                if ping.status_code != 200:
                    return f"{prefix}: {self._what} answers /ping with {ping.status_code}", None
                return None, None
            described = await self.client.get(
                f"{self.spec.management_url}/models/{self._path}",
                timeout=timeout,
                headers=self._auth("management"),
            )
        except httpx.HTTPError as exc:
            return f"{prefix}: {self._what} is unreachable ({type(exc).__name__}: {exc})", None
        if _refused_key(ping) or _refused_key(described):
            return (
                f"{prefix}: {self._what} refused the key (token authorization is on there: "
                "give the backend its key_file)",
                None,
            )
        if described.status_code != 200:
            return (
                f"{prefix}: {self._what} does not serve it "
                f"(describe answered {described.status_code})",
                None,
            )
        entries = orjson.loads(described.content)
        workers = entries[0].get("workers", []) if entries else []
        ready = sum(1 for worker in workers if worker.get("status") == "READY")
        counts = {"ready": ready, "total": len(workers)}
        if ready == 0:
            return f"{prefix}: {self._what} has no READY worker for it", counts
        return None, counts

    async def resolve_default_version(self) -> None:
        """Pin the TorchServe default version of the model (a url that names no version)."""
        if self.spec.management_url is None:
            raise BadRequest("TorchServe backend: name a model_version, or give a management_url")
        with self._translated(f"Registering model {self.name}"):
            described = await self.client.get(
                f"{self.spec.management_url}/models/{quote(self.spec.model_name or '', safe='')}",
                headers=self._auth("management"),
            )
        if described.status_code != 200:
            raise BadRequest(
                f"TorchServe at {self.spec.management_url} has no model {self.spec.model_name} "
                f"(describe answered {described.status_code})"
            )
        version = str(orjson.loads(described.content)[0]["modelVersion"])
        self.spec = dataclasses.replace(self.spec, model_version=version)
        self.version = self.version or version
        self.manifest = _manifest(self.spec)
        self.info["url"] = self.spec.url


def _refused_key(response: httpx.Response) -> bool:
    """TorchServe 0.12's answer to a missing or wrong key: 400 InvalidKeyException."""
    return response.status_code == 400 and b"InvalidKeyException" in response.content


class TorchServeWorker:
    """Forwards the batcher's batches (always of one: the backend does not batch)."""

    device = KIND
    keeps_time = True  # httpx's read timeout (`timeout_s`) answers 504 for a slow TorchServe

    def __init__(self, backend: TorchServeBackend) -> None:
        self.backend = backend

    async def predict(self, batch: Sequence[InferenceRequest]) -> list[Prediction]:
        return [await self.backend.forward(request) for request in batch]

    async def close(self) -> None:
        pass  # the connection pool belongs to the backend


# -- the wire -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Outgoing:
    """What httpx sends: either `content` (a raw body) or `files` (multipart form parts)."""

    params: list[tuple[str, str]]
    headers: dict[str, str]
    content: bytes | None = None
    files: list[tuple[str, tuple[str | None, bytes, str | None]]] | None = None


def encode_request(request: InferenceRequest) -> Outgoing:
    """One torchgate request item as the HTTP request TorchServe's frontend would have received.

    A TorchServe REST item holds its inputs as the client sent them (`api.rest.predictions`):
    the body goes back as those bytes with the client's Content-Type, form inputs as multipart
    parts with their own content types. Other APIs' items may hold decoded values: str goes as
    UTF-8, anything else as JSON. A REST item's inputs besides the body (its query parameters)
    go as query parameters; another API's (gRPC's `input` map) go with the body as multipart
    parts, since TorchServe's `/predictions` drops query parameters and its gRPC API hands every
    input to the handler. Client headers are forwarded (handlers read them) except the
    connection's own and `Authorization`, which holds the gateway's key, not TorchServe's.
    """
    headers: dict[str, str] = {}
    client_type = None
    # Only a TorchServe REST request's headers describe this body: gRPC metadata and a v2
    # request's headers (binary tensors) describe another wire form.
    if request.api == API_TORCHSERVE_REST and not request.kserve_v2:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _REQUEST_DROP}
        client_type = header_value(request.headers, "content-type")
    if request.request_id:
        headers["X-Request-Id"] = request.request_id
    several = len(request.inputs) > 1 and request.api != API_TORCHSERVE_REST
    if (
        "body" not in request.inputs
        or several
        or (client_type or "").lower().startswith("multipart/form-data")
    ):
        files = [
            _form_part(name, value, request.input_types.get(name))
            for name, value in request.inputs.items()
        ]
        return Outgoing([], headers, files=files)
    content, content_type = _encode_body(request.inputs["body"], client_type)
    if content_type is not None:
        headers["Content-Type"] = content_type
    params = [(k, _text(v)) for k, v in request.inputs.items() if k != "body"]
    return Outgoing(params, headers, content=content)


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return value if isinstance(value, str) else _json(value).decode()


def _encode_body(body: Any, client_type: str | None) -> tuple[bytes, str | None]:
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), client_type  # no Content-Type when the client sent none
    if isinstance(body, str):
        return body.encode("utf-8"), client_type or "text/plain; charset=utf-8"
    return _json(body), client_type if _is_json(client_type) else JSON


def _form_part(
    name: str, value: Any, content_type: str | None
) -> tuple[str, tuple[str | None, bytes, str | None]]:
    """A multipart part: a plain field for text and for bytes without a content type, a file
    for bytes with one, anything else as a JSON file."""
    if isinstance(value, str):
        return name, (None, value.encode("utf-8"), None)
    if isinstance(value, bytes | bytearray | memoryview):
        if not content_type:
            return name, (None, bytes(value), None)
        return name, (name, bytes(value), content_type)
    return name, (name, _json(value), JSON)


def _json(value: Any) -> bytes:
    # v2 tensors arrive as numpy arrays; TorchServe's handlers read them back as nested lists.
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY, default=_tolist)


def _tolist(value: Any) -> Any:
    if hasattr(value, "tolist"):  # a non-contiguous numpy array or a numpy scalar
        return value.tolist()
    raise TypeError(f"cannot send {type(value).__name__} to TorchServe as JSON")


def decode_response(response: httpx.Response, *, v2: bool) -> Prediction:
    """TorchServe's answer as the item's prediction: status, body, content type passed through.

    For a KServe v2 request a JSON body is parsed, so the v2 encoder finds its "outputs"
    (TorchServe sends a handler's dict as JSON without a Content-Type).
    """
    content_type = response.headers.get("content-type")
    body: Any = response.content
    if v2 and (content_type is None or _is_json(content_type)):
        with contextlib.suppress(orjson.JSONDecodeError):  # not JSON after all: sent as bytes
            body = orjson.loads(body)
    headers = _passed_headers(response)
    message = "" if response.is_success else _error_message(response)
    return Prediction(body, status=response.status_code, message=message, headers=headers)


STREAM_NEXT = "ts_stream_next"  # TorchServe's header on a streamed answer


async def _relay(response: httpx.Response, stream: Callable[[Prediction], None]) -> Prediction:
    """Each piece of a streamed answer to `stream`, as it arrives; the last one is returned.

    A piece is what one read of the chunked body gave: one chunk of TorchServe's (one
    intermediate response) unless the network split it.
    """
    headers = _passed_headers(response)
    pending: bytes | None = None
    try:
        async for piece in response.aiter_raw():
            if pending is not None:
                stream(Prediction(pending, status=response.status_code, headers=headers))
            pending = piece
    except Exception:  # not a cancellation: the request is being given up then
        if pending is not None:  # it came before the stream broke: the client gets it too
            stream(Prediction(pending, status=response.status_code, headers=headers))
        raise
    return Prediction(
        pending or b"", status=response.status_code, headers={**headers, STREAM_NEXT: "false"}
    )


def _passed_headers(response: httpx.Response) -> dict[str, str]:
    """TorchServe's response headers that go on to the client (not hop-by-hop or framing).
    Nor its CORS headers: the gateway's policy (`cors_allowed_*`) is the one that applies,
    and it only adds what an answer does not already have."""
    return {
        k: v
        for k, v in response.headers.multi_items()
        if k.lower() not in _RESPONSE_DROP and not k.lower().startswith("access-control-")
    }


def _error_message(response: httpx.Response) -> str:
    try:
        message = orjson.loads(response.content).get("message")
    except (orjson.JSONDecodeError, AttributeError):
        message = None
    return str(message or response.text[:500] or f"TorchServe answered {response.status_code}")


def _is_json(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() == JSON


def _manifest(spec: TorchServeSpec) -> dict[str, Any]:
    return {
        "runtime": KIND,
        "model": {"modelName": spec.model_name, "modelVersion": spec.model_version},
    }


def _next_port(inference_url: Any) -> str | None:
    """TorchServe's default layout: management on the inference port + 1."""
    if not isinstance(inference_url, str):
        return None
    parts = urlsplit(inference_url)
    if parts.port is None or not parts.hostname:
        return None
    return f"{parts.scheme}://{parts.netloc.rsplit(':', 1)[0]}:{parts.port + 1}"


def _number(text: str, key: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise BadRequest(f"TorchServe backend: {key} must be a number, got {text!r}") from None


def _below_the_version(url_path: str) -> str:
    """`url_path` as a path below the version's, each segment quoted. Dot segments are
    refused: resolved on the way to TorchServe (`a/1.0/../../b/1.0`), they would reach another
    model there with the gateway's key, past its routing and queues."""
    segments = url_path.split("/")
    if any(segment in (".", "..") for segment in segments):
        raise BadRequest(f"Invalid path below the model version: {url_path!r}")
    return "/".join(quote(segment, safe="") for segment in segments)
