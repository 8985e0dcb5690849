"""TorchServe's lenient parsing of management query values (Java's parseInt/parseBoolean)."""

from __future__ import annotations

import pytest

from api.management.params import ListArgs, RegisterArgs, ScaleArgs, lenient_bool, lenient_int


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (None, None),
        ("", None),
        ("dd", None),
        ("nan", None),
        ("1.5", None),
        ("٣", None),  # a digit to str.isdigit, not to Java
        ("2147483648", None),  # past int32, as parseInt
        ("7", 7),
        ("+7", 7),
        ("-1", -1),
        (" 3 ", 3),
    ],
)
def test_lenient_int(text: str | None, value: int | None) -> None:
    assert lenient_int(text) == value


@pytest.mark.parametrize(
    ("text", "default", "value"),
    [
        (None, True, True),
        (None, False, False),
        ("true", False, True),
        ("TRUE", False, True),
        ("-1", True, False),
        ("Nan", True, False),
        ("", True, False),
        ("false", True, False),
    ],
)
def test_lenient_bool(text: str | None, default: bool, value: bool) -> None:
    assert lenient_bool(text, default) is value


def test_register_values_that_mean_the_default() -> None:
    args = RegisterArgs.from_query(
        url="m.mar",
        batch_size="dd",
        max_batch_delay="junk",
        initial_workers="-1",
        response_timeout="-1",
        startup_timeout="",
        synchronous="-1",
    )
    assert args == RegisterArgs(url="m.mar", initial_workers=-1, synchronous=False)
    assert RegisterArgs.from_query(url="m.mar", batch_size="0").batch_size is None
    assert RegisterArgs.from_query(url=None).synchronous is True


def test_scale_values() -> None:
    assert ScaleArgs.from_query(min_worker="abc", synchronous="Nan") == ScaleArgs()
    assert ScaleArgs.from_query(min_worker="2", max_worker="1", synchronous="true") == ScaleArgs(
        min_worker=2, max_worker=1, synchronous=True
    )


@pytest.mark.parametrize(
    ("limit", "token", "args"),
    [
        (None, None, ListArgs(100, 0)),
        ("", "", ListArgs(100, 0)),
        ("0", None, ListArgs(0, 0)),
        ("-1", "-1", ListArgs(100, 0)),
        ("101", "abc", ListArgs(100, 0)),
        ("1", "1", ListArgs(1, 1)),
    ],
)
def test_list_values(limit: str | None, token: str | None, args: ListArgs) -> None:
    assert ListArgs.from_query(limit=limit, next_page_token=token) == args
