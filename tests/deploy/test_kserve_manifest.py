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
