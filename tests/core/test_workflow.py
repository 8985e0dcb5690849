"""The workflow spec, the DAG runner and the workflow registry, with a fake dataplane and host."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from api.core.dataplane import Answer, DataPlane
from api.core.registry import ModelVersion
from api.core.types import InferenceRequest, Prediction
from api.core.workflow import (
    Node,
    NodeSettings,
    RegisterOptions,
    Workflows,
    WorkflowSpec,
    parse_spec,
    run_dag,
)
from api.errors import (
    BadRequest,
    Conflict,
    InferenceFailed,
    InvalidDag,
    InvalidWorkflow,
    ModelNotFound,
    WorkflowFailed,
    WorkflowNotFound,
    http_status,
)
from tests.support import aio

run = functools.partial(aio.run, timeout=10)

FAN = {
    "models": {
        "min-workers": 2,
        "max-workers": 3,
        "batch-size": 4,
        "max-batch-delay": 20,
        "retry-attempts": 0,
        "timeout-ms": 500,
        "add": {"url": "add.mar"},
        "mul": {"url": "mul.mar", "batch-size": 8, "retry-attempts": 2},
    },
    "dag": {"pre": ["add", "mul"], "add": ["agg"], "mul": ["agg"]},
}


def spec(document: Any = FAN, name: str = "wf") -> WorkflowSpec:
    return parse_spec(name, f"{name}.war", document)


# -- the spec ----------------------------------------------------------------------------------


def test_spec_nodes_settings_and_dag() -> None:
    wf = spec()
    assert wf.start == "pre"
    assert wf.settings == NodeSettings(2, 3, 4, 20, 0, 500)
    assert wf.nodes["add"] == Node("add", "wf__add", "add.mar", NodeSettings(2, 3, 4, 20, 0, 500))
    assert wf.nodes["mul"].settings == NodeSettings(2, 3, 8, 20, 2, 500)
    # Functions: one worker, no batching; the workflow's retries and timeout.
    assert wf.nodes["agg"] == Node("agg", "wf__agg", None, NodeSettings(1, 1, 1, 0, 0, 500))
    assert wf.parents["agg"] == ["add", "mul"]
    assert wf.children["pre"] == ["add", "mul"]
    assert wf.dag_text == "{pre=[add, mul], add=[agg], mul=[agg]}"


def test_spec_defaults_are_torchserves() -> None:
    wf = spec({"models": {"m": {"url": "m.mar"}}, "dag": {"pre": ["m"]}})
    assert wf.settings == NodeSettings(1, 1, 1, 50, 1, 10000)


@pytest.mark.parametrize(
    ("dag", "message"),
    [
        ({"a": ["a"]}, "Self loop exception"),
        ({"a": ["b"], "b": ["a"]}, "loop exception"),
        ({"a": ["c"], "b": ["c"]}, "DAG should have only one start node"),
        ({"s": ["a"], "a": ["b"], "b": ["c"], "c": ["a"]}, "Not a valid DAG"),
    ],
)
def test_spec_refuses_what_is_not_one_dag(dag: dict[str, list[str]], message: str) -> None:
    with pytest.raises(InvalidDag) as info:
        spec({"models": {}, "dag": dag})
    assert info.value.message == message
    assert http_status(info.value) == 400 and info.value.type_name == "InvalidDAGException"


@pytest.mark.parametrize(
    "document",
    [
        "not a mapping",
        {"models": {"m": {"url": "m.mar"}}},
        {"models": {"m": {}}, "dag": {"pre": ["m"]}},
        {"models": {"m": 3}, "dag": {"pre": ["m"]}},
        {"models": {"batch-size": "big"}, "dag": {"pre": ["m"]}},
        {"models": {}, "dag": {"pre": "m"}},
        # A node names a folder: none may lead out of the workflow's (nor start with a dot).
        {"models": {}, "dag": {"pre": ["../../../tmp/x"]}},
        {"models": {}, "dag": {"/tmp/x": ["post"]}},
        {"models": {}, "dag": {"pre": [".."]}},
    ],
)
def test_spec_refuses_malformed_documents(document: Any) -> None:
    with pytest.raises(InvalidWorkflow):
        spec(document)


# -- the runner --------------------------------------------------------------------------------


def calls_recorded(
    answers: dict[str, Callable[[dict[str, Any]], bytes]],
) -> tuple[list[tuple[str, dict[str, Any]]], Callable[[Node, InferenceRequest], Any]]:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def call(node: Node, request: InferenceRequest) -> bytes:
        seen.append((node.name, dict(request.inputs)))
        await asyncio.sleep(0)
        return answers[node.name](request.inputs)

    return seen, call


def test_run_dag_chains_outputs_and_aggregates_named_by_parent() -> None:
    seen, call = calls_recorded(
        {
            "pre": lambda i: b"P",
            "add": lambda i: b"A",
            "mul": lambda i: b"M",
            "agg": lambda i: json.dumps({k: v.decode() for k, v in sorted(i.items())}).encode(),
        }
    )
    request = InferenceRequest({"body": {"value": 1}}, {"x-h": "1"}, "rid")
    leaves = run(run_dag(spec(), request, call))
    assert leaves == [("agg", b'{"add": "A", "mul": "M"}')]
    inputs = dict(seen)
    assert inputs["pre"] == {"body": {"value": 1}}  # the client's request item
    assert inputs["add"] == inputs["mul"] == {"body": bytearray(b"P")}  # one parent: its body
    assert type(inputs["add"]["body"]) is bytearray  # as TorchServe's worker decodes it
    assert inputs["agg"] == {"add": b"A", "mul": b"M"}
    assert seen[0][0] == "pre" and seen[-1][0] == "agg"


def test_run_dag_failure_cancels_running_branches() -> None:
    cancelled = asyncio.Event()

    async def call(node: Node, request: InferenceRequest) -> bytes:
        if node.name == "add":
            raise InferenceFailed("Error executing add")
        if node.name == "mul":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return b"{}"

    async def scenario() -> None:
        with pytest.raises(InferenceFailed, match="Error executing add"):
            await run_dag(spec(), InferenceRequest({"body": b""}), call)
        await asyncio.wait_for(cancelled.wait(), 5)

    run(scenario())


# -- the registry of workflows -----------------------------------------------------------------


@dataclass
class FakeHost:
    documents: dict[str, Any] = field(default_factory=lambda: {"fan.war": FAN})
    failing: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    discarded: list[str] = field(default_factory=list)

    async def open(self, url: str, name: str | None) -> WorkflowSpec:
        if url not in self.documents:
            raise WorkflowNotFound(f"Workflow not found in workflow store: {url}")
        return parse_spec(name or url.removesuffix(".war"), url, self.documents[url])

    async def add_node(self, spec: WorkflowSpec, node: Node, options: RegisterOptions) -> None:
        if node.name in self.failing:
            raise InferenceFailed(f"{node.name} would not load")
        self.models.add(node.model)

    async def remove_node(self, model: str) -> None:
        if model not in self.models:
            raise ModelNotFound(f"Model not found: {model}")
        self.models.remove(model)

    def discard(self, spec: WorkflowSpec) -> None:
        self.discarded.append(spec.name)


@dataclass
class FakeDataPlane:
    """Answers `infer` from a function of (model, inputs): a Prediction, or raises."""

    answer: Callable[[str, dict[str, Any]], Prediction]
    calls: list[str] = field(default_factory=list)

    async def infer(self, model: str, version: str | None, request: InferenceRequest) -> Answer:
        self.calls.append(model)
        return Answer(cast(ModelVersion, None), self.answer(model, request.inputs))


def encode(prediction: Prediction) -> bytes:
    body = prediction.body
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def workflows(
    answer: Callable[[str, dict[str, Any]], Prediction] | None = None,
    host: FakeHost | None = None,
) -> tuple[Workflows, FakeHost, FakeDataPlane]:
    host = host or FakeHost()
    plane = FakeDataPlane(answer or (lambda model, inputs: Prediction({"from": model})))
    return Workflows(cast(DataPlane, plane), host, encode), host, plane


def test_register_list_describe_unregister() -> None:
    wf, host, _ = workflows()
    status = run(wf.register("fan.war"))
    assert status == "Workflow fan has been registered and scaled successfully."
    assert host.models == {"fan__pre", "fan__add", "fan__mul", "fan__agg"}
    assert run(wf.register("fan.war", "other")).startswith("Workflow other has been")
    assert wf.list_page(100, 0) == {
        "workflows": [
            {"workflowName": "fan", "workflowUrl": "fan.war"},
            {"workflowName": "other", "workflowUrl": "fan.war"},
        ]
    }
    assert wf.describe("fan")[0]["workflowDag"] == "{pre=[add, mul], add=[agg], mul=[agg]}"
    assert wf.describe("fan")[0]["minWorkers"] == 2
    with pytest.raises(Conflict, match=r"Workflow fan is already registered\."):
        run(wf.register("fan.war"))
    assert run(wf.unregister("fan")) == 'Workflow "fan" unregistered'
    assert not any(m.startswith("fan__") for m in host.models)
    with pytest.raises(WorkflowNotFound, match="Workflow not found: fan"):
        wf.describe("fan")
    with pytest.raises(BadRequest, match=r"Parameter url is required\."):
        run(wf.register(None))


def test_a_node_that_fails_to_register_rolls_the_workflow_back() -> None:
    wf, host, _ = workflows(host=FakeHost(failing={"mul"}))
    with pytest.raises(WorkflowFailed) as info:
        run(wf.register("fan.war"))
    assert http_status(info.value) == 500 and info.value.type_name == "WorkflowException"
    assert info.value.message.startswith("Workflow fan has failed to register. Failures: [")
    assert "Workflow Node fan__mul failed to register. Details: mul would not load" in str(
        info.value
    )
    assert host.models == set() and host.discarded == ["fan"]
    assert wf.names() == []


def test_unregister_reports_nodes_removed_behind_its_back() -> None:
    wf, host, _ = workflows()
    run(wf.register("fan.war"))
    host.models.discard("fan__add")
    with pytest.raises(InferenceFailed, match="Error while unregistering the workflow fan"):
        run(wf.unregister("fan"))
    assert wf.names() == [] and host.models == set()


@pytest.mark.parametrize(
    ("limit", "token", "expected"),
    [
        (1, 0, {"nextPageToken": "1", "workflows": ["a"]}),
        (2, 1, {"nextPageToken": "3", "workflows": ["b", "c"]}),  # TorchServe: token at the end
        (5, 1, {"workflows": ["b", "c"]}),
        (0, 0, {"nextPageToken": "0", "workflows": []}),
        (500, -3, {"workflows": ["a", "b", "c"]}),  # out of range: 100 and 0
    ],
)
def test_list_pages_as_torchserve(limit: int, token: int, expected: dict[str, Any]) -> None:
    wf, _, _ = workflows(host=FakeHost(documents={f"{n}.war": FAN for n in "abc"}))
    for name in "cab":
        run(wf.register(f"{name}.war"))
    page = wf.list_page(limit, token)
    page["workflows"] = [entry["workflowName"] for entry in page["workflows"]]
    assert page == expected


def test_predict_one_leaf_answers_its_bytes() -> None:
    chain = {"models": {"m": {"url": "m.mar"}}, "dag": {"pre": ["m"], "m": ["post"]}}
    wf, _, plane = workflows(
        lambda model, inputs: Prediction(b"raw" if model == "c__post" else {"k": model}),
        FakeHost(documents={"c.war": chain}),
    )
    run(wf.register("c.war"))
    assert run(wf.predict("c", InferenceRequest({"body": b"x"}))) == b"raw"
    assert plane.calls == ["c__pre", "c__m", "c__post"]
    with pytest.raises(WorkflowNotFound, match="Workflow not found: nope"):
        run(wf.predict("nope", InferenceRequest({})))


def test_predict_several_leaves_answers_one_object() -> None:
    leaves = {"models": {}, "dag": {"pre": ["a", "b"]}}
    wf, _, _ = workflows(
        lambda model, inputs: Prediction({"n": model}), FakeHost(documents={"l.war": leaves})
    )
    run(wf.register("l.war"))
    answer = json.loads(run(wf.predict("l", InferenceRequest({}))))
    assert answer == {"a": {"n": "l__a"}, "b": {"n": "l__b"}}


def test_leaves_that_are_not_json_objects_cannot_be_combined() -> None:
    leaves = {"models": {}, "dag": {"pre": ["a", "b"]}}
    wf, _, _ = workflows(
        lambda model, inputs: Prediction([1]), FakeHost(documents={"l.war": leaves})
    )
    run(wf.register("l.war"))
    with pytest.raises(InferenceFailed, match="leaf node"):
        run(wf.predict("l", InferenceRequest({})))


def test_a_failing_node_is_retried_then_fails_the_request() -> None:
    chain = {"models": {"retry-attempts": 2, "m": {"url": "m.mar"}}, "dag": {"pre": ["m"]}}
    attempts: dict[str, int] = {}
    failures = {"c__m": 2}

    def answer(model: str, inputs: dict[str, Any]) -> Prediction:
        attempts[model] = attempts.get(model, 0) + 1
        if attempts[model] <= failures.get(model, 0):
            return Prediction(None, status=500, message="flaky")
        return Prediction({"ok": model})

    wf, _, _ = workflows(answer, FakeHost(documents={"c.war": chain}))
    run(wf.register("c.war"))
    assert json.loads(run(wf.predict("c", InferenceRequest({})))) == {"ok": "c__m"}
    assert attempts["c__m"] == 3  # 1 + retry-attempts

    attempts.clear()
    failures["c__m"] = 10
    with pytest.raises(InferenceFailed) as info:
        run(wf.predict("c", InferenceRequest({})))
    assert info.value.message == "Error executing m" and http_status(info.value) == 500
    assert attempts["c__m"] == 3


def test_a_node_past_timeout_ms_fails_and_a_missing_model_is_named() -> None:
    host = FakeHost(
        documents={
            "slow.war": {"models": {"timeout-ms": 1, "retry-attempts": 0}, "dag": {"a": ["b"]}},
            "gone.war": {"models": {}, "dag": {"gone": ["b"]}},
        }
    )

    class SlowPlane:
        async def infer(self, model: str, version: str | None, request: Any) -> Answer:
            if model == "gone__gone":  # unregistered behind the workflow's back
                raise ModelNotFound(f"Model not found: {model}")
            await asyncio.sleep(30)
            raise AssertionError("not reached")

    wf = Workflows(cast(DataPlane, SlowPlane()), host, encode)
    run(wf.register("slow.war"))
    run(wf.register("gone.war"))
    with pytest.raises(InferenceFailed) as info:
        run(wf.predict("slow", InferenceRequest({})))
    assert info.value.message == "Error executing a"
    with pytest.raises(InferenceFailed) as info:
        run(wf.predict("gone", InferenceRequest({})))
    assert info.value.message == "gone__gone"  # TorchServe's answer: the model's name
