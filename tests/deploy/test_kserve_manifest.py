"""deploy/kserve/inferenceservice.yaml: KServe's InferenceService CRD is not in kubernetes-validate, so what can be
checked is: the YAML parses, it is a serving.kserve.io/v1beta1 InferenceService with KServe's custom gRPC predictor
shape (one container, one port named h2c), and it agrees with the repository's Deployment (the CPU overlay): image,
gRPC port, resources, and settings the server's own parser accepts."""

from __future__ import annotations

from pathlib import Path

import yaml
from deploykit import documents, one

from attrserve_service.cli import SETTINGS, server_config

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
DEMO_MODELS = "/opt/attrserve/lib/python3.11/site-packages/attrserve_service/demo_models"


def _predictor() -> dict:
    (doc,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert doc["kind"] == "InferenceService"
    assert doc["metadata"]["name"] == "attrserve"
    assert set(doc["spec"]) == {"predictor"}
    return doc["spec"]["predictor"]


def test_the_predictor_is_a_custom_grpc_container_on_the_servers_port() -> None:
    (container,) = _predictor()["containers"]
    assert container["name"] == "kserve-container"
    assert container["ports"] == [{"name": "h2c", "containerPort": 50051, "protocol": "TCP"}]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= {s.env for s in SETTINGS} | {"ATTRSERVE_LOG_LEVEL", "ATTRSERVE_LOG_FORMAT"}
    config, (_, log_format) = server_config([], environ=env)  # the server's own parsing; exits on a bad value
    assert (config.host, config.port) == ("0.0.0.0", container["ports"][0]["containerPort"])
    assert str(config.model_repository) == DEMO_MODELS
    assert config.limits.default_device == "cpu"
    assert log_format == "json"
    assert "args" not in container and "command" not in container  # the image's entrypoint, `attrserve serve`


def test_the_predictor_matches_the_repositorys_cpu_deployment() -> None:
    (container,) = _predictor()["containers"]
    (deployed,) = one(documents("cpu"), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == deployed["image"]
    grpc_port = [p for p in deployed["ports"] if p["name"] == "grpc"]
    assert [p["containerPort"] for p in grpc_port] == [p["containerPort"] for p in container["ports"]]
    assert container["resources"] == deployed["resources"]


# Knative Serving (KServe's serverless mode) puts its queue-proxy beside the container, in the same network namespace,
# listening on these ports: 8012/8013 (HTTP/1, HTTP/2 proxy), 8022 (admin), 9090 (autoscaler metrics), 9091 (its
# Prometheus metrics). A server port among them cannot be bound: `attrserve serve` exits 2 ("--metrics-port 9090: cannot
# listen on 0.0.0.0:9090: address already in use") and the predictor restarts for ever.
KNATIVE_QUEUE_PROXY_PORTS = frozenset({8012, 8013, 8022, 9090, 9091})


def test_the_server_listens_on_no_port_of_knatives_queue_proxy() -> None:
    (container,) = _predictor()["containers"]
    config, _ = server_config([], environ={e["name"]: e["value"] for e in container["env"]})
    listening = {"--port": config.port, "--metrics-port": config.metrics_port}
    taken = {flag: port for flag, port in listening.items() if port in KNATIVE_QUEUE_PROXY_PORTS}
    assert not taken, f"the queue-proxy listens on {taken} in the predictor's pod"
