"""deploy/prometheus/rules.yaml: valid (promtool check rules), its unit tests pass (promtool test rules), and every
alert is complete (severity, summary, description, a runbook section) and tested both firing and not firing."""

from __future__ import annotations

import re

import yaml
from promkit import (
    RULES,
    RULES_README,
    RULES_TEST,
    adapter_exprs,
    dashboard_exprs,
    load_rules,
    metric_names,
    needs_promtool,
    promtool,
    selectors,
)

SEVERITIES = {"critical", "warning"}


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_unit_tests() -> None:
    result = promtool("test", "rules", str(RULES_TEST), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _alerts() -> list[dict]:
    return [rule for rule in load_rules() if "alert" in rule]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_alert_is_complete() -> None:
    anchors = _anchors(RULES_README.read_text())
    alerts = _alerts()
    assert alerts
    for alert in alerts:
        name = alert["alert"]
        assert alert.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity label must be one of {SEVERITIES}"
        annotations = alert.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key, "").strip(), f"{name}: no {key} annotation"
        runbook = annotations["runbook_url"]
        assert runbook == f"deploy/prometheus/README.md#{name.lower()}", f"{name}: runbook_url should point at its README section"
        assert name.lower() in anchors, f"{name}: deploy/prometheus/README.md has no section '### {name}'"


def test_rule_names_are_unique() -> None:
    names = [rule.get("alert") or rule.get("record") for rule in load_rules()]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    """Each alert has a promtool case where it fires and one where it must not (a healthy series or before its for:)."""
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {alert["alert"] for alert in _alerts()}
    assert names - fires == set(), f"alerts never shown firing in rules_test.yaml: {sorted(names - fires)}"
    assert names - quiet == set(), f"alerts never shown quiet in rules_test.yaml: {sorted(names - quiet)}"
    assert (fires | quiet) - names == set(), f"rules_test.yaml tests alerts rules.yaml lacks: {sorted((fires | quiet) - names)}"


def test_every_recording_rule_is_unit_tested() -> None:
    """Each recording rule is evaluated by a promql_expr_test, or feeds one that is, or feeds an alert (all of which
    are tested above)."""
    rules = load_rules()
    recorded = {rule["record"]: rule["expr"] for rule in rules if "record" in rule}
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    covered = {name for case in tests for check in case.get("promql_expr_test", []) for name in metric_names(check["expr"])}
    covered |= {name for rule in rules if "alert" in rule for name in metric_names(rule["expr"])}
    frontier = set(covered)
    while frontier:  # a tested rule tests the rules it reads
        frontier = {n for name in frontier if name in recorded for n in metric_names(recorded[name])} - covered
        covered |= frontier
    assert set(recorded) - covered == set(), f"recording rules no test evaluates: {sorted(set(recorded) - covered)}"


def test_every_recording_rule_is_read() -> None:
    """Prometheus evaluates every recording rule every interval: each is read by an alert, a dashboard query or the
    prometheus-adapter rule the HPA scales on, directly or through another recording rule that is."""
    rules = load_rules()
    recorded = {rule["record"]: rule["expr"] for rule in rules if "record" in rule}
    readers = [rule["expr"] for rule in rules if "alert" in rule] + [e.expr for e in dashboard_exprs() + adapter_exprs()]
    read = {name for expr in readers for name in metric_names(expr)}
    frontier = set(read)
    while frontier:  # a rule that is read reads the rules it names
        frontier = {n for name in frontier if name in recorded for n in metric_names(recorded[name])} - read
        read |= frontier
    assert set(recorded) - read == set(), f"recording rules nothing reads: {sorted(set(recorded) - read)}"


def test_server_error_codes_are_the_same_everywhere() -> None:
    """Every rule that counts errors uses the same set of codes, and it never counts client errors or cancels."""
    codes = set()
    for rule in load_rules():
        for found in re.findall(r'grpc_code=~"([^"]*)"', rule["expr"]):
            codes.add(found)
    assert codes == {"UNKNOWN|DEADLINE_EXCEEDED|UNAVAILABLE|INTERNAL"}, codes


def test_the_kubernetes_prometheusrule_carries_exactly_rules_yaml() -> None:
    """deploy/k8s/base/prometheusrule.yaml is generated from rules.yaml; a stale copy would run other rules in a cluster."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "deploy/prometheus/prometheusrule.py"), "--check"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_credentials_alerts() -> None:
    """The alerts on TLS and token files (deploy/k8s components/tls, mutual-tls, auth-tokens) read the server's metrics
    by their declared names and labels: a certificate's expiry at 14 days (warning) and 2 days (critical), and a
    refused reload (a warning: the last good credentials serve on)."""
    from attrserve_service import metrics

    expiry = metrics.ATTRSERVE_TLS_CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS
    reloads = metrics.ATTRSERVE_CREDENTIALS_RELOADS_TOTAL
    assert (expiry._type, expiry._labelnames) == ("gauge", ())
    assert (reloads._type, reloads._labelnames) == ("counter", ("kind", "outcome"))
    alerts = {alert["alert"]: alert for alert in _alerts()}
    days = {"AttrserveCertificateExpiresSoon": (14, "warning"), "AttrserveCertificateExpiryImminent": (2, "critical")}
    for name, (left, severity) in days.items():
        assert alerts[name]["labels"]["severity"] == severity
        assert re.sub(r"\s+", " ", alerts[name]["expr"]).strip() == f"{expiry._name} - time() < {left} * 86400", name
    failed = alerts["AttrserveCredentialsReloadFailed"]
    assert failed["labels"]["severity"] == "warning"
    (selector,) = selectors(failed["expr"])
    assert (selector.name, selector.matchers) == (f"{reloads._name}_total", [("outcome", "=", "failed")])
    assert "failed" in metrics.RELOAD_OUTCOMES
