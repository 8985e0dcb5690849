"""`api.core.types.Observers`: every observer sees every event; a failing one stays alone."""

from __future__ import annotations

import pytest

from api.core.types import InferenceRequest, NullObserver, Observer, Observers, Prediction


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def request_finished(
        self,
        request: InferenceRequest,
        model: str,
        version: str,
        status: int,
        latency_s: float,
        prediction: Prediction | None,
        shadow: bool = False,
    ) -> None:
        self.events.append(("finished", model, version, status, latency_s, shadow))

    def request_rejected(self, model: str, version: str, reason: str) -> None:
        self.events.append(("rejected", model, version, reason))

    def batch_finished(self, model: str, version: str, size: int, inference_s: float) -> None:
        self.events.append(("batch", model, version, size, inference_s))

    def queue_changed(self, model: str, version: str, depth: int) -> None:
        self.events.append(("queue", model, version, depth))


class Broken(NullObserver):
    def request_finished(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("bug in an observer")

    def batch_finished(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("bug in an observer")


def test_events_reach_every_observer_in_order_past_a_broken_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, last = Recorder(), Recorder()
    observers: Observer = Observers(first, Broken(), last)
    observers.request_finished(InferenceRequest({}), "m", "1", 200, 0.5, None, shadow=True)
    observers.request_rejected("m", "1", "queue_full")
    observers.batch_finished("m", "1", 4, 0.25)
    observers.queue_changed("m", "1", 3)

    expected = [
        ("finished", "m", "1", 200, 0.5, True),
        ("rejected", "m", "1", "queue_full"),
        ("batch", "m", "1", 4, 0.25),
        ("queue", "m", "1", 3),
    ]
    assert first.events == expected and last.events == expected
    assert [r.message.split(" failed in ")[1] for r in caplog.records] == [
        "request_finished",
        "batch_finished",
    ]
