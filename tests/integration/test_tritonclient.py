"""KServe v2 with the official tritonclient against a running `torchgate serve`.

Every test runs with the four clients a Triton user has (`tritonclient.http`, `.http.aio`,
`.grpc`, `.grpc.aio`) against one server started for the module: the example archives (digits
1.0 TorchScript, digits 2.0 ONNX, minilm) and a third-party archive without a signature built
here with torch-model-archiver, with `max_request_size` lowered to 64 KiB. Token authorization
gets a second server, with digits only. Answers are checked against the TorchServe-style
`/predictions` API of the same server.

How tritonclient reports errors: `InferenceServerException` whose `status()` is the HTTP status
as a string ("404") over HTTP, and the gRPC code as a string ("StatusCode.NOT_FOUND") over gRPC.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import queue
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc
import tritonclient.grpc.aio
import tritonclient.http
import tritonclient.http.aio
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException

from tests.support.archives import run_archiver
from tests.support.server import ROOT, TorchgateServer, running_torchgate

pytestmark = pytest.mark.integration

T = TypeVar("T")
MAX_REQUEST_SIZE = 64 * 1024
TEXTS = ["hello world", "torchgate serves TorchServe archives", "d\u00e9j\u00e0 vu, caf\u00e9"]

# A third-party archive as TorchServe users write them: BaseHandler loads the TorchScript
# model; preprocess reads the JSON rows a client posts to /predictions. No signature.json.
LINEAR_HANDLER = """
    import json

    import torch
    from ts.torch_handler.base_handler import BaseHandler


    class LinearHandler(BaseHandler):
        def preprocess(self, data):
            rows = []
            for row in data:
                body = row.get("data") or row.get("body")
                if isinstance(body, (bytes, bytearray)):
                    body = json.loads(body)
                rows.append(torch.as_tensor(body, dtype=torch.float32).reshape(-1, 4))
            self.counts = [len(r) for r in rows]
            return torch.cat(rows).to(self.device)

        def postprocess(self, data):
            return [part.tolist() for part in torch.split(data, self.counts)]
