"""TorchServe workflows: a DAG of models and functions, registered and run over the dataplane.

A workflow archive (`.war`, from torch-workflow-archiver) holds a spec and a handler file. The
spec's `models:` names models (a `.mar` in the model store, `url:`) with settings, globally or per
node; its `dag:` maps each node to the nodes that take its output. A node that `models:` does not
name is a function of the handler file. As in TorchServe, every node is served as a model named
`{workflow}__{node}`: a function node by a worker whose handler is `handler.py:{node}`.

Running a request (TorchServe's `DagExecutor`):

- the DAG's single start node gets the client's request item (its parameters and headers);
- a node with one parent gets the parent's response bytes as its `body`; a node with several
  parents (an aggregate) gets one input per parent, named after the parent, once all of them
  answered; nodes whose inputs are ready run concurrently;
- each call has `timeout-ms` and is tried `1 + retry-attempts` times; a node that still fails
  fails the request with 500 "Error executing NODE";
- one leaf: its response bytes are the answer; several: a JSON object `{leaf: its JSON object}`.

Reading the archive and registering node models is the host's job (`WorkflowHost`, implemented
by `api.workflow_loader`); this module owns the spec's meaning, the registry of workflows and the
DAG runner, and imports no transport.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from api.core.dataplane import DataPlane
from api.core.names import check_model_name
from api.core.types import InferenceRequest, Prediction
from api.errors import (
    BadRequest,
    Conflict,
    InferenceFailed,
    InvalidDag,
    InvalidWorkflow,
    NotFound,
    TorchgateError,
    WorkflowFailed,
    WorkflowNotFound,
)

log = logging.getLogger(__name__)

# Spec keys (`models:` level and per model) and the ModelSettings-like field each sets.
SETTING_KEYS = {
    "min-workers": "min_workers",
    "max-workers": "max_workers",
    "batch-size": "batch_size",
    "max-batch-delay": "max_batch_delay_ms",
    "retry-attempts": "retry_attempts",
    "timeout-ms": "timeout_ms",
}


# In the backend_info of a model that serves a workflow's node: the workflow's name. Such
# models are the workflow's (unregistered with it), and snapshots leave them out.
WORKFLOW_KEY = "workflow"


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """TorchServe's defaults for a workflow's models (`WorkFlow.java`)."""

    min_workers: int = 1
    max_workers: int = 1
    batch_size: int = 1
    max_batch_delay_ms: int = 50
    retry_attempts: int = 1
    timeout_ms: int = 10000


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    model: str  # the model serving it: `{workflow}__{name}`
    url: str | None  # a model archive; None for a function of the workflow's handler
    settings: NodeSettings


@dataclass(frozen=True)
class WorkflowSpec:
    name: str
    url: str
    settings: NodeSettings  # the `models:` level values (describe shows them)
    nodes: dict[str, Node]
    parents: dict[str, list[str]]
    children: dict[str, list[str]]
    start: str
    dag_text: str  # describe's `workflowDag`, written as TorchServe's Java map prints it
    # Whatever the host needs to serve function nodes and to clean up (the extracted files).
    source: Any = None


def parse_spec(name: str, url: str, spec: Any, *, source: Any = None) -> WorkflowSpec:
    """The workflow a spec document (the YAML, loaded) describes; InvalidWorkflow / InvalidDag."""
    if not isinstance(spec, Mapping):
        raise InvalidWorkflow(f"Workflow {name}: the spec file is not a YAML mapping")
    models = spec.get("models") or {}
    dag = spec.get("dag")
    if not isinstance(models, Mapping):
        raise InvalidWorkflow(f"Workflow {name}: 'models' must be a mapping")
    if not isinstance(dag, Mapping) or not dag:
        raise InvalidWorkflow(f"Workflow {name}: the spec has no 'dag'")
    global_values = {k: v for k, v in models.items() if k in SETTING_KEYS}
    settings = _settings(name, "models", global_values, NodeSettings())
    model_specs: dict[str, tuple[str, NodeSettings]] = {}
    for key, value in models.items():
        if key in SETTING_KEYS:
            continue
        if not isinstance(value, Mapping):
            raise InvalidWorkflow(
                f"Workflow {name}: models.{key} must be a mapping with a url, or one of "
                f"{sorted(SETTING_KEYS)}"
            )
        url_value = value.get("url")
        if not isinstance(url_value, str) or not url_value:
            raise InvalidWorkflow(f"Workflow {name}: models.{key} has no url")
        unknown = sorted(set(value) - set(SETTING_KEYS) - {"url"})
        if unknown:
            log.warning("workflow %s: models.%s: keys %s are not used", name, key, unknown)
        node_values = {k: v for k, v in value.items() if k in SETTING_KEYS}
        model_specs[str(key)] = (url_value, _settings(name, f"models.{key}", node_values, settings))
    order: list[str] = []
    parents: dict[str, list[str]] = {}
    children: dict[str, list[str]] = {}

    def add(node: str) -> None:
        if node not in children:
            order.append(node)
            children[node] = []
            parents[node] = []

    for source_node, targets in dag.items():
        source_node = str(source_node)
        add(source_node)
        if targets is not None and not isinstance(targets, list):
            raise InvalidWorkflow(f"Workflow {name}: dag.{source_node} must be a list of nodes")
        for target in targets or []:
            if target is None or not str(target).strip():
                continue
            target = str(target)
            add(target)
            if target == source_node:
                raise InvalidDag("Self loop exception")
            if source_node in children[target]:
                raise InvalidDag("loop exception")
            if target not in children[source_node]:
                children[source_node].append(target)
                parents[target].append(source_node)
    starts = [node for node in order if not parents[node]]
    if len(starts) != 1:
        raise InvalidDag("DAG should have only one start node")
    if len(_topological(starts[0], parents, children)) != len(order):
        raise InvalidDag("Not a valid DAG")
    unused = sorted(set(model_specs) - set(order))
    if unused:
        log.warning("workflow %s: models %s are not in the dag and are not loaded", name, unused)
    nodes: dict[str, Node] = {}
    for node in order:
        model = f"{name}__{node}"
        # A node names a model and a folder (a function node's): `..` or a `/` in it would
        # put that folder outside the workflow's.
        try:
            check_model_name(node)
            check_model_name(model)
        except BadRequest as exc:
            raise InvalidWorkflow(f"Workflow {name}: node {node!r}: {exc.message}") from None
        if node in model_specs:
            node_url, node_settings = model_specs[node]
            nodes[node] = Node(node, model, node_url, node_settings)
        else:  # a function: one worker, no batching (TorchServe's values)
            nodes[node] = Node(
                node,
                model,
                None,
                NodeSettings(1, 1, 1, 0, settings.retry_attempts, settings.timeout_ms),
            )
    return WorkflowSpec(
        name=name,
        url=url,
        settings=settings,
        nodes=nodes,
        parents=parents,
        children=children,
        start=starts[0],
        dag_text=_java_map(dag),
        source=source,
    )


def _settings(
    workflow: str, where: str, values: Mapping[str, Any], base: NodeSettings
) -> NodeSettings:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidWorkflow(
                f"Workflow {workflow}: {where}.{key} must be a whole number >= 0, not {value!r}"
            )
    return replace(base, **{SETTING_KEYS[key]: value for key, value in values.items()})


def _topological(
    start: str, parents: Mapping[str, list[str]], children: Mapping[str, list[str]]
) -> list[str]:
    waiting = {node: len(parents[node]) for node in parents}
    ready, done = [start], []
    while ready:
        node = ready.pop()
        done.append(node)
        for child in children[node]:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    return done


def _java_map(dag: Mapping[Any, Any]) -> str:
    """`{pre=[m1], m1=[post]}`: how TorchServe's describe prints the spec's dag."""
    entries = []
    for key, value in dag.items():
        shown = "null" if value is None else "[" + ", ".join(str(v) for v in value) + "]"
        entries.append(f"{key}={shown}")
    return "{" + ", ".join(entries) + "}"


class WorkflowHost(Protocol):
    """Reads workflow archives and serves their nodes as models (`api.workflow_loader`)."""

    async def open(self, url: str, name: str | None) -> WorkflowSpec:
        """The workflow at `url` in the workflow store, renamed to `name` if given.

        Raises WorkflowNotFound, InvalidWorkflow or InvalidDag (nothing stays on disk then).
        """
        ...

    async def add_node(self, spec: WorkflowSpec, node: Node, options: RegisterOptions) -> None:
        """Register the model `node.model` that serves `node`, with its workers started."""
        ...

    async def remove_node(self, model: str) -> None:
        """Unregister the model `model` (NotFound if it is not registered)."""
        ...

    def discard(self, spec: WorkflowSpec) -> None:
        """Remove what `open` extracted."""
        ...


@dataclass(frozen=True, slots=True)
class RegisterOptions:
    """The register request's parameters that apply to every node model."""

    response_timeout_s: float | None = None
    startup_timeout_s: float | None = None


