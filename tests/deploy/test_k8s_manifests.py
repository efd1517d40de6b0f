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

import functools
import json
import os
import re
import tempfile
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


def _strictly_valid(tmp_path: Path, documents: dict[str, list[dict]]) -> None:
    """Each named list of documents passes kubernetes-validate --strict, every document checked against a schema: no
    "couldn't find schema" warnings, no errors."""
    files = []
    for name, docs in documents.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        files.append(path)
    code, output = _kubernetes_validate(files)
    assert code == 0, output
    assert not re.search(r"^(WARN|ERROR)", output, re.MULTILINE), output
    assert output.count("passed for resource") == sum(len(docs) for docs in documents.values())


def test_builtin_kinds_pass_strict_schemas(tmp_path: Path) -> None:
    _strictly_valid(tmp_path, {overlay: _split(overlay)[0] for overlay in (*OVERLAYS, "prometheus-adapter")})


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


# -- the security components (components/tls, mutual-tls, auth-tokens, exec-probes) ---------------------------------
#
# Each rendered on top of every overlay, as a user's overlay lists them under `components:` (plus a setting where the
# combination needs one), from a kustomization written in a temporary folder.

COMPONENTS = K8S / "components"
HEALTHCHECK_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "healthcheck.py"
# (components, settings an overlay of the user's adds)
COMBINATIONS = (
    (("tls",), ()),
    (("mutual-tls",), ()),
    (("auth-tokens",), ()),
    (("auth-tokens", "exec-probes"), ("ATTRSERVE_AUTH_HEALTH=1",)),
    (("mutual-tls", "auth-tokens"), ("ATTRSERVE_AUTH_HEALTH=1",)),
)
CASES = [(overlay, components, literals) for overlay in OVERLAYS for components, literals in COMBINATIONS]
CASE_IDS = [f"{overlay}+{'+'.join(components)}" for overlay, components, _ in CASES]
# The Secrets the components mount (created by the user, never in git), and the keys a file setting may name.
SECRETS = {
    "attrserve-tls": {"tls.crt", "tls.key", "ca.crt"},  # type kubernetes.io/tls, as cert-manager writes it
    "attrserve-healthcheck-tls": {"tls.crt", "tls.key"},
    "attrserve-tokens": {"tokens", "admin-tokens"},
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def _healthcheck_variables() -> set[str]:
    """The healthcheck's own variables (its client certificate for mutual TLS), read from healthcheck.py."""
    return set(re.findall(r'^CLIENT_(?:CERT|KEY) = "(ATTRSERVE_\w+)"$', HEALTHCHECK_SCRIPT.read_text(), re.MULTILINE))


@functools.cache
def _render_with(overlay: str, components: tuple[str, ...], literals: tuple[str, ...]) -> str:
    kubectl = require("kubectl")
    with tempfile.TemporaryDirectory(prefix="attrserve-components-") as folder:
        kustomization: dict = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(K8S / "overlays" / overlay, folder)],
            "components": [os.path.relpath(COMPONENTS / c, folder) for c in components],
        }
        if literals:
            kustomization["configMapGenerator"] = [{"name": "attrserve-config", "behavior": "merge", "literals": list(literals)}]
        (Path(folder) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return run([kubectl, "kustomize", folder], timeout=60).stdout


def _docs_with(overlay: str, components: tuple[str, ...], literals: tuple[str, ...] = ()) -> list[dict]:
    return [d for d in yaml.safe_load_all(_render_with(overlay, components, literals)) if d]


def test_the_security_components_pass_strict_schemas(tmp_path: Path) -> None:
    documents = {}
    for overlay, components, literals in CASES:
        rendered = _docs_with(overlay, components, literals)
        documents[f"{overlay}+{'+'.join(components)}"] = [d for d in rendered if (d["apiVersion"], d["kind"]) not in CUSTOM_KINDS]
    _strictly_valid(tmp_path, documents)


def test_checkov_passes_the_security_components(tmp_path: Path) -> None:
    """As the overlays: nothing fails, and the one skip is the base's CKV_K8S_43 (image by digest), with its reason."""
    checkov = require("checkov")
    names = []
    for overlay, components, literals in CASES:
        name = f"{overlay}+{'+'.join(components)}.yaml"
        (tmp_path / name).write_text(_render_with(overlay, components, literals))
        names.append(name)
    args = [checkov, "--skip-download", "--framework", "kubernetes", "-o", "json"] + [a for n in names for a in ("-f", n)]
    env = dict(os.environ, CHECKOV_PARALLELIZATION_TYPE="none", BC_SKIP_MAPPING="TRUE")
    result = run(args, timeout=300, check=False, cwd=tmp_path, env=env)
    assert result.returncode in (0, 1), result.stdout[-4000:] + result.stderr[-4000:]
    reports = json.loads(result.stdout)
    (report,) = [r for r in (reports if isinstance(reports, list) else [reports]) if r["check_type"] == "kubernetes"]
    failed = report["results"]["failed_checks"]
    assert not failed, [(c["check_id"], c["check_name"], c["file_path"], c["resource"]) for c in failed]
    skipped = report["results"]["skipped_checks"]
    assert sorted((c["check_id"], c["resource"]) for c in skipped) == [("CKV_K8S_43", "Deployment.attrserve.attrserve")] * len(CASES)
    assert all(len(suppress_comment(c)) > 40 for c in skipped)
    assert report["summary"]["parsing_errors"] == 0 and report["summary"]["passed"] > 50 * len(CASES)


@pytest.mark.parametrize(("overlay", "components", "literals"), CASES, ids=CASE_IDS)
def test_the_security_components(overlay: str, components: tuple[str, ...], literals: tuple[str, ...]) -> None:
    docs, plain = _docs_with(overlay, components, literals), documents(overlay)
    settings = _settings(docs)
    mutual = "mutual-tls" in components
    # Settings the server accepts (and the healthcheck's own two, with mutual TLS), parsed by the server's own code.
    healthcheck_variables = _healthcheck_variables()
    assert len(healthcheck_variables) == 2
    assert set(settings) <= KNOWN_VARIABLES | (healthcheck_variables if mutual else set()), set(settings) - KNOWN_VARIABLES
    config, _ = server_config([], environ=settings)
    tls = "tls" in components or mutual
    assert (config.tls_cert is not None, config.tls_key is not None, config.tls_client_ca is not None) == (tls, tls, mutual)
    assert (config.auth_tokens_file is not None) == ("auth-tokens" in components)
    assert healthcheck_variables <= set(settings) if mutual else not healthcheck_variables & set(settings)

    # Every file a setting names is a key of a Secret the pod mounts whole: read-only, no subPath (a subPath mount never
    # sees the Secret's updates, and the server re-reads rotated files).
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = _container(docs)
    secret_volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert set(secret_volumes.values()) <= set(SECRETS)
    mounted = {}
    for mount in container["volumeMounts"]:
        if mount["name"] in secret_volumes:
            assert mount.get("readOnly") is True, mount
            assert "subPath" not in mount and "subPathExpr" not in mount, mount
            mounted[mount["mountPath"]] = secret_volumes[mount["name"]]
    files = [config.tls_cert, config.tls_key, config.tls_client_ca, config.auth_tokens_file, config.admin_tokens_file]
    files += [Path(settings[v]) for v in healthcheck_variables if v in settings]
    for path in filter(None, files):
        secret = mounted.get(str(path.parent))
        assert secret is not None, f"{path} is in no Secret volume the container mounts"
        assert path.name in SECRETS[secret], f"{path}: {secret} has no key {path.name}"
    if mutual:
        assert mounted[str(Path(settings["ATTRSERVE_HEALTHCHECK_TLS_CERT"]).parent)] == "attrserve-healthcheck-tls"
    assert {v["secret"].get("optional") for v in pod["volumes"] if "secret" in v} <= {None, False}, "a missing Secret must stop the pod"

    # The probes: exec probes running the healthcheck where the kubelet's plaintext gRPC probe cannot pass (TLS, mutual
    # TLS, a token for health), with the overlay's period, timeout and thresholds; else the overlay's own.
    plain_container = _container(plain)
    for name in PROBES:
        probe, before = container[name], plain_container[name]
        if tls or config.auth_health:
            assert "grpc" not in probe, name
            assert probe["exec"]["command"] == [*_image_healthcheck(), "--timeout", str(probe["timeoutSeconds"] - 1)], name
            assert {k: v for k, v in probe.items() if k != "exec"} == {k: v for k, v in before.items() if k != "grpc"}, name
        else:
            assert probe == before, name

    # Nothing else changed: the same objects, and the same Deployment but for the volumes, mounts, probes and ConfigMap.
    assert [(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] != "ConfigMap"] == [
        (d["kind"], d["metadata"]["name"]) for d in plain if d["kind"] != "ConfigMap"
    ]

    def rest(deployment: dict) -> dict:
        deployment = json.loads(json.dumps(deployment))
        spec = deployment["spec"]["template"]["spec"]
        spec["volumes"] = [v for v in spec["volumes"] if "secret" not in v]
        (c,) = spec["containers"]
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] not in mounted]
        for name in PROBES:
            del c[name]
        del c["envFrom"]
        return deployment

    assert rest(one(docs, "Deployment")) == rest(one(plain, "Deployment"))
    plain_settings = _settings(plain)
    assert {k: v for k, v in settings.items() if k in plain_settings} == plain_settings