"""


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]]))
            self.linear.bias.copy_(torch.tensor([0.5, -0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def build_linear_archive(store: Path, work: Path) -> None:
    torch.jit.script(Linear().eval()).save(str(work / "linear.pt"))
    (work / "linear_handler.py").write_text(textwrap.dedent(LINEAR_HANDLER))
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    command = [
        str(archiver),
        "--model-name", "linear",
        "--version", "1.0",
        "--serialized-file", str(work / "linear.pt"),
        "--handler", str(work / "linear_handler.py"),
        "--export-path", str(store),
    ]  # fmt: skip
    run_archiver(command, work)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchgateServer]:
    root = tmp_path_factory.mktemp("tritonclient")
    store = root / "model_store"
    store.mkdir()
    for name in ("digits.mar", "digits_v2.mar", "minilm.mar"):
        source = ROOT / "model_store" / name
        if not source.exists():
            pytest.skip(f"{source} is not built (torchgate export --all)")
        (store / name).symlink_to(source)
    build_linear_archive(store, root)
    config = (ROOT / "config.properties").read_text() + (
        f"\nmodel_store={store}\n"
        "load_models=digits.mar,digits_v2.mar,minilm.mar,linear.mar\n"
        f"max_request_size={MAX_REQUEST_SIZE}\n"
    )
    with running_torchgate(config, workdir=root / "server") as tg:
        yield tg


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TorchgateServer, str]]:
    """A server with token authorization on; (server, inference key from its key file)."""
    root = tmp_path_factory.mktemp("tritonclient-auth")
    key_file = root / "keys" / "key_file.json"
    key_file.parent.mkdir()
    config = (
        f"model_store={ROOT / 'model_store'}\n"
        "load_models=digits.mar\n"
        "disable_token_authorization=false\n"
        f"torchgate.key_file={key_file}\n"
    )
    with running_torchgate(config, workdir=root / "server") as tg:
        yield tg, json.loads(key_file.read_text())["inference"]["key"]


# -- one interface over the four clients -------------------------------------------------------


@dataclass
class Triton:
    """A tritonclient client of one flavour; `call` awaits the aio clients' coroutines."""

    flavor: str
    module: ModuleType  # where InferInput and InferRequestedOutput come from
    client: Any

    @property
    def http(self) -> bool:
        return self.flavor.startswith("http")

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.client, method)(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    def input(self, name: str, array: np.ndarray, datatype: str, *, binary: bool = True) -> Any:
        tensor = self.module.InferInput(name, list(array.shape), datatype)
        if self.http:
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        return tensor

    def output(self, name: str, *, binary: bool = True) -> Any:
        if self.http:
            return self.module.InferRequestedOutput(name, binary_data=binary)
        return self.module.InferRequestedOutput(name)

    async def error(self, call: Awaitable[Any]) -> InferenceServerException:
        with pytest.raises(InferenceServerException) as info:
            await call
        return info.value

    def status(self, http: int, grpc: str) -> str:
        """The `status()` tritonclient gives an error over this flavour's protocol."""
        return str(http) if self.http else f"StatusCode.{grpc}"


FLAVORS = ["http", "http.aio", "grpc", "grpc.aio"]


@asynccontextmanager
async def triton(flavor: str, tg: TorchgateServer) -> AsyncIterator[Triton]:
    http_url = tg.inference_url.removeprefix("http://")
    grpc_url = f"127.0.0.1:{tg.grpc_inference_port}"
    client: Any
    if flavor == "http":
        client = tritonclient.http.InferenceServerClient(http_url)
        module: ModuleType = tritonclient.http
    elif flavor == "http.aio":
        client, module = tritonclient.http.aio.InferenceServerClient(http_url), tritonclient.http
    elif flavor == "grpc":
        client, module = tritonclient.grpc.InferenceServerClient(grpc_url), tritonclient.grpc
    else:
        client, module = tritonclient.grpc.aio.InferenceServerClient(grpc_url), tritonclient.grpc
    wrapper = Triton(flavor, module, client)
    try:
        yield wrapper
    finally:
        await wrapper.call("close")


def run(flavor: str, tg: TorchgateServer, scenario: Callable[[Triton], Awaitable[T]]) -> T:
    async def main() -> T:
        async with triton(flavor, tg) as client:
            return await scenario(client)

    return asyncio.run(asyncio.wait_for(main(), 30))


# -- reference answers from the TorchServe-style API -------------------------------------------


def digits_images(count: int) -> np.ndarray:
    """Real 8x8 digits (0..16), [count, 1, 8, 8] FP32, as the signature declares."""
    images: np.ndarray = load_digits().images[:count]
    return images.reshape(count, 1, 8, 8).astype(np.float32)


def predictions(tg: TorchgateServer, path: str, body: Any) -> Any:
    response = httpx.post(f"{tg.inference_url}/predictions/{path}", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def top_labels(tg: TorchgateServer, path: str, images: np.ndarray) -> list[int]:
    """The first label of each `{"label": probability}` answer, best first."""
    return [int(next(iter(predictions(tg, path, image.ravel().tolist())))) for image in images]


# -- health and metadata -----------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
def test_liveness_and_readiness(server: TorchgateServer, flavor: str) -> None:
    async def scenario(t: Triton) -> None:
        assert await t.call("is_server_live")
        assert await t.call("is_server_ready")
        for model, version in (
            ("digits", ""),
            ("digits", "1.0"),
            ("digits", "2.0"),
            ("minilm", ""),
        ):
            assert await t.call("is_model_ready", model, version)
        if t.http:  # tritonclient.http reads readiness from the status code: 404 is not ready
            assert not await t.call("is_model_ready", "nope")
            assert not await t.call("is_model_ready", "digits", "9.9")
        else:  # tritonclient.grpc raises the NOT_FOUND status
            error = await t.error(t.call("is_model_ready", "nope"))
            assert (error.status(), error.message()) == (
                "StatusCode.NOT_FOUND",
                "Model not found: nope",
            )

    run(flavor, server, scenario)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_server_and_model_metadata(server: TorchgateServer, flavor: str) -> None:
    async def scenario(t: Triton) -> None:
        as_json = {} if t.http else {"as_json": True}
        metadata = await t.call("get_server_metadata", **as_json)
        assert metadata == {
            "name": "torchgate",
            "version": "0.1.0",
            "extensions": ["binary_tensor_data"],
        }
        metadata = await t.call("get_model_metadata", "digits", **as_json)
        assert (metadata["versions"], metadata["platform"]) == (
            ["1.0", "2.0"],
            "pytorch_torchscript",
        )
        [pixels] = metadata["inputs"]
        # grpc's as_json writes int64 fields as strings (protobuf's JSON mapping).
        assert (pixels["name"], pixels["datatype"]) == ("pixels", "FP32")
        assert [int(d) for d in pixels["shape"]] == [-1, 1, 8, 8]
        [probabilities] = metadata["outputs"]
        assert (probabilities["name"], [int(d) for d in probabilities["shape"]]) == (
            "probabilities",
            [-1, 10],
        )
        metadata = await t.call("get_model_metadata", "digits", "2.0", **as_json)
        assert (metadata["versions"], metadata["platform"]) == (["2.0"], "onnxruntime_onnx")
        metadata = await t.call("get_model_metadata", "minilm", **as_json)
        [text] = metadata["inputs"]
        assert (text["name"], text["datatype"], [int(d) for d in text["shape"]]) == (
            "text",
            "BYTES",
            [-1],
        )
        error = await t.error(t.call("get_model_metadata", "nope", **as_json))
        assert (error.status(), error.message()) == (
            t.status(404, "NOT_FOUND"),
            "Model not found: nope",
        )

    run(flavor, server, scenario)


# -- inference ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flavor", "binary"),
    [
        *[("http", True), ("http", False), ("http.aio", True), ("http.aio", False)],
        *[("grpc", True), ("grpc.aio", True)],
    ],
)
def test_digits_fp32(server: TorchgateServer, flavor: str, binary: bool) -> None:
    images = digits_images(6)
    expected = {
        "1.0": top_labels(server, "digits", images),
        "2.0": top_labels(server, "digits/2.0", images),
    }

    async def scenario(t: Triton) -> None:
        for version in ("", "2.0"):
            pixels = t.input("pixels", images, "FP32", binary=binary)
            result = await t.call(
                "infer",
                "digits",
                [pixels],
                model_version=version,
                outputs=[t.output("probabilities", binary=binary)],
                request_id=f"req-{version}",
            )
            probabilities = result.as_numpy("probabilities")
            assert probabilities.dtype == np.float32
            assert probabilities.shape == (6, 10)
            np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
            assert probabilities.argmax(1).tolist() == expected[version or "1.0"]
            response = result.get_response(as_json=True) if not t.http else result.get_response()
            assert response["model_version"] == (version or "1.0")
            assert response["id"] == f"req-{version}"

    run(flavor, server, scenario)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_digits_rows_of_64_and_all_outputs_by_default(server: TorchgateServer, flavor: str) -> None:
    images = digits_images(3)

    async def scenario(t: Triton) -> None:
        rows = images.reshape(3, 64)  # [N, 64] fits [-1, 1, 8, 8]
        result = await t.call("infer", "digits", [t.input("pixels", rows, "FP32")])
        assert result.as_numpy("probabilities").argmax(1).tolist() == top_labels(
            server, "digits", images
        )

    run(flavor, server, scenario)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_compressed_requests(server: TorchgateServer, flavor: str) -> None:
    images = digits_images(4)
    expected = top_labels(server, "digits", images)

    async def scenario(t: Triton) -> None:
        for algorithm in ("gzip", "deflate"):
            if t.http:
                options = {
                    "request_compression_algorithm": algorithm,
                    "response_compression_algorithm": algorithm,  # answered compressed
                }
            else:
                options = {"compression_algorithm": algorithm}
            pixels = t.input("pixels", images, "FP32")
            result = await t.call("infer", "digits", [pixels], **options)
            assert result.as_numpy("probabilities").argmax(1).tolist() == expected, algorithm

    run(flavor, server, scenario)


@pytest.mark.parametrize(
    ("flavor", "binary"),
    [("http", True), ("http", False), ("http.aio", True), ("grpc", True), ("grpc.aio", True)],
)
def test_minilm_bytes(server: TorchgateServer, flavor: str, binary: bool) -> None:
    expected = np.asarray(predictions(server, "minilm", {"text": TEXTS}), np.float32)

    async def scenario(t: Triton) -> None:
        texts = np.array([text.encode() for text in TEXTS], dtype=object)
        result = await t.call(
            "infer",
            "minilm",
            [t.input("text", texts, "BYTES", binary=binary)],
            outputs=[t.output("embedding", binary=binary)],
        )
        embedding = result.as_numpy("embedding")
        assert embedding.shape == (len(TEXTS), 384)
        np.testing.assert_allclose(embedding, expected, atol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-4)

    run(flavor, server, scenario)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_third_party_archive_without_a_signature(server: TorchgateServer, flavor: str) -> None:
    rows = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 0.5, 2.0]], np.float32)
    expected = predictions(server, "linear", rows.tolist())  # what /predictions answers

    async def scenario(t: Triton) -> None:
        result = await t.call("infer", "linear", [t.input("x", rows, "FP32")])
        output = result.as_numpy("output0")
        assert output.shape == (2, 2)
        np.testing.assert_allclose(output, expected, rtol=1e-6)

    run(flavor, server, scenario)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
