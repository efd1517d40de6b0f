"""Helpers for the tests of deploy/prometheus and deploy/grafana: where the files are, promtool and prometheus,
every PromQL expression the deployment ships, the metric names an expression reads, and an `attrserve serve`
subprocess to scrape.

Imported by tests/deploy/test_prometheus_rules.py, test_dashboard.py, test_promql_metrics.py and
test_prometheus_e2e.py (pytest puts this folder on sys.path for them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from servers import ServeProcess, stop_process

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules_test.yaml"
RULES_README = ROOT / "deploy" / "prometheus" / "README.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "attrserve.json"
K8S = ROOT / "deploy" / "k8s"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
INSTALL = "apt-get install -y prometheus (Debian's package has the server and promtool)"
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool is not installed: {INSTALL}")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason=f"prometheus is not installed: {INSTALL}")

# Labels a scrape adds to every series (static configs: job, instance; prometheus-operator's ServiceMonitor also
# namespace, pod, service, container, endpoint), so an expression may match or group by them on any metric.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service", "container", "endpoint"})
# Series Prometheus makes itself for each target, and the series of its alerts.
SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added", "ALERTS", "ALERTS_FOR_STATE"})


def promtool(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# -- the expressions ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expr:
    where: str  # file and rule or panel, for messages
    expr: str  # PromQL (Grafana's variables already replaced for dashboard expressions)


def load_rules(path: Path = RULES) -> list[dict]:
    """Every rule (recording and alerting) of a Prometheus rule file, with `group` added."""
    doc = yaml.safe_load(path.read_text())
    return [dict(rule, group=group["name"]) for group in doc["groups"] for rule in group["rules"]]


def recorded_names(path: Path = RULES) -> set[str]:
    return {rule["record"] for rule in load_rules(path) if "record" in rule}


def rule_exprs(path: Path = RULES) -> list[Expr]:
    rel = path.relative_to(ROOT)
    return [Expr(f"{rel}: {rule.get('record') or rule.get('alert')}", rule["expr"]) for rule in load_rules(path)]


# Grafana's built-in variables, and ours (multi-value with "All" = .*), as a query sees them after interpolation.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "30s", "__range": "1h"}
DASHBOARD_VARIABLES = ("datasource", "job", "model", "algorithm")


def grafana_to_promql(expr: str, values: dict[str, str] | None = None) -> str:
    """The query Grafana sends: $__rate_interval and friends become durations, $job/$model/$algorithm a regex
    (`.*` unless `values` says otherwise). Unknown variables are left as they are (promtool then rejects them)."""
    values = {**dict.fromkeys(("job", "model", "algorithm"), ".*"), **GRAFANA_BUILTINS, **(values or {})}

    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", sub, expr)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(board: dict | None = None) -> Iterator[dict]:
    """Every panel, rows' collapsed panels included."""
    for panel in (board or dashboard())["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(values: dict[str, str] | None = None) -> list[Expr]:
    board = dashboard()
    found = [
        Expr(f"{DASHBOARD.relative_to(ROOT)}: panel {p['id']} {p['title']!r} {t['refId']}", grafana_to_promql(t["expr"], values))
        for p in dashboard_panels(board)
        for t in p.get("targets", [])
    ]
    for var in board["templating"]["list"]:
        if var["type"] == "query":  # label_values(SELECTOR, label): the selector is PromQL
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query.strip())
            assert match, f"variable {var['name']}: expected label_values(selector, label), got {query!r}"
            found.append(Expr(f"{DASHBOARD.relative_to(ROOT)}: variable {var['name']}", grafana_to_promql(match.group(1), values)))
    return found


def _yaml_docs(path: Path) -> list:
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError:
        return []


