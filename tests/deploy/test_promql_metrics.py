"""Every PromQL expression the deployment ships — deploy/prometheus/rules.yaml, the Grafana dashboard (panels and
variables), PrometheusRule objects and the prometheus-adapter rules under deploy/k8s (if there are any) — parses
(promtool), reads only recording rules that are defined, and reads only metrics, labels and label values that a
running attrserve really exports."""

from __future__ import annotations

import re
import tempfile
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from promkit import (
    SYNTHETIC,
    TARGET_LABELS,
    Attrserve,
    Expr,
    adapter_exprs,
    adapter_files,
    dashboard_exprs,
    k8s_recorded_names,
    k8s_rule_exprs,
    needs_promtool,
    promtool,
    recorded_names,
    rule_exprs,
    selectors,
)

from attrserve_client import AttributionClient
from certs import CertificateAuthority
from servers import ServeProcess

# Declared on /metrics but without samples on a CPU server that loaded its models: why that is fine.
NO_SAMPLES_HERE = {
    "attrserve_device_memory_bytes": "CUDA devices only",
    "attrserve_model_load_failures_total": "only after a model failed to load",
}


def all_exprs() -> list[Expr]:
    return rule_exprs() + dashboard_exprs() + k8s_rule_exprs() + adapter_exprs()


def test_expressions_were_found() -> None:
    exprs = all_exprs()
    wheres = " ".join(e.where for e in exprs)
    assert "rules.yaml" in wheres and "attrserve.json" in wheres
    assert len(exprs) > 60


