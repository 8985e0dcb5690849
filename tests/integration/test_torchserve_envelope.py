"""`service_envelope=kserve` in real TorchServe 0.12 and in torchgate, same archives and key.

The envelope (ts.torch_handler.request_envelope) wraps every handler in its worker: it unwraps
KServe v1's `{"instances": [...]}` into the handler's batch and wraps the answers as
`{"predictions": [...]}` (or `{"explanations": [...]}` on /explanations). TorchServe's built-in
`base_handler` serving a TorchScript model takes the instances as its tensor rows.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import httpx
import pytest
import torch

from tests.support.archives import build_archive
from tests.support.side_by_side import Endpoints, side_by_side

pytestmark = [
    pytest.mark.integration,
    pytest.mark.torchserve,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java"),
]

# examples/captum's shape, for KServe: rows in, one attribution row per instance out.
EXPLAINER = """
    import torch
    from ts.torch_handler.base_handler import BaseHandler


    class RowExplainer(BaseHandler):
        def initialize(self, context):
            self.context = context
            self.initialized = True

        def preprocess(self, data):
            return torch.tensor(data, dtype=torch.float32)

        def inference(self, data):
            return data.sum(dim=1)

        def postprocess(self, data):
            return data.tolist()

        def get_insights(self, tensor_data, raw_data, target):
            return (tensor_data * 0.5).tolist()
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Endpoints]]:
    work = tmp_path_factory.mktemp("envelope")
    store = work / "store"
    store.mkdir()
    linear = torch.nn.Linear(2, 1, bias=False).eval().requires_grad_(False)
    linear.weight.copy_(torch.tensor([[0.5, -1.0]]))
    torch.jit.trace(linear, torch.ones(1, 2)).save(str(work / "linear.pt"))
    build_archive(
        work, "linear", "base_handler", {"linear.pt": (work / "linear.pt").read_bytes()},
        serialized="linear.pt", export_dir=store,
    )  # fmt: skip
    build_archive(work, "rows", "rows.py", {"rows.py": EXPLAINER}, export_dir=store)
    with side_by_side(store, {"service_envelope": "kserve"}) as servers:
        yield servers


def both(servers: dict[str, Endpoints], path: str, **kwargs: object) -> list[httpx.Response]:
    return [
        httpx.post(servers[name].inference + path, timeout=60, **kwargs)  # type: ignore[arg-type]
        for name in ("torchserve", "torchgate")
    ]


def test_base_handler_takes_kserve_instances(servers: dict[str, Endpoints]) -> None:
    body = {"instances": [[1.0, 2.0], [4.0, 2.0]]}
    theirs, ours = both(servers, "/predictions/linear", json=body)
    assert ours.status_code == theirs.status_code == 200
    assert ours.json() == theirs.json() == {"predictions": [[-1.5], [0.0]]}
    # Without a content type the body is bytes; the envelope parses it all the same.
    theirs, ours = both(servers, "/predictions/linear", content=b'{"instances": [[2.0, 1.0]]}')
    assert ours.json() == theirs.json() == {"predictions": [[0.0]]}


def test_explanations_are_wrapped_as_explanations(servers: dict[str, Endpoints]) -> None:
    body = {"instances": [[1.0, 2.0], [3.0, 4.0]]}
    theirs, ours = both(servers, "/predictions/rows", json=body)
    assert ours.json() == theirs.json() == {"predictions": [3.0, 7.0]}
    theirs, ours = both(servers, "/explanations/rows", json=body)
    assert ours.status_code == theirs.status_code == 200
    assert ours.json() == theirs.json() == {"explanations": [[0.5, 1.0], [1.5, 2.0]]}


def test_a_body_without_instances_fails_in_the_envelope(servers: dict[str, Endpoints]) -> None:
    """The envelope raises in the worker. TorchServe answers any handler exception with 503
    "Prediction failed" (a status that tells clients to retry); torchgate answers 500 naming the
    error, as for every handler exception."""
    theirs, ours = both(servers, "/predictions/linear", json=[[1.0, 2.0]])
    assert theirs.status_code == 503
    assert ours.status_code == 500
    assert ours.json()["type"] == theirs.json()["type"] == "InternalServerException"


def test_kserve_v1_is_unwrapped_once_with_the_envelope_on(servers: dict[str, Endpoints]) -> None:
    """torchgate's own /v1 endpoint unwraps the instances before the worker: the envelope leaves
    those items alone (the worker runs them through the bare handler) and the answer is the
    same as TorchServe's envelope gives on its /v1 route."""
    body = {"instances": [[1.0, 2.0], [4.0, 2.0]]}
    theirs, ours = both(servers, "/v1/models/linear:predict", json=body)
    assert ours.status_code == theirs.status_code == 200, ours.text
    assert ours.json() == theirs.json() == {"predictions": [[-1.5], [0.0]]}
