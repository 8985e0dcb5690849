"""TorchServe's grpc_*_max_connection_age[_grace]_ms against the real server: an aged gRPC
connection is closed (GOAWAY) and the client's channel goes idle, to reconnect on its next
call, which is what spreads long-lived clients over a Service's replicas. The port without
the key keeps its connection."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf import empty_pb2

from api.config import ConfigError, parse_config
from api.rpc.generated import inference_pb2_grpc, management_pb2, management_pb2_grpc
from tests.support.server import ROOT, running_torchgate

pytestmark = pytest.mark.integration

AGE_MS, GRACE_MS = 1000, 500


def states_after_a_call(port: int, call: str) -> list[grpc.ChannelConnectivity]:
    """The channel's states from its first call until well past the age and its grace."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    seen: list[grpc.ChannelConnectivity] = []
    channel.subscribe(seen.append, try_to_connect=True)
    try:
        if call == "Ping":
            inference_pb2_grpc.InferenceAPIsServiceStub(channel).Ping(empty_pb2.Empty(), timeout=30)
        else:
            stub = management_pb2_grpc.ManagementAPIsServiceStub(channel)
            stub.ListModels(management_pb2.ListModelsRequest(), timeout=30)
        # States reach `seen` from grpc's own thread, late: the channel's first IDLE can still
        # be the last one seen after the call returned. Wait for an IDLE after a READY.
        deadline = time.monotonic() + (AGE_MS + GRACE_MS) / 1000 * 3
        while time.monotonic() < deadline and not _idle_after_ready(seen):
            time.sleep(0.05)
        time.sleep(0.2)  # anything after the last state seen
        return seen
    finally:
        channel.close()


def _idle_after_ready(seen: list[grpc.ChannelConnectivity]) -> bool:
    ready = grpc.ChannelConnectivity.READY
    return ready in seen and grpc.ChannelConnectivity.IDLE in seen[seen.index(ready) :]


def test_an_aged_connection_is_closed_and_the_client_reconnects() -> None:
    config = (
        f"model_store={ROOT / 'model_store'}\nload_models=digits.mar\n"
        f"grpc_inference_max_connection_age_ms={AGE_MS}\n"
        f"grpc_inference_max_connection_age_grace_ms={GRACE_MS}\n"
    )
    with running_torchgate(config) as tg:
        aged = states_after_a_call(tg.grpc_inference_port, "Ping")
        kept = states_after_a_call(tg.grpc_management_port, "ListModels")
        # The aged channel works again: a new call reconnects.
        channel = grpc.insecure_channel(f"127.0.0.1:{tg.grpc_inference_port}")
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        assert stub.Ping(empty_pb2.Empty(), timeout=30).health
        channel.close()
    ready, idle = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE
    assert aged[-2:] == [ready, idle], aged
    assert kept[-1] == ready, kept


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_an_age_that_is_not_a_positive_number_stops_the_start(value: str) -> None:
    raw = {"grpc_management_max_connection_age_grace_ms": value}
    with pytest.raises(ConfigError, match="grpc_management_max_connection_age_grace_ms"):
        parse_config(raw, base_dir=ROOT)