@needs_promtool
def test_every_expression_parses(tmp_path: Path) -> None:
    """promtool parses each expression as the expression of a recording rule of a throwaway rule file."""
    exprs = all_exprs()
    rules = {"groups": [{"name": "syntax", "rules": [{"record": f"syntax:expr_{i}", "expr": e.expr} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "exprs.yaml"
    path.write_text(yaml.safe_dump(rules, width=1000))
    result = promtool("check", "rules", str(path))
    if result.returncode != 0:
        bad = [f"{e.where}:\n    {e.expr}" for i, e in enumerate(exprs) if f'syntax:expr_{i}"' in result.stderr + result.stdout]
        pytest.fail("promtool rejects:\n" + "\n".join(bad) + "\n" + result.stdout + result.stderr)


def test_recording_rules_read_are_defined() -> None:
    defined = recorded_names() | k8s_recorded_names()
    for e in all_exprs():
        for sel in selectors(e.expr):
            if ":" in sel.name:
                assert sel.name in defined, f"{e.where}: {sel.name} is no recording rule of deploy/prometheus/rules.yaml"


def test_the_adapter_reads_the_backlog() -> None:
    """prometheus-adapter (the HPA's metric) reads the backlog: the gauge attrserve_queue_rows, summed per pod."""
    if not adapter_files():
        pytest.skip("no prometheus-adapter rule config (a YAML file with seriesQuery) under deploy/k8s yet")
    names = {sel.name for e in adapter_exprs() for sel in selectors(e.expr)}
    assert names == {"attrserve_queue_rows"}, names


# -- against a running server ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported() -> Iterator[tuple[dict[str, str], dict[str, set[str]], dict[str, set[str]]]]:
    """A demo server after a few requests of each outcome: (sample name → its family's type for every name the page
    declares, sample name → label names seen, label → values seen on any attrserve or grpc metric)."""
    server = Attrserve()
    try:
        with AttributionClient(server.address) as client:
            client.attribute("toy", "integrated_gradients", [[0.1, 0.2, 0.3]], target=0, return_convergence_delta=True)
            client.attribute("toy", "saliency", [[0.1, 0.2, 0.3]], target=0)
            with pytest.raises(grpc.RpcError) as e:
                client.attribute("nope", "saliency", [[0.1, 0.2, 0.3]], target=0)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            image = np.random.default_rng(0).random((32, 3, 16, 16)).astype(np.float32)
            with pytest.raises(grpc.RpcError) as e:  # 32,000 rows: ~2 s of work, dropped once the 50 ms deadline passes
                client.attribute("image", "integrated_gradients", image, target=1, params={"n_steps": 1000}, timeout=0.05)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        texts = [server.scrape()]
    finally:
        server.stop()
    # The credentials' series exist only on a server with TLS (the certificate's expiry) or with files to follow (the
    # reloads, made at 0): a second server, with both, scraped idle.
    with tempfile.TemporaryDirectory(prefix="attrserve-promql-") as folder:
        cert, key = CertificateAuthority("promql test CA").issue("attrserve", server=True).write(Path(folder), "tls")
        (Path(folder) / "tokens").write_text("promql-test-token-0123456789\n")
        args = ["--no-batch-probe", "--tls-cert", str(cert), "--tls-key", str(key), "--auth-tokens-file", str(Path(folder) / "tokens")]
        with ServeProcess(args, metrics=True) as secured:
            texts.append(urllib.request.urlopen(f"http://{secured.host}:{secured.metrics_port}/metrics", timeout=10).read().decode())
    declared: dict[str, str] = {}
    labels: dict[str, set[str]] = defaultdict(set)
    values: dict[str, set[str]] = defaultdict(set)
    for family in (f for text in texts for f in text_string_to_metric_families(text)):
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}.get(family.type, ("",))
        for suffix in suffixes:
            declared[family.name + suffix] = family.type
        for sample in family.samples:
            labels[sample.name] |= set(sample.labels)
            if family.name.startswith(("attrserve_", "grpc_")):
                for label, value in sample.labels.items():
                    values[label].add(value)
    yield declared, dict(labels), dict(values)


def _literal_values(op: str, value: str) -> list[str]:
    """The label values a matcher names literally: `x`, or the alternatives of `a|b|c`; [] for real regexes."""
    if op in ("=", "!="):
        return [value]
    if re.fullmatch(r"[\w+-]+(\|[\w+-]+)*", value):
        return value.split("|")
    return []


def test_every_metric_read_is_exported(exported) -> None:
    declared, labels, values = exported
    problems = []
    for e in all_exprs():
        for sel in selectors(e.expr):
            name = sel.name
            if ":" in name or name in SYNTHETIC:
                continue
            if name not in declared:
                problems.append(f"{e.where}: {name} is not on attrserve's /metrics page")
                continue
            if name not in labels:
                if name not in NO_SAMPLES_HERE:
                    problems.append(f"{e.where}: {name} is declared but has no samples after requests of every outcome")
                continue
            for label, op, value in sel.matchers:
                if label in TARGET_LABELS:
                    continue
                if label not in labels[name]:
                    problems.append(f"{e.where}: {name} has no label {label!r} (it has {sorted(labels[name])})")
                    continue
                if label == "le" or "$" in value:
                    continue
                unknown = [v for v in _literal_values(op, value) if v not in values.get(label, set())]
                if unknown:
                    problems.append(f"{e.where}: {name}{{{label}{op}{value!r}}}: the server never exports {label}={unknown}")
    assert not problems, "\n".join(problems)


def test_every_exported_metric_is_on_the_dashboard_or_in_a_rule(exported) -> None:
    """The other direction: a metric added to metrics.py shows up somewhere an operator looks."""
    declared, _, _ = exported
    used = {sel.name for e in all_exprs() for sel in selectors(e.expr)}
    families = {name for name, kind in declared.items() if name.startswith(("attrserve_", "grpc_server_"))}
    unused = []
    for name in sorted(families):
        base = re.sub(r"_(total|created|bucket|sum|count)$", "", name)
        if name.endswith("_created"):
            continue
        if not any(u == name or re.sub(r"_(total|bucket|sum|count)$", "", u) == base for u in used):
            unused.append(name)
    assert not unused, f"exported but on no dashboard panel and in no rule: {unused}"
