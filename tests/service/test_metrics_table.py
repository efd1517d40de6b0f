"""The README's metrics table and service/attrserve_service/metrics.py list the same metrics, types and labels."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from attrserve_service import metrics

README = Path(__file__).resolve().parents[2] / "README.md"


def declared() -> dict[str, tuple[str, tuple[str, ...]]]:
    found = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            found[name] = (value._type, tuple(value._labelnames))
    return found


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    text = README.read_text()
    table = text[text.index("<!-- metrics-table -->") :].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines():
        match = re.match(r"\| `([a-z_]+)` \| (counter|gauge|histogram) \| ([^|]*) \|", line)
        if match:
            labels = tuple(label.strip() for label in match.group(3).split(",") if label.strip() not in ("", "—"))
            rows[match.group(1)] = (match.group(2), labels)
    return rows


def test_the_readme_table_lists_every_metric_with_its_type_and_labels() -> None:
    assert documented() == declared()


def test_metric_names_follow_the_conventions() -> None:
    for name, (kind, labels) in declared().items():
        assert name.startswith(("attrserve_", "grpc_server_")), name
        assert (kind == "counter") == name.endswith("_total"), name
        assert ":" not in name and "request_id" not in labels
