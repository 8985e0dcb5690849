"""Management call arguments, parsed leniently as TorchServe 0.12 parses its query values.

TorchServe reads a number with `Integer.parseInt` and falls back to the parameter's default
when that fails (`batch_size=dd`, `limit=`), and a boolean with `Boolean.parseBoolean` (true
only for "true", any case: `synchronous=-1` is false). Clients and TorchServe's own regression
collection rely on both, so torchgate answers those calls as TorchServe does rather than 400.
`None` everywhere means "not given": the operation applies TorchServe's default.
"""

from __future__ import annotations

from dataclasses import dataclass


def lenient_int(value: str | None) -> int | None:
    """The integer `value` says, or None when absent or not an integer (Java's parseInt)."""
    if value is None:
        return None
    text = value.strip()
    if text[:1] in "+-":
        sign, digits = text[:1], text[1:]
    else:
        sign, digits = "", text
    if not digits.isascii() or not digits.isdigit():
        return None
    number = int(sign + digits)
    return number if -(2**31) <= number < 2**31 else None


def lenient_bool(value: str | None, default: bool) -> bool:
    """True only for "true" (any case) when given, as Java's parseBoolean; else `default`."""
    if value is None:
        return default
    return value.strip().lower() == "true"


def positive(value: int | None) -> int | None:
    """TorchServe's "-1 means the default": a value below 1 is not given."""
    return value if value is not None and value > 0 else None


@dataclass(frozen=True, slots=True)
class RegisterArgs:
    """POST /models (RegisterModel). Numbers below their minimum mean the default."""

    url: str | None
    model_name: str | None = None
    runtime: str | None = None
    handler: str | None = None
    batch_size: int | None = None
    max_batch_delay: int | None = None
    initial_workers: int | None = None
    response_timeout: int | None = None
    startup_timeout: int | None = None
    synchronous: bool = True

    @classmethod
    def from_query(
        cls,
        *,
        url: str | None,
        model_name: str | None = None,
        runtime: str | None = None,
        handler: str | None = None,
        batch_size: str | None = None,
        max_batch_delay: str | None = None,
        initial_workers: str | None = None,
        response_timeout: str | None = None,
        startup_timeout: str | None = None,
        synchronous: str | None = None,
    ) -> RegisterArgs:
        delay = lenient_int(max_batch_delay)
        timeout = lenient_int(response_timeout)
        startup = lenient_int(startup_timeout)
        return cls(
            url=url,
            model_name=model_name or None,
            runtime=runtime,
            handler=handler or None,
            batch_size=positive(lenient_int(batch_size)),
            max_batch_delay=delay if delay is not None and delay >= 0 else None,
            # Negative initial workers register with none, as 0 does.
            initial_workers=lenient_int(initial_workers),
            response_timeout=timeout if timeout is not None and timeout >= 0 else None,
            startup_timeout=startup if startup is not None and startup >= 0 else None,
            synchronous=lenient_bool(synchronous, True),
        )


@dataclass(frozen=True, slots=True)
class ScaleArgs:
    """PUT /models/{name}[/{version}] (ScaleWorker): min_worker 1 and max_worker min_worker
    when not given, asynchronous unless asked. batch_size / max_batch_delay are torchgate's
    own (TorchServe ignores them there)."""

    min_worker: int | None = None
    max_worker: int | None = None
    synchronous: bool = False
    batch_size: int | None = None
    max_batch_delay: int | None = None
    # Accepted as TorchServe accepts them, with a warning: devices come from number_of_gpu,
    # and scaling down waits for a worker's current batch, not `timeout`.
    number_gpu: str | None = None
    timeout: str | None = None

    @classmethod
    def from_query(
        cls,
        *,
        min_worker: str | None = None,
        max_worker: str | None = None,
        synchronous: str | None = None,
        batch_size: str | None = None,
        max_batch_delay: str | None = None,
        number_gpu: str | None = None,
        timeout: str | None = None,
    ) -> ScaleArgs:
        delay = lenient_int(max_batch_delay)
        return cls(
            min_worker=lenient_int(min_worker),
            max_worker=lenient_int(max_worker),
            synchronous=lenient_bool(synchronous, False),
            batch_size=positive(lenient_int(batch_size)),
            max_batch_delay=delay if delay is not None and delay >= 0 else None,
            number_gpu=number_gpu,
            timeout=timeout,
        )


@dataclass(frozen=True, slots=True)
class ListArgs:
    """GET /models (ListModels): pages of `limit` (100 when absent, negative or above 100;
    0 is an empty page) from `next_page_token` (0 when absent or negative)."""

    limit: int = 100
    next_page_token: int = 0

    @classmethod
    def from_query(
        cls, *, limit: str | None = None, next_page_token: str | None = None
    ) -> ListArgs:
        return cls.of(lenient_int(limit), lenient_int(next_page_token))

    @classmethod
    def of(cls, limit: int | None, next_page_token: int | None) -> ListArgs:
        if limit is None or limit < 0 or limit > 100:
            limit = 100
        return cls(limit, max(next_page_token or 0, 0))