# A node's answer as the next node (or the client) receives it: TorchServe's response bytes.
Encode = Callable[[Prediction], bytes]


@dataclass(eq=False)
class Workflows:
    """The registered workflows, their management operations and `predict`."""

    dataplane: DataPlane
    host: WorkflowHost
    encode: Encode
    _workflows: dict[str, WorkflowSpec] = field(default_factory=dict, init=False)
    # Names being registered now: a second registration of one is a conflict at once.
    _registering: set[str] = field(default_factory=set, init=False)

    # -- management -----------------------------------------------------------------------------

    async def register(
        self, url: str | None, name: str | None = None, options: RegisterOptions | None = None
    ) -> str:
        """Register the workflow and every node model; the status text. On a node's failure,
        the nodes that did register are removed again and nothing of the workflow stays."""
        if url is None:
            raise BadRequest("Parameter url is required.")
        spec = await self.host.open(url, name or None)
        if spec.name in self._workflows or spec.name in self._registering:
            self.host.discard(spec)
            raise Conflict(f"Workflow {spec.name} is already registered.")
        self._registering.add(spec.name)
        try:
            nodes = list(spec.nodes.values())
            results = await asyncio.gather(
                *(self.host.add_node(spec, node, options or RegisterOptions()) for node in nodes),
                return_exceptions=True,
            )
            failures = [
                f"Workflow Node {node.model} failed to register. Details: {_message(result)}"
                for node, result in zip(nodes, results, strict=True)
                if isinstance(result, BaseException)
            ]
            if failures:
                added = [
                    node.model
                    for node, result in zip(nodes, results, strict=True)
                    if not isinstance(result, BaseException)
                ]
                failures += await self._remove_nodes(added)
                self.host.discard(spec)
                raise WorkflowFailed(
                    f"Workflow {spec.name} has failed to register. Failures: "
                    f"[{', '.join(failures)}]"
                )
            self._workflows[spec.name] = spec
        finally:
            self._registering.discard(spec.name)
        return f"Workflow {spec.name} has been registered and scaled successfully."

    async def unregister(self, name: str) -> str:
        spec = self.get(name)
        del self._workflows[name]
        failures = await self._remove_nodes([node.model for node in spec.nodes.values()])
        self.host.discard(spec)
        if failures:
            raise InferenceFailed(
                f"Error while unregistering the workflow {name}. Details: [{', '.join(failures)}]"
            )
        return f'Workflow "{name}" unregistered'

    async def _remove_nodes(self, models: list[str]) -> list[str]:
        results = await asyncio.gather(
            *(self.host.remove_node(model) for model in models), return_exceptions=True
        )
        return [
            f"Error while unregistering workflow node {model}: {_message(result)}"
            for model, result in zip(models, results, strict=True)
            if isinstance(result, BaseException)
        ]

    async def close(self) -> None:
        """Forget every workflow and remove their files (the registry closes the models)."""
        for spec in self._workflows.values():
            self.host.discard(spec)
        self._workflows.clear()

    def get(self, name: str) -> WorkflowSpec:
        spec = self._workflows.get(name)
        if spec is None:
            raise WorkflowNotFound(f"Workflow not found: {name}")
        return spec

    def names(self) -> list[str]:
        return sorted(self._workflows)

    def list_page(self, limit: int, next_page_token: int) -> dict[str, Any]:
        """ListWorkflows as TorchServe pages it (limit outside 0..100 means 100, and the token
        is given whenever the page reaches the end of its range, even the last one)."""
        if limit > 100 or limit < 0:
            limit = 100
        next_page_token = max(next_page_token, 0)
        names = self.names()
        last = next_page_token + limit
        body: dict[str, Any] = {}
        if last > len(names):
            last = len(names)
        else:
            body["nextPageToken"] = str(last)
        body["workflows"] = [
            {"workflowName": n, "workflowUrl": self._workflows[n].url}
            for n in names[next_page_token:last]
        ]
        return body

    def describe(self, name: str) -> list[dict[str, Any]]:
        spec = self.get(name)
        return [
            {
                "workflowName": spec.name,
                "workflowUrl": spec.url,
                "minWorkers": spec.settings.min_workers,
                "maxWorkers": spec.settings.max_workers,
                "batchSize": spec.settings.batch_size,
                "maxBatchDelay": spec.settings.max_batch_delay_ms,
                "workflowDag": spec.dag_text,
            }
        ]

    # -- inference ------------------------------------------------------------------------------

    async def predict(self, name: str, request: InferenceRequest) -> bytes:
        """Run the workflow on one request; the answer's body (JSON, as TorchServe sends it)."""
        spec = self.get(name)
        leaves = await run_dag(spec, request, self._call)
        if len(leaves) == 1:
            return leaves[0][1]
        combined: dict[str, Any] = {}
        for leaf, output in leaves:
            try:
                value = json.loads(output)
            except ValueError:
                value = None
            if not isinstance(value, dict):
                raise InferenceFailed(
                    f"Workflow {name}: leaf node {leaf} did not answer with a JSON object, "
                    f"so the leaves' answers cannot be combined"
                )
            combined[leaf] = value
        return json.dumps(combined).encode()

    async def _call(self, node: Node, request: InferenceRequest) -> bytes:
        """One node, with its timeout and retries; InferenceFailed once every attempt failed."""
        attempts = 1 + node.settings.retry_attempts
        for attempt in range(attempts):
            try:
                answer = await asyncio.wait_for(
                    self.dataplane.infer(node.model, None, request),
                    node.settings.timeout_ms / 1000,
                )
                prediction = answer.prediction
                if prediction.ok:
                    return self.encode(prediction)
                problem = f"status {prediction.status}: {prediction.message or prediction.body}"
            except NotFound as exc:
                # The node's model was unregistered behind the workflow's back: TorchServe
                # answers with the model's name and does not retry.
                raise InferenceFailed(node.model) from exc
            except TimeoutError:
                problem = f"no answer within timeout-ms {node.settings.timeout_ms}"
            except TorchgateError as exc:
                problem = exc.message
            log.warning(
                "workflow node %s (model %s) attempt %d of %d failed: %s",
                node.name,
                node.model,
                attempt + 1,
                attempts,
                problem,
            )
        raise InferenceFailed(f"Error executing {node.name}")


