"""CloudEvents on KServe v1's `:predict` and `:explain`, as KServe's model server takes them.

Knative Eventing delivers requests as CloudEvents (spec 1.0, HTTP binding), in two modes:

- binary: the attributes in `ce-specversion`, `ce-id`, `ce-source`, `ce-type` (and other
  `ce-*`) headers, the body the event's data: here the v1 request itself;
- structured: one JSON document with the attributes and the v1 request under `data`
  (`content-type: application/cloudevents+json`).

KServe unwraps both and answers in kind: a binary event with a binary event (the v1 answer as
body, `content-type: application/json`, the attributes in `ce-*` headers), a request sent as
`application/cloudevents+json` with a structured event. The answer's `type` is
`io.kserve.inference.response` and its `source` `io.kserve.inference.{model}`, unless the
`CE_TYPE` and `CE_SOURCE` environment variables say otherwise; it gets a new `id` and `time`;
with `CE_MERGE=true` the request's other attributes are carried over. The same variables as
KServe's model server, read per answer as it reads them.

    data, event = unwrap(headers, request)       # request: the parsed JSON body
    ...                                          # answer `data` as any v1 request
    body, headers = wrap(event, model, answer)   # when `event` is not None
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from api.encoding import dumps
from api.errors import BadRequest
from api.rest.predictions import media_type_of

BINARY_HEADERS = ("ce-specversion", "ce-source", "ce-type", "ce-id")
STRUCTURED = "application/cloudevents+json"
# What makes a JSON body a structured event for KServe (`is_structured_cloudevent`).
STRUCTURED_KEYS = ("time", "type", "source", "id", "specversion", "data")
# The CloudEvents versions the SDK KServe uses reads (cloudevents.conversion).
SPEC_VERSIONS = frozenset(("1.0", "0.3"))


@dataclass(frozen=True, slots=True)
class Event:
    """How a request came as a CloudEvent: the mode to answer in, and its attributes."""

    binary: bool
    attributes: dict[str, Any]


def unwrap(headers: Mapping[str, str], request: Any) -> tuple[Any, Event | None]:
    """The v1 request inside a CloudEvent, and the event (None for a plain request).

    `headers` have lower-case names. A structured event is recognised by its keys, as KServe
    does; it is answered as one only when it was sent as `application/cloudevents+json`.
    """
    if all(name in headers for name in BINARY_HEADERS):
        attributes = {name[3:]: value for name, value in headers.items() if name[:3] == "ce-"}
        _check_specversion(attributes["specversion"])
        return request, Event(binary=True, attributes=attributes)
    structured = media_type_of(headers.get("content-type", "")).lower() == STRUCTURED
    attributes = {}
    if isinstance(request, dict) and all(key in request for key in STRUCTURED_KEYS):
        attributes = {key: value for key, value in request.items() if key != "data"}
        _check_specversion(attributes["specversion"])
        request = request["data"]
    return request, (Event(binary=False, attributes=attributes) if structured else None)


def _check_specversion(specversion: Any) -> None:
    """400 for an event of a CloudEvents version the SDK KServe uses does not know, as KServe
    answers it ("Cloud Event Exceptions: ..."), rather than an answer that repeats it."""
    if specversion not in SPEC_VERSIONS:
        raise BadRequest(f"Cloud Event Exceptions: Found invalid specversion {specversion}")


def wrap(event: Event, model: str, answer: Any) -> tuple[bytes, list[tuple[str, str]]]:
    """The answer as a CloudEvent in the request's mode: (body, headers)."""
    attributes: dict[str, Any] = {}
    if os.environ.get("CE_MERGE", "false").lower() == "true":
        dropped = ("id", "time", "datacontenttype") if event.binary else ("id", "time")
        attributes = {k: v for k, v in event.attributes.items() if k not in dropped}
    attributes.update(
        specversion=attributes.get("specversion", "1.0"),
        id=str(uuid.uuid4()),
        time=dt.datetime.now(dt.UTC).isoformat(),
        type=os.environ.get("CE_TYPE", "io.kserve.inference.response"),
        source=os.environ.get("CE_SOURCE", f"io.kserve.inference.{model}"),
    )
    if event.binary:
        headers = [(f"ce-{name}", str(value)) for name, value in attributes.items()]
        return dumps(answer), [("content-type", "application/json"), *headers]
    return dumps({**attributes, "data": answer}), [("content-type", STRUCTURED)]
