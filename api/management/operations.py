"""The management operations; see the package docstring."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

from api.core.registry import ModelVersion, Registry
from api.core.types import API_TORCHSERVE_REST, InferenceRequest
from api.encoding import check_response_size, encode_prediction
from api.errors import (
    BadRequest,
    DeadlineExceeded,
    InferenceFailed,
    ModelApiDisabled,
    ModelNotFound,
    ModelNotReady,
    VersionNotFound,
    error_for_status,
)
from api.management.describe import describe
from api.management.params import ListArgs, RegisterArgs, ScaleArgs
from api.model_loader import TORCHSERVE_SCHEMES, ModelLoader
from api.request_ids import request_id

log = logging.getLogger(__name__)

# TorchServe's status text for work it answers before the workers are up (HTTP 202).
PROCESSING = "Processing worker updates..."
# Runtimes TorchServe's register API accepts that torchgate's workers run.
RUNTIMES = ("python", "python3")


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer: TorchServe's HTTP status and JSON body.

    `body` is `{"status": text}` for calls that change something, the document for describe
    and list. gRPC sends `message` (the bare text, or the document as JSON) as TorchServe's
    gRPC API does.
    """

    status: int
    body: dict[str, Any] | list[dict[str, Any]]

    @property
    def message(self) -> str:
        if isinstance(self.body, dict) and set(self.body) == {"status"}:
            return str(self.body["status"])
        return json.dumps(self.body, indent=2)


def _status(text: str, status: int = 200) -> Reply:
    return Reply(status, {"status": text})