def _image_healthcheck() -> list[str]:
    """How the image runs its healthcheck: its HEALTHCHECK's script, with the python of the virtualenv first on its PATH."""
    from deploykit import dockerfile, env_of, stages

    _, image = stages(dockerfile())[-1]
    (healthcheck,) = [i for i in image if i.keyword == "HEALTHCHECK"]
    command = json.loads(healthcheck.value.split("CMD", 1)[1])
    assert command[0] == "python" and command[1].endswith("/healthcheck.py"), command
    venv_bin = env_of(image)["PATH"].split(":")[0]
    return [f"{venv_bin}/python", *command[1:]]


def test_the_components_document_their_secrets() -> None:
    """No Secret is written in deploy/k8s (the user creates them; deploy/README.md says how), and each component folder
    says what it needs at the top of its kustomization."""
    for path in K8S.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), f"{path} holds a Secret"
        assert "secretGenerator" not in path.read_text(), path
    readme = (K8S.parent / "README.md").read_text()
    for secret in SECRETS:
        assert secret in readme, f"deploy/README.md does not say how to create {secret}"
    for component in ("tls", "mutual-tls", "auth-tokens", "exec-probes"):
        assert (COMPONENTS / component / "kustomization.yaml").read_text().startswith("# "), component
        assert f"components/{component}" in readme, component