# Runs one node on its request; its response bytes (`Workflows._call`, or a test's fake).
NodeCall = Callable[[Node, InferenceRequest], Awaitable[bytes]]


async def run_dag(
    spec: WorkflowSpec, request: InferenceRequest, call: NodeCall
) -> list[tuple[str, bytes]]:
    """Run every node once, in dependency order; the leaves' (name, output) in finishing order.

    The first node failure cancels the nodes still running and is raised.
    """
    inputs: dict[str, dict[str, Any]] = {spec.start: dict(request.inputs)}
    waiting = {node: len(parents) for node, parents in spec.parents.items()}
    running: dict[asyncio.Future[bytes], str] = {}
    leaves: list[tuple[str, bytes]] = []

    def launch(name: str) -> None:
        node_request = InferenceRequest(
            inputs.pop(name),
            request.headers,
            uuid.uuid4().hex,
            request.api,
            # The client's inputs (and their content types) reach the start node only.
            input_types=request.input_types if name == spec.start else {},
            # TorchServe's ts_* request counters count its inference API's requests, and a
            # workflow's nodes never pass through that API.
            counted=False,
        )
        running[asyncio.ensure_future(call(spec.nodes[name], node_request))] = name

    launch(spec.start)
    try:
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                name = running.pop(task)
                output = task.result()
                children = spec.children[name]
                if not children:
                    leaves.append((name, output))
                for child in children:
                    # TorchServe hands response bytes on as a bytearray, as its worker decodes
                    # a parameter without a content type.
                    key = "body" if len(spec.parents[child]) == 1 else name
                    inputs.setdefault(child, {})[key] = bytearray(output)
                    waiting[child] -= 1
                    if waiting[child] == 0:
                        launch(child)
    finally:
        for task in running:
            task.cancel()
    return leaves


def _message(error: BaseException) -> str:
    return error.message if isinstance(error, TorchgateError) else f"{error}"
