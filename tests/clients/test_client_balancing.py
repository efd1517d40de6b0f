"""Client-side load balancing over several servers (kube-proxy does not balance HTTP/2 streams, so the client
must): three server processes on loopback, one client spreading calls over all three, and no call lost when one
server is stopped mid-run (it drains: NOT_SERVING first, so the client moves away, then finishes what it has)."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from attrserve_client import AttributionClient
from attrserve_client.client import channel_target
from servers import ServeProcess, scrape

X = [[0.2961119413, 0.5165622830, 0.2516707182]]
WANT = np.array([[-0.5922, -1.5497, -1.0067]])  # IG of Captum's ToyModel, target 0 (README)


@pytest.mark.parametrize("target, want", [
    ("127.0.0.1:1", ("127.0.0.1:1", False)),
    ("127.0.0.1:1,127.0.0.1:2", ("ipv4:127.0.0.1:1,127.0.0.1:2", True)),
    (["127.0.0.1:1", "127.0.0.1:2"], ("ipv4:127.0.0.1:1,127.0.0.1:2", True)),
    (["[::1]:1", "[::1]:2"], ("ipv6:[::1]:1,[::1]:2", True)),
    ("dns:///attrserve-headless.default.svc:50051", ("dns:///attrserve-headless.default.svc:50051", True)),
])
def test_targets(target, want) -> None:
    assert channel_target(target) == want


def handled_ok(server: ServeProcess) -> float:
    assert server.metrics_port is not None
    key = ("grpc_server_handled_total", frozenset({"grpc_type": "unary", "grpc_service": "attrserve.v1.AttributionService",
                                                    "grpc_method": "Attribute", "grpc_code": "OK"}.items()))
    return scrape(server.metrics_port).get(key, 0.0)


def test_one_client_spreads_calls_over_three_servers_and_loses_none_when_one_stops() -> None:
    servers: list[ServeProcess] = []
    try:
        for _ in range(3):
            servers.append(ServeProcess(["--no-batch-probe", "--grace-seconds", "5"], metrics=True))
        addresses = [s.address for s in servers]
        results: list[np.ndarray] = []
        failures: list[BaseException] = []
        stop_sending = threading.Event()

        with AttributionClient(addresses) as client:
            for _ in range(30):
                results.append(client.attribute("toy", "integrated_gradients", X, target=0, timeout=10).attributions)
            served = [handled_ok(s) for s in servers]
            assert sum(served) == 30 and all(n >= 5 for n in served), served  # round-robin: every server takes a share

            def keep_sending() -> None:
                while not stop_sending.is_set():
                    try:
                        results.append(client.attribute("toy", "integrated_gradients", X, target=0, timeout=10).attributions)
                    except grpc.RpcError as e:  # a lost call
                        failures.append(e)

            senders = [threading.Thread(target=keep_sending) for _ in range(4)]
            for t in senders:
                t.start()
            time.sleep(1.0)
            before = len(results)
            assert servers[0].signal(timeout=30) == 0  # SIGTERM mid-run: it drains and exits cleanly
            time.sleep(1.0)
            stop_sending.set()
            for t in senders:
                t.join(30)
        assert failures == []
        assert len(results) > before  # calls went on after the stop, on the other two
        for got in results:
            np.testing.assert_allclose(got, WANT, atol=1e-4)
    finally:
        for s in servers:
            s.stop()
