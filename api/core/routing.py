"""Traffic policies: which version answers a request that names none.

A model without a policy is served by its default version, as in TorchServe. A `TrafficPolicy`
splits its traffic by weight over versions (A/B 50/50, canary 95/5, rollback 100/0), optionally
sticky by a request header, and optionally copies a share of requests to a shadow version.

Sticky assignment uses weighted rendezvous (highest-random-weight) hashing: for a sticky id `k`
each version `v` with weight `w_v > 0` scores

    score(k, v) = -w_v / ln(u(k, v)),    u(k, v) uniform in (0, 1), a hash of (k, v)

and the highest score wins. `-ln(u) / w_v` is exponential with rate `w_v`, so the winner is `v`
with probability `w_v / sum(w)` (the smallest of independent exponentials). A version's score
depends only on its own weight, so raising one weight can only make that version win where it
lost before: users move only into the version whose weight grew, never between the others; and
lowering a weight moves users only out of that version. Ids are hashed, never stored.

A request of a sequence (TorchServe's `ts_request_sequence_id` header) is sticky by its sequence
id, whatever the sticky header: a stateful handler keeps a sequence's state in the version that
began it, and another version would silently start the sequence afresh under the same id.
Requests with neither id (or a blank sticky value) are split at random by weight. An explicit
version in the request never reaches the router (see `DataPlane.infer`).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import random
import string
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, overload

from api.core.registry import Registry
from api.core.sequences import SEQUENCE_ID
from api.core.types import header_value
from api.errors import BadRequest, Conflict, TorchgateError, VersionNotFound

DEFAULT_STICKY_HEADER = "X-User-Id"


class Router(Protocol):
    """Picks the version that answers a request that names none; called once per request."""

    def choose(self, model: str, headers: Mapping[str, str]) -> Choice: ...


@dataclass(frozen=True, slots=True)
class Choice:
    version: str
    # Versions that also get a copy of the request; their answers are recorded, then dropped.
    shadows: tuple[str, ...] = ()


_TWO_52 = float(2**52)


@dataclass(frozen=True, slots=True)
class Shadow:
    """Copy `percent` % of a model's routed requests to `version`; its answers are dropped."""

    version: str
    percent: float


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """How a model's unversioned requests are spread over its versions.

    `weights` are relative (they need not sum to 100); a version with weight 0 gets no traffic.
    `sticky_header` names the request header whose value keeps a user on one version (None:
    every request is split at random, but for requests of a sequence).
    """

    weights: Mapping[str, float]
    sticky_header: str | None = DEFAULT_STICKY_HEADER
    shadow: Shadow | None = None
    # Derived from `weights`, for the hot path.
    _versions: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _encoded: tuple[bytes, ...] = field(init=False, repr=False, compare=False)
    _weights: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _cumulative: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _header_key: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        weights: dict[str, float] = {}
        for version, weight in self.weights.items():
            if not isinstance(version, str) or not version:
                raise BadRequest(
                    f"traffic weights: a version must be a non-empty string, got {version!r}"
                )
            number = _number(weight, f"traffic weight of version {version}")
            if number < 0:
                raise BadRequest(f"traffic weight of version {version} is negative: {weight}")
            weights[version] = number
        total = sum(weights.values())
        if not total > 0:
            raise BadRequest("traffic weights must sum to more than 0")
        if not math.isfinite(total):
            # Each weight is finite, but an infinite sum would skew every random pick.
            raise BadRequest("traffic weights are too large: their sum is not a finite number")
        if self.sticky_header is not None and not _is_token(self.sticky_header):
            raise BadRequest(
                f"sticky_header is not a valid header name: {self.sticky_header!r} "
                f"(null turns sticking off)"
            )
        if self.shadow is not None:
            percent = _number(self.shadow.percent, "shadow percent")
            if not 0 <= percent <= 100:
                raise BadRequest(f"shadow percent must be within 0..100, got {percent:g}")
        live = tuple(v for v, w in weights.items() if w > 0)
        cumulative, total = [], 0.0
        for version in live:
            total += weights[version]
            cumulative.append(total)
        set_ = object.__setattr__  # frozen: derived fields are set once, here
        set_(self, "weights", weights)
        set_(self, "_versions", live)
        set_(self, "_encoded", tuple(v.encode() for v in live))
        set_(self, "_weights", tuple(weights[v] for v in live))
        set_(self, "_cumulative", tuple(cumulative))
        header = self.sticky_header
        set_(self, "_header_key", None if header is None else header.lower())

    # -- wire form ------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: Any) -> TrafficPolicy:
        """Read the JSON form (see `to_json`); raises BadRequest when it is malformed."""
        if not isinstance(data, Mapping):
            raise BadRequest("a traffic policy must be a JSON object")
        unknown = set(data) - {"weights", "sticky_header", "shadow"}
        if unknown:
            raise BadRequest(f"unknown traffic policy field(s): {', '.join(sorted(unknown))}")
        weights = data.get("weights")
        if not isinstance(weights, Mapping) or not weights:
            raise BadRequest('a traffic policy needs "weights": {"<version>": <weight>, ...}')
        sticky = data.get("sticky_header", DEFAULT_STICKY_HEADER)
        if sticky is not None and not isinstance(sticky, str):
            raise BadRequest("sticky_header must be a header name or null")
        shadow_data = data.get("shadow")
        shadow = None
        if shadow_data is not None:
            if not isinstance(shadow_data, Mapping) or set(shadow_data) - {"version", "percent"}:
                raise BadRequest('shadow must be {"version": "<version>", "percent": <0..100>}')
            version = shadow_data.get("version")
            if not isinstance(version, str) or not version:
                raise BadRequest("shadow.version must be a version string")
            shadow = Shadow(version, _number(shadow_data.get("percent", 100), "shadow percent"))
        # An empty name is refused (by __post_init__), not read as null: it looks like sticking.
        return cls(dict(weights), sticky, shadow)

    def to_json(self) -> dict[str, Any]:
        """`{"weights": {...}, "sticky_header": str | null, "shadow": {...} | null}`."""
        return {
            "weights": dict(self.weights),
            "sticky_header": self.sticky_header,
            "shadow": (
                None
                if self.shadow is None
                else {"version": self.shadow.version, "percent": self.shadow.percent}
            ),
        }

    # -- questions ------------------------------------------------------------------------------

    def versions_with_traffic(self) -> set[str]:
        """Versions this policy sends requests to: weight > 0, or the shadow."""
        carried = set(self._versions)
        if self.shadow is not None and self.shadow.percent > 0:
            carried.add(self.shadow.version)
        return carried

    def versions_named(self) -> set[str]:
        """Every version this policy names, with traffic or not."""
        named = set(self.weights)
        if self.shadow is not None:
            named.add(self.shadow.version)
        return named

    def without(self, versions: Collection[str]) -> TrafficPolicy:
        """This policy less `versions`, which carry none of its traffic (weight 0, a 0 % shadow):
        the same routing, naming only versions that are there."""
        if not versions:
            return self
        weights = {v: w for v, w in self.weights.items() if v not in versions}
        shadow = self.shadow
        if shadow is not None and shadow.version in versions:
            shadow = None
        return TrafficPolicy(weights, self.sticky_header, shadow)

    def pick(self, headers: Mapping[str, str], rng: random.Random) -> str:
        """The version for one request (sticky when it carries a sequence id or the sticky
        header)."""
        if len(self._versions) == 1:
            return self._versions[0]
        sticky_id = self._sticky_id(headers)
        if sticky_id is not None:
            return self.sticky_version(sticky_id)
        point = rng.random() * self._cumulative[-1]
        index = bisect.bisect_right(self._cumulative, point)
        return self._versions[min(index, len(self._versions) - 1)]

    def pick_among(
        self, headers: Mapping[str, str], usable: Callable[[str], bool], rng: random.Random
    ) -> str | None:
        """A version among those `usable` accepts (None if it accepts none): where a request
        goes while the version `pick` gave it cannot serve. A sticky user gets the best of them
        by the same hashing, so stays on one version until theirs is back; others go by weight."""
        sticky_id = self._sticky_id(headers)
        if sticky_id is not None:
            return self.sticky_version(sticky_id, usable)
        chosen = [(v, w) for v, w in zip(self._versions, self._weights, strict=True) if usable(v)]
        if not chosen:
            return None
        point = rng.random() * sum(weight for _, weight in chosen)
        for version, weight in chosen:
            point -= weight
            if point < 0:
                return version
        return chosen[-1][0]

    def _sticky_id(self, headers: Mapping[str, str]) -> str | None:
        """The id that keeps this request on one version; None when it has none.

        A sequence id first (see the module docstring): any non-empty value, as the sequence
        batcher reads it. Then the sticky header's value, unless blank: hashed, a blank value
        would pin every client that sends one to the same version.
        """
        # Looked up by its lower-case name only, as every transport passes names
        # (`header_dict`, `metadata_headers`): a case-blind search on every request without a
        # sequence, the common case, would cost more than the rest of routing.
        sequence_id = headers.get(SEQUENCE_ID)
        if sequence_id:
            return sequence_id
        if self._header_key is None:
            return None
        user_id = header_value(headers, self._header_key)
        if not user_id or user_id.isspace():
            return None
        return user_id

    @overload
    def sticky_version(self, sticky_id: str) -> str: ...
    @overload
    def sticky_version(self, sticky_id: str, usable: Callable[[str], bool]) -> str | None: ...
    def sticky_version(
        self, sticky_id: str, usable: Callable[[str], bool] | None = None
    ) -> str | None:
        """The version weighted rendezvous hashing gives `sticky_id` (see the module docstring),
        among those `usable` accepts when given (None if it accepts none). Leaving versions out
        only takes their users elsewhere: the others' scores, so their users, stay the same."""
        best, best_score = None, -1.0
        hashed_id = hashlib.blake2b(
            sticky_id.encode("utf-8", "surrogatepass") + b"\x00", digest_size=8
        )
        for version, encoded, weight in zip(
            self._versions, self._encoded, self._weights, strict=True
        ):
            if usable is not None and not usable(version):
                continue
            per_version = hashed_id.copy()
            per_version.update(encoded)
            score = -weight / math.log(_uniform(per_version.digest()))
            if score > best_score:
                best, best_score = version, score
        return best


