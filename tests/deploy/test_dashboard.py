"""deploy/grafana/attrserve.json: a Grafana dashboard model whose every panel queries the `${datasource}` variable
with PromQL that filters by the job, model and algorithm variables wherever the metric has those labels."""

from __future__ import annotations

import json
import re

from promkit import DASHBOARD, DASHBOARD_VARIABLES, GRAFANA_BUILTINS, dashboard, dashboard_panels, load_rules, selectors

from attrserve_service import metrics as server_metrics

# Panels the dashboard must have (a word of each title), per the operators' questions.
REQUIRED_TITLES = (
    "Requests by model and algorithm",
    "Non-OK requests by code",
    "Latency by model and algorithm",
    "Queue wait vs compute",
    "Rows per fused pass",
    "Requests per fused pass",
    "Queue depth: requests",
    "Queue depth: rows",
    "In flight",
    "Model readiness",
    "Engine workers",
    "Dropped and refused requests by reason",
    "Pass splits by reason",
    "Convergence delta",
)


def _declared_labels() -> dict[str, set[str]]:
    """Every exported sample name → its labels, from the metric objects metrics.py declares."""
    out: dict[str, set[str]] = {}
    for obj in vars(server_metrics).values():
        if hasattr(obj, "_labelnames") and hasattr(obj, "_type"):
            labels = set(obj._labelnames)
            name = obj._name
            kind = obj._type
            if kind == "counter":
                out[f"{name}_total"] = labels
            elif kind == "histogram":
                out[f"{name}_bucket"] = labels | {"le"}
                out[f"{name}_sum"] = out[f"{name}_count"] = labels
            else:
                out[name] = labels
    return out


def test_valid_json_with_the_dashboard_fields() -> None:
    board = json.loads(DASHBOARD.read_text())
    for key in ("title", "uid", "panels", "templating", "schemaVersion", "time"):
        assert key in board, key
    assert board["uid"] == "attrserve"
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36  # datasource refs as {type, uid}


def test_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert set(DASHBOARD_VARIABLES) <= set(variables), sorted(variables)
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("job", "model", "algorithm"):
        var = variables[name]
        assert var["type"] == "query", name
        assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert re.fullmatch(rf"label_values\(.+,\s*{name}\)", query), f"{name}: {query}"
        assert var["includeAll"] and var["multi"] and var["allValue"] == ".*", name
    # model's choices follow job, algorithm's follow job and model
    assert "$job" in variables["model"]["definition"]
    assert "$job" in variables["algorithm"]["definition"] and "$model" in variables["algorithm"]["definition"]


def test_panels_have_ids_positions_and_queries() -> None:
    panels = list(dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [p["title"] for p in panels]
    for required in REQUIRED_TITLES:
        assert required in titles, f"no panel {required!r}"
    cells: dict[tuple[int, int], int] = {}
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap"
                cells[(x, y)] = p["id"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no queries"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"panel {p['title']!r}: refIds repeat"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"panel {p['title']!r} {t['refId']}: empty expr"
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]


def test_queries_use_only_defined_variables() -> None:
    defined = set(DASHBOARD_VARIABLES) | set(GRAFANA_BUILTINS)
    for p in dashboard_panels():
        for t in p.get("targets", []):
            used = {a or b for a, b in re.findall(r"\$\{(\w+)[^}]*\}|\$(\w+)", t["expr"])}
            assert used <= defined, f"panel {p['title']!r}: undefined variables {used - defined}"


def test_every_query_filters_by_the_variables() -> None:
    """Per model and algorithm: each selector of a metric with a model (algorithm) label filters by $model
    ($algorithm); each selector filters by $job, so one dashboard serves several deployments."""
    labels = _declared_labels()
    recorded = {r["record"] for r in load_rules() if "record" in r}
    for p in dashboard_panels():
        for t in p.get("targets", []):
            for sel in selectors(t["expr"]):
                where = f"panel {p['title']!r} {t['refId']}: {sel.name}"
                matched = {(label, op, value) for label, op, value in sel.matchers}
                assert ("job", "=~", "$job") in matched, f"{where} does not filter by $job"
                has = labels.get(sel.name)
                if has is None:
                    assert sel.name in recorded or sel.name == "up", f"{where}: not a metric attrserve exports or a recording rule"
                    has = {"model"} if "model" in t["expr"] else set()
                if "model" in has:
                    assert ("model", "=~", "$model") in matched, f"{where} does not filter by $model"
                if "algorithm" in has:
                    assert ("algorithm", "=~", "$algorithm") in matched, f"{where} does not filter by $algorithm"