_MODEL = """
import torch
from torch import nn


def build_model():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
"""


def _service_certificate(ca, names: list[str]):
    """A server certificate for DNS names only (not 127.0.0.1, where the probes connect), signed by `ca`."""
    import datetime

    from certs import Pair
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    return Pair(cert.public_bytes(serialization.Encoding.PEM), pem)  # the key as cert-manager writes it: PKCS#1/SEC1


def test_the_exec_probes_pass_where_the_kubelets_grpc_probe_cannot(tmp_path: Path) -> None:
    """mutual-tls + auth-tokens with health behind a token (cpu-demo): a server configured by the rendered ConfigMap,
    its Secrets laid out as the kubelet mounts them (the keys of each Secret in its mountPath). The kubelet's native
    probe (plaintext, no client certificate, no token) fails; each exec probe's command passes; the server still
    answers a correct request with Captum's numbers and health is SERVING."""
    import dataclasses
    import subprocess
    import sys

    import grpc
    import numpy as np
    import torch
    from captum.attr import IntegratedGradients
    from certs import CertificateAuthority
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from servers import ServerThread

    from attrserve_client import AttributionClient
    from attrserve_engine import EngineLimits

    docs = _docs_with("cpu-demo", ("mutual-tls", "auth-tokens"), ("ATTRSERVE_AUTH_HEALTH=1",))
    settings, container = _settings(docs), _container(docs)
    volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in volumes if "secret" in v}
    folders = {secrets[m["name"]]: tmp_path / m["mountPath"].lstrip("/") for m in container["volumeMounts"] if m["name"] in secrets}
    ca = CertificateAuthority("components test CA")
    # tls.crt, tls.key, ca.crt: the Secret cert-manager writes for deploy/README.md's Certificate (the Service's names)
    service_names = ["attrserve-grpc.attrserve.svc.cluster.local", "attrserve-grpc.attrserve.svc"]
    _service_certificate(ca, service_names).write(folders["attrserve-tls"], "tls")
    ca.write(folders["attrserve-tls"], "ca")
    client_cert, client_key = ca.issue("healthcheck").write(folders["attrserve-healthcheck-tls"], "tls")
    token = "components-test-token-0123456789"
    (folders["attrserve-tokens"] / "tokens").parent.mkdir(parents=True, exist_ok=True)
    (folders["attrserve-tokens"] / "tokens").write_text(f"# accepted tokens\n{token}\n")
    environ = {k: str(tmp_path / v.lstrip("/")) if v.startswith("/etc/") else v for k, v in settings.items()}
    (tmp_path / "repo" / "m").mkdir(parents=True)
    (tmp_path / "repo" / "m" / "model.py").write_text(_MODEL)
    (tmp_path / "repo" / "m" / "config.pbtxt").write_text('inputs { name: "x" dtype: DATA_TYPE_FLOAT32 dims: 4 }\n')
    config, _ = server_config([], environ=environ)
    assert config.tls_client_ca is not None and config.auth_health and config.auth_tokens_file is not None
    config = dataclasses.replace(
        config, host="127.0.0.1", port=0, metrics_port=None, model_repository=tmp_path / "repo", engine_process=False,
        limits=EngineLimits(default_device="cpu", probe_batch_rows=False),
    )  # fmt: skip
    server = ServerThread(None, config)
    try:
        port = server.running.port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # what the kubelet's gRPC probe does
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATTRSERVE_")}
        env.update(environ, ATTRSERVE_PORT=str(port))  # the ConfigMap's port, where this test's server listens
        for name in PROBES:
            command = container[name]["exec"]["command"]
            assert command[:2] == _image_healthcheck()
            done = subprocess.run([sys.executable, str(HEALTHCHECK_SCRIPT), *command[2:]], env=env, capture_output=True, text=True,
                                  timeout=60)  # fmt: skip
            assert done.returncode == 0 and done.stdout.strip() == f"127.0.0.1:{port}: SERVING", (name, done.stdout, done.stderr)
        x = np.array([[0.3, -0.2, 0.9, 1.4], [1.0, 0.5, -0.4, 0.2]], dtype=np.float32)
        namespace: dict = {}
        exec(_MODEL, namespace)
        expected = IntegratedGradients(namespace["build_model"]()).attribute(torch.from_numpy(x), target=[0, 1]).numpy()
        ca_file = folders["attrserve-tls"] / "ca.crt"
        client_args = {"root_certificates": ca_file, "client_cert": (client_cert, client_key), "token": token}
        client_args["options"] = [("grpc.ssl_target_name_override", service_names[0])]  # as a client of the Service
        with AttributionClient(f"127.0.0.1:{port}", **client_args) as client:
            answer = client.attribute("m", "integrated_gradients", x, target=[0, 1], timeout=60)
            np.testing.assert_allclose(answer.attributions, expected, atol=1e-5)
            reply = health_pb2_grpc.HealthStub(client._channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()