class TrafficRouter:
    """Implements `api.core.dataplane.Router` with one optional `TrafficPolicy` per model.

    Policies are validated against the registry when set, and the registry asks the router
    before it unloads a version (`guard_unregister`), so a version that carries traffic cannot
    disappear under a policy. Every mutation runs on the event loop, and `choose` reads the
    current policy once per request: a new policy applies from the next request on, and requests
    already routed finish where they were sent.
    """

    def __init__(self, registry: Registry, *, rng: random.Random | None = None) -> None:
        self.registry = registry
        self._rng = rng or random.Random()
        self._policies: dict[str, TrafficPolicy] = {}
        self.on_change: list[Callable[[], None]] = []
        registry.before_unregister.append(self.guard_unregister)

    # -- the Router protocol (hot path) ---------------------------------------------------------

    def choose(self, model: str, headers: Mapping[str, str]) -> Choice:
        policy = self._policies.get(model)
        if policy is None:
            return _plain_choice(self.registry.default_version(model))
        version = policy.pick(headers, self._rng)
        if not self._ready(model, version):
            # Its version cannot serve now (no live worker, its TorchServe down): the request
            # goes to one of the policy's ready versions rather than to a 503: by their
            # weights, or a sticky user's next best; they come back once theirs is ready again.
            usable = functools.partial(self._ready, model)
            version = policy.pick_among(headers, usable, self._rng) or version
        shadow = policy.shadow
        if (
            shadow is not None
            and shadow.version != version
            and shadow.percent > 0
            and (shadow.percent >= 100 or self._rng.random() * 100 < shadow.percent)
        ):
            return Choice(version, (shadow.version,))
        return _plain_choice(version)

    def _ready(self, model: str, version: str) -> bool:
        try:
            return self.registry.get(model, version).ready
        except TorchgateError:
            return False

    # -- management -----------------------------------------------------------------------------

    def policies(self) -> dict[str, TrafficPolicy]:
        return dict(self._policies)

    def policy(self, model: str) -> TrafficPolicy | None:
        """The model's policy, None when it is served by its default version."""
        self.registry.versions(model)  # raises ModelNotFound
        return self._policies.get(model)

    def set_policy(self, model: str, policy: TrafficPolicy) -> None:
        """Apply `policy` from the next request on (the management API).

        Raises ModelNotFound / VersionNotFound (404) when it names a model or version that is not
        registered, and Conflict (409) when a version it sends traffic to is not ready: whoever
        sets it live is told at once that part of it would not be served yet.
        """
        versions = {v.version: v for v in self.registry.versions(model)}
        _refuse_unknown(model, policy.versions_named() - versions.keys())
        not_ready = sorted(v for v in policy.versions_with_traffic() if not versions[v].ready)
        if not_ready:
            raise Conflict(
                f"Traffic policy for model {model} sends traffic to version(s) that are not "
                f"ready: {', '.join(not_ready)}"
            )
        self._install(model, policy)

    def restore_policy(self, model: str, policy: TrafficPolicy) -> TrafficPolicy:
        """Apply a saved or configured `policy` at start-up; returns what was applied.

        Its versions need only be registered, not ready: at start-up one may still be starting,
        retrying a failed first start, scaled to 0 or behind a TorchServe not up yet, and
        refusing the policy would leave all traffic on the default version for good. Until a
        version is ready, `choose` sends its share to the ready ones. A version that carries
        none of its traffic and is not registered (it failed to load) leaves the policy, as
        when it is unregistered (`guard_unregister`); one that carries traffic: VersionNotFound.
        """
        missing = policy.versions_named() - {v.version for v in self.registry.versions(model)}
        _refuse_unknown(model, missing & policy.versions_with_traffic())
        applied = policy.without(missing)
        self._install(model, applied)
        return applied

    def _install(self, model: str, policy: TrafficPolicy) -> None:
        self._policies[model] = policy
        self._changed()

    def clear_policy(self, model: str) -> TrafficPolicy | None:
        """Go back to default-version routing; returns the policy that was in force."""
        self.registry.versions(model)  # raises ModelNotFound
        old = self._policies.pop(model, None)
        if old is not None:
            self._changed()
        return old

    def guard_unregister(self, model: str, version: str) -> None:
        """Refuse (409) to unload a version the policy sends traffic to.

        A version the policy names with weight 0 may go; it is dropped from the policy. The
        registry calls this after its own checks, so returning means the version is going.
        """
        policy = self._policies.get(model)
        if policy is None:
            return
        if version in policy.versions_with_traffic():
            raise Conflict(
                f"Cannot remove version {version} of model {model}: the traffic policy sends it "
                f"requests; change the policy first (PUT or DELETE /models/{model}/traffic)"
            )
        if version in policy.versions_named():
            self._install(model, policy.without({version}))

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()


def _refuse_unknown(model: str, missing: Collection[str]) -> None:
    """VersionNotFound (404) when a policy names versions that are not registered."""
    if missing:
        raise VersionNotFound(
            f"Traffic policy for model {model} names unknown version(s): "
            f"{', '.join(sorted(missing))}"
        )


def _uniform(digest: bytes) -> float:
    """A uniform number strictly inside (0, 1) from 8 hash bytes.

    52 bits plus 0.5 is exact in a float, so neither 0 (log -inf) nor 1 (log 0) can come out.
    """
    return ((int.from_bytes(digest, "big") >> 12) + 0.5) / _TWO_52


@functools.lru_cache(maxsize=1024)
def _plain_choice(version: str) -> Choice:
    """A shared `Choice` without shadows (they are immutable): no allocation per request."""
    return Choice(version)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise BadRequest(f"{what} must be finite, got {value!r}")
    return number


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)


def _is_token(name: str) -> bool:
    """An HTTP header field name (RFC 9110 token)."""
    return bool(name) and all(c in _TOKEN_CHARS for c in name)