class Management:
    """TorchServe's management API over a registry and a loader, for any transport."""

    def __init__(self, registry: Registry, loader: ModelLoader, *, enable_model_api: bool) -> None:
        self.registry = registry
        self.loader = loader
        self.enable_model_api = enable_model_api
        config = loader.config
        # TorchServe's register API starts default_workers_per_model workers when the file sets
        # it, else none (at start-up it uses one per core instead; so does torchgate's default).
        self.default_workers = (
            config.default_workers_per_model if "default_workers_per_model" in config.raw else 0
        )

    def check_model_api(self) -> None:
        """Register and unregister need `enable_model_api=true`, as in TorchServe."""
        if not self.enable_model_api:
            raise ModelApiDisabled(
                "Model API is disabled: set enable_model_api=true in config.properties to "
                "register or unregister models"
            )

    async def register(self, args: RegisterArgs) -> Reply:
        self.check_model_api()
        ignored = _owned_by_torchserve(args)
        if ignored:
            unset: dict[str, Any] = dict.fromkeys(ignored)
            args = dataclasses.replace(args, **unset)
        if args.url is None:
            raise BadRequest("Parameter url is required.")
        if not args.url:
            raise ModelNotFound("empty url")  # TorchServe's 404 for url=
        if args.runtime is not None and args.runtime not in RUNTIMES:
            raise BadRequest(f"Invalid RuntimeType value: {args.runtime}")
        workers = max(
            args.initial_workers if args.initial_workers is not None else self.default_workers, 0
        )
        if workers and args.startup_timeout == 0 and args.synchronous:
            # TorchServe starts the workers, gives up at once and unregisters: same outcome.
            # (Asynchronously it answers 202 and the version keeps failing to start: so here.)
            raise InferenceFailed(
                f"Failed to start workers for model {args.model_name or args.url}: "
                "startup_timeout=0"
            )
        overrides: dict[str, Any] = {"minWorkers": workers, "maxWorkers": workers}
        for key, value in (
            ("batchSize", args.batch_size),
            ("maxBatchDelay", args.max_batch_delay),
            ("responseTimeout", args.response_timeout),
            ("startupTimeout", args.startup_timeout),
        ):
            if value is not None:
                overrides[key] = value
        try:
            settings = self.loader.config.model_settings(overrides)
        except ValueError as exc:
            raise BadRequest(f"Invalid registration parameter: {exc}") from None
        # A synchronous registration answers once the workers (their handlers' initialize())
        # are up; an asynchronous one, as TorchServe, once the archive is loaded, with 202,
        # its workers starting in the background. A handler the archive cannot resolve is
        # refused here (400) either way, before any worker starts.
        version = await self.loader.register(
            args.url,
            settings,
            model_name=args.model_name,
            requested=True,
            handler=args.handler,
            # The parameters weigh against the archive's model-config.yaml (api.model_config).
            origin="api",
            api=overrides,
            wait=args.synchronous,
        )
        if ignored:
            log.warning(
                "register %s: %s ignored for a version TorchServe serves",
                args.url,
                ", ".join(ignored),
            )
        head = f'Model "{version.name}" Version: {version.version} registered with'
        # What started: the parameter's count, or a proxied TorchServe target's concurrency.
        workers = len(version.workers)
        if not workers:
            return _status(
                f"{head} 0 initial workers. Use scale workers API to add workers for the model."
            )
        if not args.synchronous:
            return _status(PROCESSING, 202)
        return _status(f"{head} {workers} initial workers")

    def list_models(self, args: ListArgs) -> Reply:
        """One page, by model name: `{"nextPageToken": "..."}` first when more may follow."""
        names = self.registry.names()
        start = args.next_page_token
        end = start + args.limit
        body: dict[str, Any] = {}
        if end <= len(names):
            body["nextPageToken"] = str(end)
        body["models"] = [
            {"modelName": name, "modelUrl": self.registry.get(name).url}
            for name in names[start:end]
        ]
        return Reply(200, body)

    async def describe(
        self,
        model_name: str,
        version: str | None = None,
        *,
        customized: bool = False,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """The default version (None), one version, or every version ("all").

        `customized` asks the handler too, with the client's request `headers`, except for
        "all", as in TorchServe (which describes every version plainly there)."""
        if version == "all":
            customized = False
            versions = self.registry.versions(model_name)
        else:
            versions = [self.registry.get(model_name, version)]
        default = self.registry.default_version(model_name)
        documents = []
        for model_version in versions:
            extra = None
            if customized:
                extra = {"customizedMetadata": await self._customized(model_version, headers)}
            documents.append(
                describe(
                    model_version,
                    default=model_version.version == default,
                    loaded_at_startup=model_name in self.registry.loaded_at_startup,
                    customized=extra,
                )
            )
        return Reply(200, documents)

    async def _customized(
        self, model_version: ModelVersion, client_headers: dict[str, str] | None
    ) -> dict[str, Any]:
        """What the handler answers to TorchServe's describe request (the client's headers
        and `describe: True`; `BaseHandler` calls `describe_handle()`) when it is a JSON
        object, else `{}`: TorchServe parses the answer as one and falls back to `{}` (for
        `BaseHandler`'s default None, a string, a list)."""
        try:
            ready = self.registry.ready_version(model_version.name, model_version.version)
        except ModelNotReady as exc:  # TorchServe's own sentence for a describe request
            raise ModelNotReady(
                f'Model "{model_version.name}" has no worker to serve describe request. '
                "Please use scale workers API to add workers.",
                retry_after=exc.retry_after,
            ) from None
        headers = {**(client_headers or {}), "describe": "True"}
        request = InferenceRequest({}, headers, request_id(headers), API_TORCHSERVE_REST)
        timeout_s = ready.settings.response_timeout_s
        try:
            # In a batch of its own, as TorchServe sends it: `BaseHandler` reads `describe` on
            # a batch's first row only and answers once for the whole batch.
            answer = ready.batcher.submit(request, alone=True)
            prediction = await asyncio.wait_for(answer, timeout_s)
        except TimeoutError:
            # A worker that times its own batches (a process) may still be at it: the client
            # gets the timeout a prediction gets (504, gRPC DEADLINE_EXCEEDED), not a bare
            # TimeoutError (a plain-text 500, gRPC UNKNOWN).
            raise DeadlineExceeded(
                f"Model {model_version.name} version {model_version.version} did not answer "
                f"the describe request within {timeout_s:g} s"
            ) from None
        if not prediction.ok:
            raise error_for_status(prediction.status, prediction.message)
        # Bounded as any answer a worker sends back (TorchServe bounds this one too).
        where = f"describe {model_version.name} {model_version.version}"
        limit = self.loader.config.max_response_size
        check_response_size(encode_prediction(prediction).body, limit, where)
        body = prediction.body
        if isinstance(body, bytes | bytearray | memoryview):
            body = bytes(body).decode("utf-8", "replace")
        if isinstance(body, str):
            try:
                body = json.loads(body)
            except ValueError:
                return {}
        return body if isinstance(body, dict) else {}

    async def scale(self, model_name: str, version: str | None, args: ScaleArgs) -> Reply:
        low = args.min_worker if args.min_worker is not None else 1
        high = args.max_worker if args.max_worker is not None else low
        if low < 0:
            # TorchServe fails here with its own IndexOutOfBoundsException (500).
            raise BadRequest(f"min_worker must not be negative, got {low}")
        if high < low:
            raise BadRequest("max_worker cannot be less than min_worker.")
        model_version = self.registry.get(model_name, version)
        # Before the batching changes: a range refused (400, above the worker bound) must
        # leave the version, and the snapshot, as they were.
        self.registry.check_scale(model_name, model_version.version, low, high)
        for key, value in (("number_gpu", args.number_gpu), ("timeout", args.timeout)):
            if value is not None:
                log.warning("scale %s: %s=%s is ignored by torchgate", model_name, key, value)
        if args.batch_size is not None or args.max_batch_delay is not None:
            self.registry.update_batching(
                model_name,
                model_version.version,
                batch_size=args.batch_size,
                max_batch_delay_ms=args.max_batch_delay,
            )
        await self.registry.scale(
            model_name, model_version.version, low, high, wait=args.synchronous
        )
        if not args.synchronous:  # answered at once, as TorchServe; clients check for the 202
            return _status(PROCESSING, 202)
        text = f"Workers scaled to {low} for model: {model_name}"
        return _status(text if version is None else f"{text}, version: {version}")

    def set_default(self, model_name: str, version: str) -> Reply:
        try:
            self.registry.set_default(model_name, version)
        except VersionNotFound:  # TorchServe words it without its colons here
            raise VersionNotFound(
                f"Model version {version} does not exist for model {model_name}"
            ) from None
        return _status(
            f'Default version successfully updated for model "{model_name}" to "{version}"'
        )

    async def unregister(self, model_name: str, version: str | None = None) -> Reply:
        """Without a version, the default one (refused, 403, while others exist)."""
        self.check_model_api()
        await self.registry.unregister(model_name, version)
        return _status(f'Model "{model_name}" unregistered')


def _owned_by_torchserve(args: RegisterArgs) -> list[str]:
    """The parameters given that TorchServe sets for a version it serves (a torchserve:// url):
    it batches and runs that version's workers."""
    if args.url is None or not args.url.startswith(TORCHSERVE_SCHEMES):
        return []
    owned = ("initial_workers", "batch_size", "max_batch_delay", "startup_timeout")
    return [name for name in owned if getattr(args, name) is not None]
