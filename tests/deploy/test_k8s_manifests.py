"""deploy/k8s: every overlay renders with `kubectl kustomize`; the built-in kinds pass kubernetes-validate's strict
schemas for Kubernetes 1.37; the prometheus-operator objects (ServiceMonitor, PrometheusRule), which have no schema
there, pass strict JSON schemas written here for the fields this deployment may use; checkov finds nothing it does
not skip for a reason written in the manifest; and the pieces agree with each other and with the server: ports,
probes on the health service, the settings the ConfigMap gives (parsed by the server's own code), the drain time
against terminationGracePeriodSeconds, selectors, the HPA's metric and the prometheus-adapter rule that serves it.

PromQL in these files (the recording rule, the adapter's queries) is checked by promtool in test_prometheus_rules.py
and the other tests of deploy/prometheus.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from deploykit import (
    CUSTOM_KINDS,
    DURATION,
    K8S,
    KUBERNETES_VERSION,
    OVERLAYS,
    checkov_report,
    documents,
    one,
    rendered,
    require,
    run,
    seconds,
    suppress_comment,
)

from attrserve_service.cli import SETTINGS, server_config

KNOWN_VARIABLES = {s.env for s in SETTINGS} | {"ATTRSERVE_LOG_LEVEL", "ATTRSERVE_LOG_FORMAT"}
ADAPTER = K8S / "prometheus-adapter" / "config.yaml"
DRAIN_MARGIN_S = 10  # what terminationGracePeriodSeconds must leave over the whole drain, at least
ENGINE_UNANSWERED_S = 20  # what a drain takes past prestop + 2 x grace when the engine process does not answer


# -- validation ----------------------------------------------------------------------------------------------------


def _split(overlay: str) -> tuple[list[dict], list[dict]]:
    docs = documents(overlay)
    builtin = [d for d in docs if (d["apiVersion"], d["kind"]) not in CUSTOM_KINDS]
    custom = [d for d in docs if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS]
    return builtin, custom


def _kubernetes_validate(files: list[Path]) -> tuple[int, str]:
    validate = require("kubernetes-validate")
    result = run([validate, "--strict", "--kubernetes-version", KUBERNETES_VERSION, *map(str, files)], timeout=120, check=False)
    return result.returncode, result.stdout + result.stderr


def test_builtin_kinds_pass_strict_schemas(tmp_path: Path) -> None:
    files = []
    for overlay in (*OVERLAYS, "prometheus-adapter"):
        builtin, _ = _split(overlay)
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(yaml.safe_dump_all(builtin))
        files.append(path)
    code, output = _kubernetes_validate(files)
    assert code == 0, output
    # Every document was checked against a schema: no "couldn't find schema" warnings, no errors.
    assert not re.search(r"^(WARN|ERROR)", output, re.MULTILINE), output
    assert output.count("passed for resource") == sum(len(_split(o)[0]) for o in (*OVERLAYS, "prometheus-adapter"))


def test_strict_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    """The control: the same validator fails a Deployment with one field Kubernetes does not know."""
    deployment = one(documents("cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"grpc": {"port": 50051}}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(deployment))
    code, output = _kubernetes_validate([path])
    assert code != 0 and "livenesProbe" in output, output


# Strict schemas for the custom resources: the apiVersion and kind, the fields the CRDs of prometheus-operator
# (monitoring.coreos.com/v1) require, and only the fields this deployment uses or may reasonably add, with their
# types; anything else is an error (as kubernetes-validate --strict does for built-in kinds).
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$", "maxLength": 253}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "additionalProperties": False,
    "properties": {"name": _NAME, "namespace": _NAME, "labels": _STRINGS, "annotations": _STRINGS},
}
_DURATION = {"type": "string", "pattern": DURATION.pattern, "minLength": 1}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": _STRINGS, "matchExpressions": {"type": "array"}},
}
SCHEMAS = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "jobLabel": {"type": "string"},
                    "targetLabels": {"type": "array", "items": {"type": "string"}},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string", "minLength": 1},
                                "path": {"type": "string", "pattern": "^/"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "honorLabels": {"type": "boolean"},
                                "relabelings": {"type": "array"},
                                "metricRelabelings": {"type": "array"},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": _DURATION,
                                "rules": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                                        "properties": {
                                            "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                                            "alert": {"type": "string", "minLength": 1},
                                            "expr": {"type": "string", "minLength": 1},
                                            "for": _DURATION,
                                            "labels": _STRINGS,
                                            "annotations": _STRINGS,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_custom_resources_pass_strict_schemas(overlay: str) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with kubernetes-validate")
    _, custom = _split(overlay)
    assert sorted(d["kind"] for d in custom) == ["PrometheusRule", "ServiceMonitor"]
    for doc in custom:
        errors = sorted(jsonschema.Draft202012Validator(SCHEMAS[doc["kind"]]).iter_errors(doc), key=str)
        assert not errors, f"{doc['kind']}: " + "; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    # What the operator checks beyond the schema: a scrape cannot outlast its interval; group names are unique.
    monitor = one(custom, "ServiceMonitor")
    for endpoint in monitor["spec"]["endpoints"]:
        assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])
    rule = one(custom, "PrometheusRule")
    names = [g["name"] for g in rule["spec"]["groups"]]
    assert len(names) == len(set(names))


def test_the_schemas_reject_what_the_operator_would() -> None:
    """The control: the custom-resource schemas are strict (an unknown field, a missing required one, a bad duration)."""
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with kubernetes-validate")
    monitor = one(documents("cpu"), "ServiceMonitor")
    for broken in (
        {**monitor, "spec": {**monitor["spec"], "endpoint": monitor["spec"]["endpoints"]}},
        {**monitor, "spec": {"selector": monitor["spec"]["selector"]}},
        {**monitor, "spec": {**monitor["spec"], "endpoints": [{"port": "metrics", "interval": "15 seconds"}]}},
    ):
        assert list(jsonschema.Draft202012Validator(SCHEMAS["ServiceMonitor"]).iter_errors(broken))


# -- checkov -------------------------------------------------------------------------------------------------------


def test_checkov_kubernetes() -> None:
    (report,) = [r for r in checkov_report() if r["check_type"] == "kubernetes"]
    failed = report["results"]["failed_checks"]
    assert not failed, [(c["check_id"], c["check_name"], c["file_path"], c["resource"]) for c in failed]
    skipped = report["results"]["skipped_checks"]
    # The one skip, in deploy/k8s/base/deployment.yaml's annotations: CKV_K8S_43 (image by digest), once per overlay.
    assert sorted((c["check_id"], c["resource"]) for c in skipped) == [("CKV_K8S_43", "Deployment.attrserve.attrserve")] * 3
    for check in skipped:
        assert len(suppress_comment(check)) > 40, f"{check['check_id']} is skipped without a reason"
    assert report["summary"]["parsing_errors"] == 0 and report["summary"]["passed"] > 200


# -- the pieces agree ----------------------------------------------------------------------------------------------


def _container(docs: list[dict]) -> dict:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _settings(docs: list[dict]) -> dict[str, str]:
    (source,) = _container(docs)["envFrom"]
    return one(docs, "ConfigMap", source["configMapRef"]["name"])["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configmap_is_settings_the_server_accepts(overlay: str) -> None:
    data = _settings(documents(overlay))
    assert set(data) <= KNOWN_VARIABLES, set(data) - KNOWN_VARIABLES
    config, (level, log_format) = server_config([], environ=data)  # the server's own parsing; exits on a bad value
    assert config.host == "0.0.0.0" and config.port == 50051 and config.metrics_port == 9090
    expected_repository = (
        "/models" if overlay != "cpu-demo" else "/opt/attrserve/lib/python3.11/site-packages/attrserve_service/demo_models"
    )
    assert str(config.model_repository) == expected_repository
    assert config.limits.default_device == {"cpu": "cpu", "cpu-demo": "cpu", "gpu": "cuda"}[overlay]
    assert (level, log_format) == ("INFO", "json")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_deployment(overlay: str) -> None:
    docs = documents(overlay)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(docs)
    settings = _settings(docs)
    config, _ = server_config([], environ=settings)
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"
    assert pod["enableServiceLinks"] is False, "Service links would set ATTRSERVE_METRICS_PORT=tcp://..."

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port}
    # Native gRPC probes on the health service; startup allows minutes of model loading; liveness outlasts a worker's
    # restart back-off (at most 30 s) and the drain.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": config.port}, probe
        assert "service" not in container[probe]["grpc"]

    def budget(probe: str) -> int:
        return container[probe]["periodSeconds"] * container[probe]["failureThreshold"]

    assert budget("startupProbe") >= 600
    # The drain: NOT_SERVING while still accepting for prestop_seconds, then grace_seconds for in-flight RPCs, then
    # as long again for the engine; a kubelet preStop sleep (if any) comes before SIGTERM. All of it within
    # terminationGracePeriodSeconds, and liveness must not kill a pod that is draining. An engine process that does not
    # answer (a model's code holding the GIL) takes ENGINE_UNANSWERED_S more: EngineProcess.shutdown waits for its
    # drain 10 s past the grace, then 10 s for its exit before it kills it (65 s with the base's settings, measured).
    drain = config.prestop_seconds + 2 * config.grace_seconds + ENGINE_UNANSWERED_S
    assert config.prestop_seconds >= 1, "give clients and endpoints time to move away before the listener stops"
    assert budget("livenessProbe") > max(30, drain)
    # Nor one whose engine process the server is restarting: NOT_SERVING from half of stuck_pass_seconds (at most 10 s)
    # after the engine process stopped answering, through its kill at stuck_pass_seconds, a back-off of up to 30 s and the
    # load of every model again, which may take as long as at start (the startup probe's window). A liveness kill then
    # restarts the container instead, and forgets the suspects of the query-of-death quarantine.
    assert budget("livenessProbe") >= budget("startupProbe") > config.limits.stuck_pass_seconds + 30
    assert container["readinessProbe"]["periodSeconds"] <= 10
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + DRAIN_MARGIN_S

    # Security: non-root, read-only root filesystem with /tmp an emptyDir, no privilege escalation, no capabilities,
    # the runtime's seccomp profile, no service account token.
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] >= 10000
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]} and security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert mounts["/models"]["readOnly"] is True
    if overlay == "cpu-demo":
        assert "emptyDir" in volumes[mounts["/models"]["name"]]
    else:
        assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"] == {"claimName": "attrserve-models", "readOnly": True}

    # Requests equal limits (Guaranteed QoS). The server reads the CPU limit from its cgroup (limits.cpu_limit); an
    # OMP_NUM_THREADS here would mislead, as the engine process sets its own.
    resources = container["resources"]
    assert resources["requests"] == {**resources["limits"], "ephemeral-storage": resources["requests"]["ephemeral-storage"]}
    assert float(resources["limits"]["cpu"]) >= 1
    assert "OMP_NUM_THREADS" not in {e["name"] for e in container.get("env", [])}
    image = container["image"]
    assert re.fullmatch(r"\S+/attrserve:\d+\.\d+\.\d+-(cpu|cuda)", image), image
    if overlay == "gpu":
        assert image.endswith("-cuda") and config.limits.default_device == "cuda"
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert image.endswith("-cpu") and "nvidia.com/gpu" not in resources["limits"]
        assert "nodeSelector" not in pod and "tolerations" not in pod


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_budget_and_policy_select_the_pods(overlay: str) -> None:
    docs = documents(overlay)
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = _container(docs)
    container_ports = {p["name"] for p in container["ports"]}

    def selects(selector: dict) -> bool:
        return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    grpc_service = one(docs, "Service", "attrserve-grpc")
    assert grpc_service["spec"]["clusterIP"] == "None", "headless: clients balance per call over the pods' addresses"
    assert [p["targetPort"] for p in grpc_service["spec"]["ports"]] == ["grpc"]
    metrics_service = one(docs, "Service", "attrserve-metrics")
    assert [p["targetPort"] for p in metrics_service["spec"]["ports"]] == ["metrics"]
    for service in (grpc_service, metrics_service):
        assert selects(service["spec"]["selector"])
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    policy = one(docs, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"])
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == container_ports
    if overlay == "cpu-demo":
        assert not [d for d in docs if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS]
        return
    # The ServiceMonitor picks the metrics Service (not the gRPC one) and scrapes its named port.
    monitor = one(docs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    labels_match = [
        s["metadata"]["name"]
        for s in docs
        if s["kind"] == "Service" and all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())
    ]
    assert labels_match == ["attrserve-metrics"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in metrics_service["spec"]["ports"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def _adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER.read_text())["rules"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_autoscaler_scales_on_the_queue_gauge_the_adapter_serves(overlay: str) -> None:
    docs = documents(overlay)
    hpa = one(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", one(docs, "Deployment")["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    if overlay == "cpu-demo":
        # No prometheus-adapter in a try-out: the HPA gets no metric and never scales, but it still raises the replicas
        # to its minimum before it asks for one (every pod the size of the cpu overlay's).
        assert hpa["spec"]["minReplicas"] == 1, "the try-out runs one pod"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    # prometheus-adapter's rule serves that name per pod, from the server's gauge, summed over the models.
    (rule,) = [r for r in _adapter_rules() if r["name"]["as"] == name]
    assert rule["seriesQuery"].startswith("attrserve_queue_rows{")
    assert re.fullmatch(rule["name"]["matches"], "attrserve_queue_rows")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert re.fullmatch(r"sum by \(<<\.GroupBy>>\) \(<<\.Series>>\{<<\.LabelMatchers>>\}\)", rule["metricsQuery"])


def test_the_server_exports_the_gauge_the_autoscaler_uses() -> None:
    from attrserve_service import metrics

    names = {getattr(m, "_name", None) for m in vars(metrics).values()}
    assert "attrserve_queue_rows" in names
    assert metrics.ATTRSERVE_QUEUE_ROWS._labelnames == ("model",)


def test_the_adapter_configmap() -> None:
    docs = documents("prometheus-adapter")
    (configmap,) = docs
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["name"] == "attrserve-prometheus-adapter"
    assert yaml.safe_load(configmap["data"]["config.yaml"]) == yaml.safe_load(ADAPTER.read_text())


def test_gpu_overlay_differs_from_cpu_only_where_it_should() -> None:
    cpu, gpu = documents("cpu"), documents("gpu")
    assert [(d["kind"], d["metadata"]["name"]) for d in cpu if d["kind"] != "ConfigMap"] == [
        (d["kind"], d["metadata"]["name"]) for d in gpu if d["kind"] != "ConfigMap"
    ]
    cpu_settings, gpu_settings = _settings(cpu), _settings(gpu)
    assert {k: v for k, v in gpu_settings.items() if cpu_settings.get(k) != v} == {"ATTRSERVE_DEVICE": "cuda"}
    assert rendered("cpu") != rendered("gpu")