def test_unknown_model_and_version(server: TorchgateServer, flavor: str) -> None:
    async def scenario(t: Triton) -> None:
        pixels = t.input("pixels", digits_images(1), "FP32")
        error = await t.error(t.call("infer", "nope", [pixels]))
        assert (error.status(), error.message()) == (
            t.status(404, "NOT_FOUND"),
            "Model not found: nope",
        )
        error = await t.error(t.call("infer", "digits", [pixels], model_version="9.9"))
        assert (error.status(), error.message()) == (
            t.status(404, "NOT_FOUND"),
            "Model version: 9.9 does not exist for model: digits",
        )

    run(flavor, server, scenario)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_wrong_datatype_shape_and_output(server: TorchgateServer, flavor: str) -> None:
    async def scenario(t: Triton) -> None:
        bad = t.status(400, "INVALID_ARGUMENT")
        ints = t.input("pixels", digits_images(1).astype(np.int32), "INT32")
        error = await t.error(t.call("infer", "digits", [ints]))
        assert (error.status(), error.message()) == (
            bad,
            "input 'pixels': datatype INT32, the model takes FP32",
        )
        short = t.input("pixels", np.zeros((1, 63), np.float32), "FP32")
        error = await t.error(t.call("infer", "digits", [short]))
        assert (error.status(), error.message()) == (
            bad,
            "input 'pixels': shape [1, 63] does not fit the model's [-1, 1, 8, 8]",
        )
        floats = t.input("text", np.zeros(2, np.float32), "FP32")
        error = await t.error(t.call("infer", "minilm", [floats]))
        assert (error.status(), error.message()) == (
            bad,
            "input 'text': datatype FP32, the model takes BYTES",
        )
        pixels = t.input("pixels", digits_images(1), "FP32")
        error = await t.error(t.call("infer", "digits", [pixels], outputs=[t.output("nope")]))
        assert (error.status(), error.message()) == (
            bad,
            "unexpected inference output 'nope' for model 'digits'",
        )
        top3 = t.module.InferRequestedOutput("probabilities", class_count=3)
        error = await t.error(t.call("infer", "digits", [pixels], outputs=[top3]))
        assert (error.status(), error.message()) == (
            bad,
            "output 'probabilities': the classification extension is not supported",
        )

    run(flavor, server, scenario)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_oversized_request(server: TorchgateServer, flavor: str) -> None:
    async def scenario(t: Triton) -> None:
        images = np.zeros((300, 1, 8, 8), np.float32)  # 76,800 bytes of tensor data
        error = await t.error(t.call("infer", "digits", [t.input("pixels", images, "FP32")]))
        assert error.status() == t.status(413, "RESOURCE_EXHAUSTED")
        assert "max" in (error.message() or "")

    run(flavor, server, scenario)


