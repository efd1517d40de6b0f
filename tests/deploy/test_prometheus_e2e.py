"""A real Prometheus scrapes a running attrserve every second and evaluates deploy/prometheus/rules.yaml: the
counters it stores equal the requests sent, the recording rules evaluate without error and classify the codes as
the rules say, latency quantiles are sane, no alert fires on a healthy server, and every dashboard query and
prometheus-adapter query runs. Everything on 127.0.0.1, bounded in time, stopped in a finally."""

from __future__ import annotations

import bisect
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from promkit import (
    PROMETHEUS,
    RULES,
    Attrserve,
    Process,
    adapter_exprs,
    dashboard,
    dashboard_panels,
    free_port,
    grafana_to_promql,
    needs_prometheus,
)

from attrserve_client import AttributionClient
from attrserve_service.metrics import _LATENCY_BUCKETS

OK_IG, OK_SALIENCY, NOT_FOUND, DEADLINE = 20, 20, 5, 3
# Panels that may be empty on a CPU server: why.
EMPTY_PANELS_OK = {
    "Device memory": "attrserve_device_memory_bytes exists on CUDA devices only",
    # (test_promql_metrics.py scrapes a server with TLS and token files, where both have series)
    "TLS certificate days left": "the certificate's expiry exists with TLS only; this server is plaintext",
    "Credential reloads": "the reload counts exist for TLS or token files only; this server has neither",
}


class Prom:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as e:  # 400/422 carry Prometheus' error message
            body = json.loads(e.read())
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query, now or at time `at`."""
        data = self.get("/api/v1/query", query=expr, **({} if at is None else {"time": f"{at:.3f}"}))
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return data["result"]

    def value(self, expr: str, at: float | None = None) -> float | None:
        result = self.query(expr, at)
        assert len(result) <= 1, f"{expr}: {len(result)} series"
        return float(result[0]["value"][1]) if result else None

    def last_good_scrape(self) -> float:
        """When attrserve was last scraped successfully. A query at that instant sees every gauge: after a scrape that
        failed (a busy machine, 1 s timeout) Prometheus marks the target's series stale and a query now sees none."""
        at = self.value('timestamp(up{job="attrserve"} == 1)')
        if at is None:
            at = self.value('max_over_time(timestamp(up{job="attrserve"} == 1)[1m:1s])')
        assert at is not None, "no successful scrape in the last minute"
        return at


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.25, show: Callable[[], Any] | None = None) -> Any:
    """Poll `check` until it returns something truthy (returned) or `timeout` s pass (the test fails, with what
    `show` returns then)."""
    until = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (OSError, AssertionError) as e:  # not up yet, or a query Prometheus cannot answer yet
            last = e
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > until:
            raise AssertionError(f"waited {timeout:.0f} s for {what}; last: {last!r}" + (f"; {show()}" if show else ""))
        time.sleep(interval)


def send_traffic(address: str) -> dict[tuple[str, str], float]:
    """OK, NOT_FOUND and DEADLINE_EXCEEDED requests; the slowest client-side latency per (model, algorithm)."""
    slowest: dict[tuple[str, str], float] = {}
    x = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]
    with AttributionClient(address) as client:
        for i in range(OK_IG + OK_SALIENCY):
            algorithm = "integrated_gradients" if i < OK_IG else "saliency"
            extra = {"return_convergence_delta": True} if algorithm == "integrated_gradients" else {}
            start = time.monotonic()
            client.attribute("toy", algorithm, x, target=0, timeout=30, **extra)
            key = ("toy", algorithm)
            slowest[key] = max(slowest.get(key, 0.0), time.monotonic() - start)
        for _ in range(NOT_FOUND):
            try:
                client.attribute("nope", "saliency", x, target=0, timeout=30)
                raise AssertionError("model nope answered")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e
        image = np.random.default_rng(0).random((32, 3, 16, 16)).astype(np.float32)
        for _ in range(DEADLINE):  # 32 examples x 1000 steps take ~2 s on a CPU (one takes 45 ms warm): 50 ms passes on the server
            try:
                client.attribute("image", "integrated_gradients", image, target=1, params={"n_steps": 1000}, timeout=0.05)
                raise AssertionError("a 1000-step request finished within 50 ms")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
    return slowest


