"""Traffic policies and the router: weights, sticky users, shadows, validation, guards.

Statistical checks use a binomial bound of 5 standard deviations (a false failure about once in
1.7 million runs); the router's random source is seeded, so each run is also reproducible.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from api.core.dataplane import DataPlane
from api.core.registry import ModelState, Registry
from api.core.routing import Choice, Shadow, TrafficPolicy, TrafficRouter, _uniform
from api.core.sequences import SEQUENCE_ID
from api.core.streaming import PredictionStream
from api.core.types import Backend, InferenceRequest, ModelSettings, NullObserver, Prediction
from api.errors import BadRequest, Conflict, ModelNotFound, VersionNotFound
from tests.support import aio
from tests.support.echo_backend import EchoBackend
from tests.support.echo_backend import factory as echo_factory
from tests.support.fake_backend import FakeBackend
from tests.support.stats import within_binomial

IDS = [f"user-{i}" for i in range(10_000)]


run = functools.partial(aio.run, timeout=10)


def factory(backend: FakeBackend) -> Callable[[], Awaitable[Backend]]:
    async def make() -> Backend:
        return backend

    return make


async def registry_with(model: str, *versions: str) -> Registry:
    registry = Registry()
    for version in versions:
        backend = FakeBackend(model, version)
        await registry.register(
            model, version, f"{model}-{version}.mar", factory(backend), ModelSettings()
        )
    return registry


def router_for(*versions: str, seed: int = 1) -> TrafficRouter:
    """A router over model "m" with the given versions (the first is the default)."""

    async def make() -> TrafficRouter:
        return TrafficRouter(await registry_with("m", *versions), rng=random.Random(seed))

    # Choosing needs no event loop; the registry only needed one to start (and keep) workers.
    router: TrafficRouter = run(make())
    return router


# -- weights ------------------------------------------------------------------------------------


def test_without_a_policy_the_default_version_answers() -> None:
    router = router_for("1.0", "2.0")
    assert router.choose("m", {}) == Choice("1.0")
    router.registry.set_default("m", "2.0")
    assert router.choose("m", {"x-user-id": "u"}) == Choice("2.0")
    with pytest.raises(ModelNotFound):
        router.choose("nope", {})


def test_weights_split_10000_requests_within_five_sigma() -> None:
    router = router_for("1.0", "2.0")
    router.set_policy("m", TrafficPolicy({"1.0": 90, "2.0": 10}, sticky_header=None))
    counts = Counter(router.choose("m", {}).version for _ in range(10_000))
    assert set(counts) == {"1.0", "2.0"}
    # 10,000 draws at p = 0.1: mean 1,000, sd 30, so 850..1,150.
    assert within_binomial(counts["2.0"], 10_000, 0.10), counts


def test_sticky_ids_spread_by_weight_within_five_sigma() -> None:
    policy = TrafficPolicy({"1.0": 90, "2.0": 10})
    counts = Counter(policy.sticky_version(i) for i in IDS)
    assert within_binomial(counts["2.0"], len(IDS), 0.10), counts


def test_hash_uniforms_stay_strictly_inside_zero_one() -> None:
    # log(0) and log(1) would break the scores; the extreme digests must not produce them.
    for digest in (b"\x00" * 8, b"\xff" * 8):
        assert 0.0 < _uniform(digest) < 1.0
        assert math.isfinite(math.log(_uniform(digest))) and math.log(_uniform(digest)) < 0


def test_weights_are_relative_and_zero_gets_nothing() -> None:
    router = router_for("1.0", "2.0", "3.0")
    router.set_policy("m", TrafficPolicy({"1.0": 1, "2.0": 3, "3.0": 0}, sticky_header=None))
    counts = Counter(router.choose("m", {}).version for _ in range(10_000))
    assert counts["3.0"] == 0
    assert within_binomial(counts["2.0"], 10_000, 0.75), counts


def test_rollback_to_100_0_applies_to_the_next_request() -> None:
    router = router_for("1.0", "2.0")
    router.set_policy("m", TrafficPolicy({"1.0": 50, "2.0": 50}))
    assert {router.choose("m", {"x-user-id": i}).version for i in IDS[:200]} == {"1.0", "2.0"}
    router.set_policy("m", TrafficPolicy({"1.0": 100, "2.0": 0}))
    assert {router.choose("m", {"x-user-id": i}).version for i in IDS} == {"1.0"}
    assert {router.choose("m", {}).version for _ in range(1000)} == {"1.0"}


def test_a_version_that_cannot_serve_passes_its_share_to_the_ready_ones() -> None:
    """A weighted version whose TorchServe is down (or that has no live worker) is not sent
    requests that would get 503: the ready versions take them by their weights, sticky users
    too (each pinned to their next best), and each comes back to its own version once it is
    ready again."""
    router = router_for("1.0", "2.0", "3.0")
    router.set_policy("m", TrafficPolicy({"1.0": 1, "2.0": 2, "3.0": 1}))
    sticky = {i: router.choose("m", {"x-user-id": i}).version for i in IDS[:2000]}
    down = router.registry.get("m", "2.0")
    down.backend.unavailable = "TorchServe at http://ts:8080 is unreachable"  # type: ignore[attr-defined]
    counts = Counter(router.choose("m", {}).version for _ in range(10_000))
    assert counts["2.0"] == 0
    assert within_binomial(counts["1.0"], 10_000, 0.5), counts
    moved = {i: router.choose("m", {"x-user-id": i}).version for i in IDS[:2000]}
    assert all(moved[i] == v for i, v in sticky.items() if v != "2.0")  # the others stay
    displaced = [i for i, v in sticky.items() if v == "2.0"]
    assert {moved[i] for i in displaced} == {"1.0", "3.0"}
    # Each displaced user stays on one version while theirs is down (their next best by the
    # same hashing), not a new draw per request; and they spread by the others' weights.
    again = {i: router.choose("m", {"x-user-id": i}).version for i in displaced}
    assert again == {i: moved[i] for i in displaced}
    share = sum(moved[i] == "1.0" for i in displaced)
    assert within_binomial(share, len(displaced), 0.5), share
    down.backend.unavailable = None  # type: ignore[attr-defined]
    assert {i: router.choose("m", {"x-user-id": i}).version for i in IDS[:2000]} == sticky


# -- sticky assignment --------------------------------------------------------------------------


def test_sticky_ids_never_flip_while_weights_are_unchanged() -> None:
    router = router_for("1.0", "2.0", "3.0")
    router.set_policy("m", TrafficPolicy({"1.0": 50, "2.0": 30, "3.0": 20}))
    first = {i: router.choose("m", {"x-user-id": i}).version for i in IDS}
    for _ in range(3):
        assert {i: router.choose("m", {"x-user-id": i}).version for i in IDS} == first
    # Setting an equal policy again (a new object) changes nobody either.
    router.set_policy("m", TrafficPolicy({"1.0": 50, "2.0": 30, "3.0": 20}))
    assert {i: router.choose("m", {"x-user-id": i}).version for i in IDS} == first
    assert set(first.values()) == {"1.0", "2.0", "3.0"}


def test_raising_a_weight_moves_users_only_into_that_version() -> None:
    before = TrafficPolicy({"1.0": 90, "2.0": 10})
    after = TrafficPolicy({"1.0": 90, "2.0": 20})  # 10% -> 18.2%
    moved = 0
    for i in IDS:
        old, new = before.sticky_version(i), after.sticky_version(i)
        if old != new:
            assert (old, new) == ("1.0", "2.0"), i
            moved += 1
    # A user of 1.0 moves with probability P(2.0 | after) - P(2.0 | before).
    assert within_binomial(moved, len(IDS), 20 / 110 - 10 / 100), moved


def test_raising_one_of_three_weights_never_moves_users_between_the_others() -> None:
    before = TrafficPolicy({"1.0": 60, "2.0": 30, "3.0": 10})
    after = TrafficPolicy({"1.0": 60, "2.0": 30, "3.0": 20})
    moves = Counter(
        (before.sticky_version(i), after.sticky_version(i))
        for i in IDS
        if before.sticky_version(i) != after.sticky_version(i)
    )
    assert moves and set(moves) <= {("1.0", "3.0"), ("2.0", "3.0")}, moves
    # Lowering it back is the mirror image: users only leave 3.0.
    back = {(after.sticky_version(i), before.sticky_version(i)) for i in IDS}
    assert {(a, b) for a, b in back if a != b} <= {("3.0", "1.0"), ("3.0", "2.0")}


def test_adding_a_version_only_takes_users_from_the_others() -> None:
    before = TrafficPolicy({"1.0": 50, "2.0": 50})
    after = TrafficPolicy({"1.0": 50, "2.0": 50, "3.0": 10})
    for i in IDS:
        new = after.sticky_version(i)
        assert new in (before.sticky_version(i), "3.0")


def test_sticky_header_is_case_insensitive_and_configurable() -> None:
    router = router_for("1.0", "2.0")
    router.set_policy("m", TrafficPolicy({"1.0": 50, "2.0": 50}, sticky_header="X-Session"))
    for i in IDS[:200]:
        expected = router.choose("m", {"x-session": i}).version
        assert router.choose("m", {"X-Session": i}).version == expected
        assert router.choose("m", {"X-SESSION": i, "x-user-id": "ignored"}).version == expected
    # Without the header, requests are split at random: both versions come up.
    assert {router.choose("m", {"x-user-id": "u"}).version for _ in range(200)} == {"1.0", "2.0"}


def test_sticky_header_none_splits_every_request_at_random() -> None:
    router = router_for("1.0", "2.0")
    router.set_policy("m", TrafficPolicy({"1.0": 50, "2.0": 50}, sticky_header=None))
    assert {router.choose("m", {"x-user-id": "u"}).version for _ in range(200)} == {"1.0", "2.0"}


@pytest.mark.parametrize("sticky_header", ["X-User-Id", None])
def test_a_sequence_stays_on_one_version_whatever_its_other_headers(
    sticky_header: str | None,
) -> None:
    """A stateful handler keeps a sequence's state in one version: a step routed to another
    would silently start the sequence afresh there, under the same id."""
    router = router_for("1.0", "2.0", "3.0")
    weights = {"1.0": 50, "2.0": 25, "3.0": 25}
    router.set_policy("m", TrafficPolicy(weights, sticky_header=sticky_header))
    users = ("", "a", "b", "c", "d", "e")  # steps with and without the sticky header
    for i in IDS[:200]:
        steps = [{SEQUENCE_ID: i, "x-user-id": user} for user in users] + [{SEQUENCE_ID: i}] * 10
        assert len({router.choose("m", headers).version for headers in steps}) == 1, i
    counts = Counter(router.choose("m", {SEQUENCE_ID: i}).version for i in IDS)
    assert within_binomial(counts["1.0"], len(IDS), 0.5), counts
    # While its version cannot serve, a sequence goes on one other version, not a new draw.
    router.registry.get("m", "2.0").state = ModelState.FAILED
    for i in IDS[:200]:
        versions = {router.choose("m", {SEQUENCE_ID: i}).version for _ in range(10)}
        assert len(versions) == 1 and versions != {"2.0"}, i


@pytest.mark.parametrize("blank", ["", " ", "\t "])
def test_a_blank_sticky_value_is_no_id(blank: str) -> None:
    # Hashed, a blank value would pin every client that sends one to the same version.
    router = router_for("1.0", "2.0")
    router.set_policy("m", TrafficPolicy({"1.0": 50, "2.0": 50}))
    versions = {router.choose("m", {"x-user-id": blank}).version for _ in range(200)}
    assert versions == {"1.0", "2.0"}


# -- shadow -------------------------------------------------------------------------------------


def test_shadow_copies_its_share_of_requests() -> None:
    router = router_for("1.0", "2.0")
    router.set_policy("m", TrafficPolicy({"1.0": 100}, shadow=Shadow("2.0", 10)))
    choices = [router.choose("m", {}) for _ in range(10_000)]
    assert {c.version for c in choices} == {"1.0"}
    shadowed = sum(1 for c in choices if c.shadows == ("2.0",))
    assert within_binomial(shadowed, 10_000, 0.10), shadowed


def test_shadow_is_not_copied_to_the_version_that_answers() -> None:
    router = router_for("1.0", "2.0")
    router.set_policy("m", TrafficPolicy({"1.0": 50, "2.0": 50}, shadow=Shadow("2.0", 100)))
    for i in IDS[:500]:
        choice = router.choose("m", {"x-user-id": i})
        assert choice.shadows == (() if choice.version == "2.0" else ("2.0",))


def test_shadow_percent_zero_copies_nothing() -> None:
    router = router_for("1.0", "2.0")
    router.set_policy("m", TrafficPolicy({"1.0": 1}, shadow=Shadow("2.0", 0)))
    assert all(router.choose("m", {}).shadows == () for _ in range(1000))


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"weights": {"1.0": -1, "2.0": 5}},
        {"weights": {"1.0": 0, "2.0": 0}},
        {"weights": {}},
        {"weights": {"1.0": "ten"}},
        {"weights": {"1.0": True}},
        {"weights": {"1.0": float("nan")}},
        {"weights": {"1.0": 1e308, "2.0": 1e308}},  # each finite, the sum is not
        {"weights": [["1.0", 1]]},
        {"weights": {"1.0": 1}, "sticky_header": "X User"},
        {"weights": {"1.0": 1}, "sticky_header": 7},
        {"weights": {"1.0": 1}, "sticky_header": ""},  # not read as null: it looks sticky
        {"weights": {"1.0": 1}, "shadow": {"version": "2.0", "percent": 101}},
        {"weights": {"1.0": 1}, "shadow": {"version": "2.0", "percent": -1}},
        {"weights": {"1.0": 1}, "shadow": {"version": "", "percent": 5}},
        {"weights": {"1.0": 1}, "shadow": "2.0"},
        {"weights": {"1.0": 1}, "stickyHeader": "X-User-Id"},
        [1, 2],
    ],
)
def test_malformed_policies_are_bad_requests(data: Any) -> None:
    with pytest.raises(BadRequest):
        TrafficPolicy.from_json(data)


def test_json_round_trip_and_defaults() -> None:
    policy = TrafficPolicy.from_json({"weights": {"1.0": 95, "2.0": 5}})
    assert policy.sticky_header == "X-User-Id" and policy.shadow is None
    full = {
        "weights": {"1.0": 95.0, "2.0": 5.0},
        "sticky_header": "X-Tenant",
        "shadow": {"version": "3.0", "percent": 12.5},
    }
    assert TrafficPolicy.from_json(full).to_json() == full
    assert TrafficPolicy.from_json({**full, "sticky_header": None}).sticky_header is None


def test_a_policy_must_name_registered_ready_versions() -> None:
    router = router_for("1.0", "2.0")
    with pytest.raises(ModelNotFound):
        router.set_policy("nope", TrafficPolicy({"1.0": 1}))
    with pytest.raises(VersionNotFound):
        router.set_policy("m", TrafficPolicy({"1.0": 90, "9.9": 10}))
    with pytest.raises(VersionNotFound):
        router.set_policy("m", TrafficPolicy({"1.0": 1}, shadow=Shadow("9.9", 5)))
    router.registry.get("m", "2.0").state = ModelState.FAILED
    with pytest.raises(Conflict):
        router.set_policy("m", TrafficPolicy({"1.0": 90, "2.0": 10}))
    with pytest.raises(Conflict):
        router.set_policy("m", TrafficPolicy({"1.0": 1}, shadow=Shadow("2.0", 5)))
    # A version that gets no traffic need not be ready.
    router.set_policy("m", TrafficPolicy({"1.0": 100, "2.0": 0}))
    assert router.policy("m") == TrafficPolicy({"1.0": 100, "2.0": 0})


def test_a_restored_policy_stands_while_its_versions_are_not_ready() -> None:
    """At start-up (a snapshot, torchgate.traffic) a version may still be starting, retrying a
    failed first start or scaled to 0: its policy stands, and serves it once it is ready."""
    router = router_for("1.0", "2.0")
    not_yet = router.registry.get("m", "2.0")
    not_yet.state = ModelState.FAILED
    policy = TrafficPolicy({"1.0": 50, "2.0": 50}, sticky_header=None, shadow=Shadow("2.0", 5))
    assert router.restore_policy("m", policy) == policy
    assert router.policy("m") == policy
    assert {router.choose("m", {}).version for _ in range(200)} == {"1.0"}
    not_yet.state = ModelState.READY
    assert {router.choose("m", {}).version for _ in range(200)} == {"1.0", "2.0"}


def test_a_restored_policy_leaves_out_missing_versions_without_traffic() -> None:
    # Versions that failed to load: without traffic they leave it, as when unregistered.
    router = router_for("1.0", "2.0")
    saved = TrafficPolicy({"1.0": 100, "2.0": 0, "9.9": 0}, shadow=Shadow("8.8", 0))
    assert router.restore_policy("m", saved) == TrafficPolicy({"1.0": 100, "2.0": 0})
    assert router.policy("m") == TrafficPolicy({"1.0": 100, "2.0": 0})
    with pytest.raises(VersionNotFound):
        router.restore_policy("m", TrafficPolicy({"1.0": 90, "9.9": 10}))
    with pytest.raises(VersionNotFound):
        router.restore_policy("m", TrafficPolicy({"1.0": 1}, shadow=Shadow("9.9", 5)))
    with pytest.raises(ModelNotFound):
        router.restore_policy("nope", TrafficPolicy({"1.0": 1}))
    assert router.policy("m") == TrafficPolicy({"1.0": 100, "2.0": 0})


def test_policy_changes_are_announced() -> None:
    router = router_for("1.0", "2.0")
    calls: list[str] = []
    router.on_change.append(lambda: calls.append("changed"))
    router.set_policy("m", TrafficPolicy({"1.0": 1}))
    assert router.clear_policy("m") == TrafficPolicy({"1.0": 1})
    assert router.clear_policy("m") is None  # nothing to clear: nothing announced
    assert calls == ["changed", "changed"]
    assert router.choose("m", {}) == Choice("1.0")


# -- guarding versions that carry traffic -------------------------------------------------------


def test_a_version_with_traffic_cannot_be_unregistered_until_the_policy_changes() -> None:
    async def scenario() -> None:
        registry = await registry_with("m", "1.0", "2.0", "3.0")
        router = TrafficRouter(registry)
        router.set_policy("m", TrafficPolicy({"1.0": 90, "2.0": 10}, shadow=Shadow("3.0", 5)))
        for version in ("2.0", "3.0"):
            with pytest.raises(Conflict):
                await registry.unregister("m", version)
        assert [v.version for v in registry.versions("m")] == ["1.0", "2.0", "3.0"]
        assert registry.get("m", "2.0").ready

        router.set_policy("m", TrafficPolicy({"1.0": 100, "2.0": 0}, shadow=Shadow("3.0", 0)))
        await registry.unregister("m", "2.0")  # weight 0: may go, and leaves the policy
        await registry.unregister("m", "3.0")  # a shadow at 0 % carries nothing either
        assert router.policy("m") == TrafficPolicy({"1.0": 100})

    run(scenario())


# -- through the dataplane ----------------------------------------------------------------------


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.finished: list[tuple[str, int, bool]] = []

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
        self.finished.append((version, status, shadow))


def test_an_explicit_version_wins_over_the_policy() -> None:
    async def scenario() -> None:
        registry = await registry_with("m", "1.0", "2.0")
        router = TrafficRouter(registry)
        router.set_policy("m", TrafficPolicy({"2.0": 1}))
        dataplane = DataPlane(registry, router=router)
        routed = await dataplane.infer("m", None, InferenceRequest({"body": b""}))
        pinned = await dataplane.infer("m", "1.0", InferenceRequest({"body": b""}))
        assert routed.prediction.body["version"] == "2.0"
        assert pinned.prediction.body["version"] == "1.0"

    run(scenario())


def test_a_stuck_shadow_never_delays_the_primary() -> None:
    async def scenario() -> None:
        registry = await registry_with("m", "1.0", "2.0")
        shadow_backend = registry.get("m", "2.0").backend
        assert isinstance(shadow_backend, FakeBackend)
        shadow_backend.gate = asyncio.Event()  # the shadow's batches wait until this is set
        router = TrafficRouter(registry)
        router.set_policy("m", TrafficPolicy({"1.0": 1}, shadow=Shadow("2.0", 100)))
        recorder = Recorder()
        dataplane = DataPlane(registry, router=router, observer=recorder)

        answers = [
            await dataplane.infer("m", None, InferenceRequest({"body": i})) for i in range(5)
        ]
        # Every primary answered while the shadow has not finished one request.
        assert [a.prediction.body for a in answers] == [
            {"model": "m", "version": "1.0", "body": i} for i in range(5)
        ]
        assert recorder.finished == [("1.0", 200, False)] * 5

        shadow_backend.gate.set()
        await registry.close()  # drains the shadow's queue
        await asyncio.gather(*dataplane._shadow_tasks)
        assert sorted(recorder.finished) == [("1.0", 200, False)] * 5 + [("2.0", 200, True)] * 5

    run(scenario())


def test_a_failing_shadow_never_fails_the_primary() -> None:
    async def scenario() -> None:
        registry = await registry_with("m", "1.0", "2.0")
        registry.get("m", "2.0").backend.fail = True  # type: ignore[attr-defined]
        router = TrafficRouter(registry)
        router.set_policy("m", TrafficPolicy({"1.0": 1}, shadow=Shadow("2.0", 100)))
        recorder = Recorder()
        dataplane = DataPlane(registry, router=router, observer=recorder)
        for i in range(5):
            answer = await dataplane.infer("m", None, InferenceRequest({"body": i}))
            assert answer.prediction.ok and answer.prediction.body["version"] == "1.0"
        await registry.close()
        await asyncio.gather(*dataplane._shadow_tasks)
        shadow = [f for f in recorder.finished if f[2]]
        assert shadow == [("2.0", 500, True)] * 5

    run(scenario())


def test_shadow_copies_leave_half_the_shadow_versions_queue_to_its_own_requests() -> None:
    """The shadow version may carry weight too, or be named: copies filling its queue would
    get its own requests refused (503). Past half full, a copy is dropped (a shadow 503)."""

    async def scenario() -> None:
        registry = Registry()
        for version in ("1.0", "2.0"):
            backend = FakeBackend("m", version)
            settings = ModelSettings(job_queue_size=4)
            await registry.register("m", version, "m.mar", factory(backend), settings)
        shadow_backend = registry.get("m", "2.0").backend
        assert isinstance(shadow_backend, FakeBackend)
        shadow_backend.gate = asyncio.Event()  # 2.0 holds every batch: its queue fills up
        router = TrafficRouter(registry)
        router.set_policy("m", TrafficPolicy({"1.0": 1}, shadow=Shadow("2.0", 100)))
        recorder = Recorder()
        dataplane = DataPlane(registry, router=router, observer=recorder)
        for i in range(10):
            await dataplane.infer("m", None, InferenceRequest({"body": i}))
        for _ in range(5):
            await asyncio.sleep(0)  # every copy queued or dropped by now
        assert registry.get("m", "2.0").batcher.depth == 2  # half of 4: no more copies

        own = asyncio.ensure_future(dataplane.infer("m", "2.0", InferenceRequest({"body": "own"})))
        await asyncio.sleep(0)
        shadow_backend.gate.set()
        answer = await own
        assert answer.prediction.ok and answer.prediction.body["version"] == "2.0"
        await registry.close()
        await asyncio.gather(*dataplane._shadow_tasks)
        shadows = Counter(f for f in recorder.finished if f[2])
        # One copy runs, 2 wait in the queue, the other 7 are dropped.
        assert shadows == {("2.0", 200, True): 3, ("2.0", 503, True): 7}, shadows

    run(scenario())


def test_a_shadow_never_streams_into_the_primary() -> None:
    async def scenario() -> None:
        registry = Registry()
        for version in ("1.0", "2.0"):  # both stream: two parts before each answer
            backend = EchoBackend(version, parts=2)
            await registry.register("m", version, "m.mar", echo_factory(backend), ModelSettings())
        router = TrafficRouter(registry)
        router.set_policy("m", TrafficPolicy({"1.0": 1}, shadow=Shadow("2.0", 100)))
        dataplane = DataPlane(registry, router=router)
        parts: list[object] = []

        async def send_part(prediction: Prediction) -> None:
            parts.append(prediction.body)

        request = InferenceRequest({"body": 1})
        answer = await PredictionStream(request, send_part).run(
            lambda item: dataplane.infer("m", None, item)
        )
        await registry.close()
        await asyncio.gather(*dataplane._shadow_tasks)  # the shadow has streamed too, by now
        assert answer.prediction.body == {"version": "1.0", "body": 1}
        assert parts == [{"version": "1.0", "part": 0}, {"version": "1.0", "part": 1}]

    run(scenario())