def test_grpc_stream_infer_reports_each_answer(server: TorchgateServer) -> None:
    images = digits_images(2)
    expected = top_labels(server, "digits", images)

    async def scenario(t: Triton) -> None:
        async def requests() -> AsyncIterator[dict[str, Any]]:
            cases = [
                (images[:1], "FP32"),
                (images[:1].astype(np.int32), "INT32"),
                (images[1:], "FP32"),
            ]
            for index, (image, datatype) in enumerate(cases):
                yield {
                    "model_name": "digits",
                    "inputs": [t.input("pixels", image, datatype)],
                    "request_id": str(index),
                }

        answers = [answer async for answer in t.client.stream_infer(requests())]
        labels = [
            None if r is None else int(r.as_numpy("probabilities").argmax()) for r, _ in answers
        ]
        errors = [None if e is None else e.message() for _, e in answers]
        assert labels == [expected[0], None, expected[1]]
        assert errors == [None, "input 'pixels': datatype INT32, the model takes FP32", None]

    run("grpc.aio", server, scenario)


def test_grpc_stream_clients_that_wait_for_the_final_flag(server: TorchgateServer) -> None:
    """The loop Triton's streaming clients run: read responses until one carries
    `triton_final_response`. With `enable_empty_final_response` set, as LLM clients set it, a
    model that does not stream still answers once, with the flag (a streaming handler's parts
    and empty final: tests/rpc/test_kserve_grpc.py)."""
    images = digits_images(3)
    expected = top_labels(server, "digits", images)
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{server.grpc_inference_port}")
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        labels = []
        for index, image in enumerate(images):
            pixels = tritonclient.grpc.InferInput("pixels", [1, 1, 8, 8], "FP32")
            pixels.set_data_from_numpy(image[None])
            client.async_stream_infer(
                "digits", [pixels], request_id=str(index), enable_empty_final_response=True
            )
            while True:  # without the flag this loop would wait forever
                result, error = results.get(timeout=30)
                assert error is None
                response = result.get_response()
                assert response.id == str(index)
                if response.outputs:
                    labels.append(int(result.as_numpy("probabilities").argmax()))
                if response.parameters["triton_final_response"].bool_param:
                    break
        assert labels == expected
    finally:
        client.stop_stream()
        client.close()


# -- token authorization -----------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
def test_token_authorization(auth_server: tuple[TorchgateServer, str], flavor: str) -> None:
    tg, key = auth_server
    images = digits_images(2)

    async def scenario(t: Triton) -> None:
        pixels = t.input("pixels", images, "FP32")
        error = await t.error(t.call("infer", "digits", [pixels]))
        assert error.status() == t.status(401, "UNAUTHENTICATED")
        assert (error.message() or "").startswith("Token Authorization failed")
        # gRPC metadata keys must be lower case (grpc refuses "Authorization" client-side).
        header = "Authorization" if t.http else "authorization"
        wrong = {header: "Bearer not-the-key"}
        error = await t.error(t.call("infer", "digits", [pixels], headers=wrong))
        assert error.status() == t.status(401, "UNAUTHENTICATED")

        result = await t.call("infer", "digits", [pixels], headers={header: f"Bearer {key}"})
        assert result.as_numpy("probabilities").shape == (2, 10)
        # Health and metadata need no key (Kubernetes probes cannot send one).
        assert await t.call("is_server_ready")
        assert await t.call("is_model_ready", "digits")

    run(flavor, tg, scenario)