@needs_prometheus
def test_prometheus_scrapes_attrserve_and_evaluates_the_rules(tmp_path: Path) -> None:
    assert PROMETHEUS is not None
    # Prometheus starts first and finds attrserve through a file (file_sd) once attrserve has bound its ports: its
    # scrape manager takes up new targets every 5 s, so the two start-ups overlap instead of adding up.
    targets = tmp_path / "targets.json"
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "attrserve", "file_sd_configs": [{"files": [str(targets)]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prometheus = Process(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        cwd=tmp_path,
    )
    server: Attrserve | None = None
    try:
        server = Attrserve()
        # namespace and pod, as the Kubernetes ServiceMonitor attaches them (the HPA's rule groups by them)
        entry = [{"targets": [server.metrics_address], "labels": {"namespace": "attrserve", "pod": "attrserve-0"}}]
        (tmp_path / "targets.tmp").write_text(json.dumps(entry))
        (tmp_path / "targets.tmp").rename(targets)  # atomically, as file_sd wants
        prom = Prom(port)

        def scraped() -> bool:
            if prometheus.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {prometheus.proc.returncode}:\n{prometheus.output()}")
            return prom.value('up{job="attrserve"}') == 1

        wait_until("the first scrape of attrserve", scraped, timeout=20)

        slowest = send_traffic(server.address)
        ok_total = OK_IG + OK_SALIENCY

        # -- the counters, exactly --------------------------------------------------------------------------
        # The server counts a request whose deadline passed when grpc cancels its handler, a moment after the client
        # gave up; and it counts it as CANCELLED when the client's cancel arrives before the server's own deadline
        # timer (the server's deadline runs from when the request arrived, a little after the client's): so each of
        # them is DEADLINE_EXCEEDED or CANCELLED.
        image_codes = 'sum by (grpc_code) (attrserve_attributions_completed_total{model="image", algorithm="integrated_gradients"} > 0)'

        def image_outcomes() -> dict[str, float]:
            return {r["metric"]["grpc_code"]: float(r["value"][1]) for r in prom.query(image_codes)}

        wait_until(
            "Prometheus to scrape every request",
            lambda: (
                prom.value('sum(attrserve_attributions_completed_total{job="attrserve", grpc_code="OK"})') == ok_total
                and prom.value('sum(attrserve_attributions_completed_total{grpc_code="NOT_FOUND"})') == NOT_FOUND
                and sum(image_outcomes().values()) == DEADLINE
            ),
            timeout=15,
            show=image_outcomes,
        )
        ok = {
            r["metric"]["algorithm"]: float(r["value"][1])
            for r in prom.query('sum by (algorithm) (attrserve_attributions_completed_total{model="toy", grpc_code="OK"})')
        }
        assert {algorithm: n for algorithm, n in ok.items() if n} == {"integrated_gradients": OK_IG, "saliency": OK_SALIENCY}
        assert prom.value('sum(attrserve_attributions_completed_total{model="unknown", grpc_code="NOT_FOUND"})') == NOT_FOUND
        outcomes = image_outcomes()
        assert set(outcomes) <= {"DEADLINE_EXCEEDED", "CANCELLED"} and outcomes.get("DEADLINE_EXCEEDED", 0) >= 1, outcomes
        server_errors = outcomes["DEADLINE_EXCEEDED"] / DEADLINE  # CANCELLED is no server error
        assert prom.value('sum(grpc_server_handled_total{grpc_method="Attribute", grpc_code="OK"})') == ok_total
        assert prom.value('sum(attrserve_convergence_delta_count{model="toy", algorithm="integrated_gradients"})') == 2 * OK_IG
        at = prom.last_good_scrape()
        assert prom.value("sum(attrserve_model_ready)", at) == prom.value("count(attrserve_model_ready)", at) == 4
        assert prom.value("min(attrserve_worker_up)", at) == 1

        # -- recording rules --------------------------------------------------------------------------------
        def rules_evaluated() -> list[dict]:
            groups = prom.get("/api/v1/rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return rules if rules and all(r["health"] != "unknown" for r in rules) else []

        rules = wait_until("every rule to be evaluated", rules_evaluated, timeout=10)
        broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
        assert not broken, broken
        loaded = {r["name"] for r in rules}
        assert {"attrserve:model_attribution_errors:ratio_rate5m", "AttrserveErrorBudgetBurnFast"} <= loaded

        # DEADLINE_EXCEEDED is a server error, CANCELLED is not (image/integrated_gradients saw only those two); OK is
        # not; NOT_FOUND is not either: model "unknown" (names a client made up) saw only NOT_FOUND, so it has no
        # server-error series. (Each group is evaluated every second on its own clock: wait for an evaluation after
        # the scrape above.)
        watched = (
            'attrserve:attributions:rate5m{model="toy", algorithm="integrated_gradients"}',
            'attrserve:model_attribution_errors:ratio_rate5m{model="image"}',
            'attrserve:model_attribution_errors:ratio_rate1h{model="image"}',
            image_codes,
        )
        wait_until(
            "the recording rules to see the traffic",
            lambda: (
                (prom.value(watched[0]) or 0) > 0
                and prom.value(watched[1]) == pytest.approx(server_errors)
                and prom.value(watched[2]) == pytest.approx(server_errors)
            ),
            timeout=10,
            show=lambda: {e: prom.get("/api/v1/query", query=e)["result"] for e in watched},
        )
        assert prom.value('attrserve:model_attribution_errors:ratio_rate5m{model="toy"}') == 0
        assert prom.value('attrserve:model_attribution_errors:ratio_rate5m{model="unknown"}') is None

        # -- latency quantiles: positive, and no higher than the bucket bound above the slowest answer --------------
        for (model, algorithm), seconds in slowest.items():
            bound = _LATENCY_BUCKETS[min(bisect.bisect_left(_LATENCY_BUCKETS, seconds), len(_LATENCY_BUCKETS) - 1)]
            selector = f'model="{model}", algorithm="{algorithm}"'
            for expr in (
                f"histogram_quantile(0.99, sum by (le) (rate(attrserve_attribution_duration_seconds_bucket{{{selector}}}[1m])))",
                f"histogram_quantile(0.5, sum by (le) (rate(attrserve_attribution_duration_seconds_bucket{{{selector}}}[1m])))",
                f"attrserve:attribution_duration_seconds:p99_rate5m{{{selector}}}",
            ):
                if expr.startswith("attrserve:"):  # a recording rule: its group evaluates on its own clock, maybe not yet
                    wait_until(f"{expr} to be recorded", lambda e=expr: prom.value(e) is not None, timeout=10)
                quantile = prom.value(expr)
                assert quantile is not None and 0 < quantile <= bound, f"{expr} = {quantile}; slowest answer {seconds:.4f} s"

        # -- no alert fires on a healthy server (those with a for: are at most pending this early) --------------
        firing = prom.query('ALERTS{alertstate="firing"}')
        pending = sorted({r["metric"]["alertname"] for r in prom.query('ALERTS{alertstate="pending"}')})
        assert firing == [], f"firing: {[r['metric'] for r in firing]} (pending: {pending})"

        # -- every dashboard query and adapter query runs; every panel shows data ------------------------------
        panels = [p for p in dashboard_panels(dashboard()) if p["type"] != "row"]

        def panels_without_data() -> list[str]:
            empty = []
            at = prom.last_good_scrape()
            for panel in panels:  # every query must run (Prom.get asserts success), even on the way
                results = [prom.query(grafana_to_promql(t["expr"]), at) for t in panel["targets"]]
                if not any(results) and panel["title"] not in EMPTY_PANELS_OK:
                    empty.append(panel["title"])
            return empty

        # series born with the traffic (the convergence delta's) need two scrapes before a rate() has a point
        try:
            wait_until("every dashboard panel to have data", lambda: not panels_without_data(), timeout=10)
        except AssertionError:
            raise AssertionError(f"dashboard panels without data: {panels_without_data()}") from None
        at = prom.last_good_scrape()
        for e in adapter_exprs():
            assert prom.query(e.expr, at), f"{e.where}: no data for {e.expr}"
    finally:
        try:
            prometheus.stop()
        finally:
            if server is not None:
                server.stop()
