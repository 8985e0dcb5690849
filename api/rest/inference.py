"""TorchServe's inference API utilities (port 8080): OPTIONS /, /api-description
(OPTIONS /predictions/{model} is the predictions endpoint's: `api.rest.predictions`).

`/ping` and `/predictions/...` (any method) and KServe v2's `POST .../infer` are plain ASGI
(`api.rest.ping`, `api.rest.predictions`, `api.rest.v2`), mounted in front of this router by
`api.rest.apps`; they are listed in the OpenAPI document all the same (`/api-description`,
which tests/fuzz fuzzes).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI

from api.rest.asgi import EVERY_METHOD
from api.rest.responses import JsonResponse
from api.v2.tensors import DTYPES


def inference_router(describe: Callable[[], dict[str, Any]]) -> APIRouter:
    """TorchServe's utilities; `describe` gives the port's whole OpenAPI document."""
    router = APIRouter(tags=["inference"])

    @router.options("/")
    async def api_description_options() -> JsonResponse:
        return JsonResponse(describe())

    @router.get("/api-description")
    # TorchServe describes its API whatever the method; GET is the one in the document.
    @router.api_route("/api-description", methods=list(EVERY_METHOD), include_in_schema=False)
    async def api_description() -> JsonResponse:
        return JsonResponse(describe())

    return router


def openapi_document(app: FastAPI, *others: FastAPI) -> dict[str, Any]:
    """One document for the port: `app`'s schema, the other APIs' apps served beside it, and
    the plain-ASGI prediction paths FastAPI cannot see."""
    document = dict(app.openapi())
    paths = dict(document.get("paths", {}))
    schemas = dict(document.get("components", {}).get("schemas", {}))
    for other in others:
        other_document = other.openapi()
        paths.update(other_document.get("paths", {}))
        schemas.update(other_document.get("components", {}).get("schemas", {}))
    if schemas:
        document["components"] = {**document.get("components", {}), "schemas": schemas}
    predict = {
        "post": {
            "tags": ["inference"],
            "summary": "Predictions entry point for a model (its default or routed version)",
            "operationId": "predictions",
            "requestBody": {
                "description": "Input data: a raw body (image, text, JSON) or multipart form",
                "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
            },
            "responses": {
                "200": {"description": "Model output"},
                "400": {"description": "Bad input"},
                "404": {"description": "Model or version not found"},
                "413": {"description": "Body larger than max_request_size"},
                "503": {"description": "Queue full (Retry-After) or model not ready"},
                "504": {"description": "responseTimeout passed"},
            },
        }
    }
    paths["/ping"] = PING
    paths["/predictions/{model_name}"] = predict
    paths["/predictions/{model_name}/{model_version}"] = predict
    paths["/v2/models/{model}/infer"] = V2_INFER
    paths["/v2/models/{model}/versions/{version}/infer"] = V2_INFER
    paths["/v1/models/{model}:predict"] = V1_INFER
    paths["/v1/models/{model}:explain"] = V1_INFER
    document["paths"] = paths
    return document


# `/ping` is plain ASGI too (`api.rest.ping`); it answers every method, GET is the one to use.
_STATUS = {"type": "object", "properties": {"status": {"type": "string"}}}
PING: dict[str, Any] = {
    "get": {
        "tags": ["inference"],
        "summary": "Health of the server: every model's default version has its workers",
        "operationId": "ping",
        "responses": {
            "200": {
                "description": '{"status": "Healthy"}',
                "content": {"application/json": {"schema": _STATUS}},
            },
            "500": {
                "description": '{"status": "Unhealthy"}',
                "content": {"application/json": {"schema": _STATUS}},
            },
        },
    }
}

_V2_PARAMETERS = {
    "type": "object",
    "additionalProperties": {"type": ["string", "number", "boolean"]},
}
_V2_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": list(DTYPES)},
        "parameters": _V2_PARAMETERS,
        "data": {"type": "array", "description": "row-major, flat or nested"},
    },
}
# `POST .../infer` is plain ASGI like /predictions (`api.rest.v2`): described here by hand.
V2_INFER: dict[str, Any] = {
    "post": {
        "tags": ["kserve-v2"],
        "summary": "KServe v2 inference (JSON, or Triton's binary tensor extension)",
        "operationId": "v2_infer",
        "requestBody": {
            "description": "JSON; or binary: a JSON header of Inference-Header-Content-Length "
            "bytes, then the raw tensors",
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["inputs"],
                        "properties": {
                            "id": {"type": "string"},
                            "parameters": _V2_PARAMETERS,
                            "inputs": {"type": "array", "items": _V2_TENSOR},
                            "outputs": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["name"],
                                    "properties": {
                                        "name": {"type": "string"},
                                        "parameters": _V2_PARAMETERS,
                                    },
                                },
                            },
                        },
                    }
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "responses": {
            "200": {"description": "The outputs, JSON or binary as requested"},
            "400": {"description": "Malformed request or inputs the model refuses"},
            "404": {"description": "Model or version not found"},
            "413": {"description": "Body larger than max_request_size"},
            "503": {"description": "Queue full (Retry-After) or model not ready"},
            "504": {"description": "responseTimeout passed"},
        },
    }
}


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["code", "type", "message"],
    "properties": {
        "code": {"type": "integer", "description": "Error code."},
        "type": {"type": "string", "description": "Error type."},
        "message": {"type": "string", "description": "Error message."},
    },
}


def model_api_document(model: str) -> bytes:
    """`OPTIONS /predictions/{model}`: TorchServe's per-model OpenAPI document, byte for byte
    (its Gson pretty printing is json.dumps' indent=2, plus a newline)."""
    operation = {
        "post": {
            "description": f"A predict entry point for model: {model}.",
            "operationId": model,
            "parameters": [],
            "responses": {
                "200": {"description": "OK"},
                "500": {
                    "description": "Internal Server Error",
                    "content": {"application/json": {"schema": _ERROR_SCHEMA}},
                },
            },
        }
    }
    document = {
        "openapi": "3.0.1",
        "info": {"title": f"RESTful API for: {model}", "version": "1.0.0"},
        "paths": {
            f"/prediction/{model}": operation,
            "/v1/models/{model_name}:predict": operation,
            "/v2/models/{model_name}/infer": operation,
        },
    }
    return json.dumps(document, indent=2).encode() + b"\n"


# KServe v1's `:predict` / `:explain` is plain ASGI too (`api.rest.kserve_v1`).
V1_INFER: dict[str, Any] = {
    "post": {
        "tags": ["kserve-v1"],
        "summary": "KServe v1 prediction (:predict) or explanation (:explain)",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["instances"],
                        "properties": {"instances": {"type": "array"}},
                    }
                }
            },
        },
        "responses": {
            "200": {"description": '{"predictions": [...]} or {"explanations": [...]}'},
            "400": {"description": "Malformed body, or an instance the handler refused"},
            "404": {"description": "Model not found"},
            "413": {"description": "Body over max_request_size, or too many instances"},
            "503": {"description": "Queue full (Retry-After) or model not ready"},
            "504": {"description": "responseTimeout passed"},
        },
    }
}