def _walk(node: object) -> Iterator[dict]:
    """Every mapping in a YAML tree; a string that holds YAML (a ConfigMap's config.yaml) is walked too."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)
    elif isinstance(node, str) and "seriesQuery" in node:
        try:
            inner = yaml.safe_load(node)
        except yaml.YAMLError:
            return
        if not isinstance(inner, str):
            yield from _walk(inner)


def adapter_files() -> list[Path]:
    """prometheus-adapter rule configs under deploy/k8s: YAML files that mention seriesQuery."""
    if not K8S.is_dir():
        return []
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml") and "seriesQuery" in p.read_text())


def adapter_exprs() -> list[Expr]:
    """seriesQuery and metricsQuery of every prometheus-adapter rule, the latter with its Go template filled in the
    way the adapter does for one pod (<<.Series>>, <<.LabelMatchers>>, <<.GroupBy>>)."""
    found = []
    for path in adapter_files():
        rel = path.relative_to(ROOT)
        for doc in _yaml_docs(path):
            for node in _walk(doc):
                if "seriesQuery" not in node:
                    continue
                series_query = node["seriesQuery"]
                found.append(Expr(f"{rel}: seriesQuery", series_query))
                if "metricsQuery" in node:
                    series = re.match(r"\s*([a-zA-Z_:][\w:]*)", series_query)
                    query = node["metricsQuery"]
                    query = query.replace("<<.Series>>", series.group(1) if series else "")
                    query = query.replace("<<.LabelMatchers>>", 'namespace="attrserve",pod=~"attrserve-.*"')
                    query = query.replace("<<.GroupBy>>", "namespace, pod")
                    found.append(Expr(f"{rel}: metricsQuery of {series_query}", query))
    return found


def k8s_rule_exprs() -> list[Expr]:
    """Expressions of PrometheusRule objects (prometheus-operator) under deploy/k8s, if any."""
    found = []
    if K8S.is_dir():
        for path in sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml")):
            for doc in _yaml_docs(path):
                if isinstance(doc, dict) and doc.get("kind") == "PrometheusRule":
                    for group in doc.get("spec", {}).get("groups", []):
                        for rule in group.get("rules", []):
                            name = rule.get("record") or rule.get("alert")
                            found.append(Expr(f"{path.relative_to(ROOT)}: {name}", rule["expr"]))
    return found


def k8s_recorded_names() -> set[str]:
    names = set()
    if K8S.is_dir():
        for path in sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml")):
            for doc in _yaml_docs(path):
                if isinstance(doc, dict) and doc.get("kind") == "PrometheusRule":
                    names |= {r["record"] for g in doc.get("spec", {}).get("groups", []) for r in g.get("rules", []) if "record" in r}
    return names


# -- metric names in PromQL ---------------------------------------------------------------------------------------

# Words that are not metric names where a name could stand: aggregation operators (followed by `by`/`without` or a
# parenthesis), binary set operators and modifiers, and the number literals.
KEYWORDS = frozenset(
    {
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
        "limitk", "limit_ratio",
        "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "atan2",
        "inf", "nan", "start", "end",
    }
)  # fmt: skip

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)")
_TOKEN = re.compile(r"\{[^{}]*\}|" + _IDENT.pattern)
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")


@dataclass
class Selector:
    """One vector selector: `name{label op "value", ...}`."""

    name: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of a PromQL expression, found without a full parser: strings and durations are masked,
    grouping clauses (by/without/on/ignoring/group_*) removed, and an identifier counts as a metric name unless it is
    a keyword or calls a function (`name(`). Good enough for the expressions we write; promtool checks their syntax."""
    strings: list[str] = []

    def keep(match: re.Match[str]) -> str:
        strings.append(match.group(0))
        return f"\x00{len(strings) - 1}\x00"

    masked = _STRING.sub(keep, expr)
    masked = re.sub(r"\[[^\]]*\]", " ", masked)  # [5m], [10m:30s]
    masked = _GROUPING.sub(" ", masked)
    found: list[Selector] = []
    pos = 0
    while True:
        match = _TOKEN.search(masked, pos)  # on the whole string, so the look-behind sees what precedes pos
        if match is None:
            return found
        end = match.end()
        token = match.group(0)
        if token.startswith("{"):  # matchers without a name: {__name__="x"} or a bare {job="y"}
            sel = Selector("", _matchers(token, strings))
            name = next((v for label, op, v in sel.matchers if label == "__name__" and op == "="), "")
            if name:
                found.append(Selector(name, [m for m in sel.matchers if m[0] != "__name__"]))
            pos = end
            continue
        rest = masked[end:]
        if token in KEYWORDS or re.match(r"\s*\(", rest):
            pos = end
            continue
        braces = re.match(r"\s*(\{[^{}]*\})", rest)
        if braces:
            found.append(Selector(token, _matchers(braces.group(1), strings)))
            pos = end + braces.end()
        else:
            found.append(Selector(token))
            pos = end


def _matchers(block: str, strings: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for label, op, ref in re.findall(r"([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*\x00(\d+)\x00", block):
        raw = strings[int(ref)]
        value = raw[1:-1] if raw[0] == "`" else raw[1:-1].encode().decode("unicode_escape")
        out.append((label, op, value))
    return out


def metric_names(expr: str) -> set[str]:
    return {s.name for s in selectors(expr)}


# -- processes ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A subprocess whose merged output is drained by a thread (the pipe never fills); stop() in a finally:
    terminate -> wait -> kill -> wait."""

    def __init__(self, args: Sequence[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            self.args,
            cwd=cwd,
            env=dict(os.environ if env is None else env, PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines[-200:])

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        until = time.monotonic() + timeout
        regex = re.compile(pattern)
        seen = 0
        while True:
            while seen < len(self.lines):
                match = regex.search(self.lines[seen])
                seen += 1
                if match:
                    return match
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"`{' '.join(self.args)}` exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > until:
                raise AssertionError(f"`{' '.join(self.args)}` printed no line matching {pattern!r} in {timeout:.0f} s:\n{self.output()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.proc, self._reader, timeout)


class Attrserve(ServeProcess):
    """`attrserve serve` with the demo models and /metrics, on ports it binds itself (servers.ServeProcess)."""

    def __init__(self, timeout: float = 90.0) -> None:
        super().__init__(["--no-batch-probe"], metrics=True, start_timeout=timeout)

    @property
    def metrics_address(self) -> str:
        return f"{self.host}:{self.metrics_port}"

    def scrape(self) -> str:
        return urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=10).read().decode()


def temp_dir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=prefix)
