"""Structured logs: one JSON object per line, carrying the id of the request a line is about — from the engine's
worker (which passes the job's id) and from the request's own task (a context variable)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch

from attrserve_engine import AttributionJob, Engine, EngineLimits, ModelSpec
from attrserve_engine.algorithms.base import Algorithm
from attrserve_engine.plan import Plan, Task
from attrserve_service.logs import REQUEST_ID, JsonFormatter, _RequestId, configure
from doubles import Linear3


class Broken(Algorithm):
    """A plugin with a bug: its plan raises something that is not an AttributionError (INTERNAL)."""

    name = "broken"

    def plan(self, task: Task) -> Plan:
        raise RuntimeError("a bug in the plugin")
        yield  # a generator


@pytest.fixture
def json_lines():
    """Log records of attrserve's loggers, formatted as `attrserve serve --log-format json` does."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.addFilter(_RequestId())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    yield lines
    root.removeHandler(handler)


def test_a_failing_job_logs_one_json_line_with_its_request_id(json_lines) -> None:
    engine = Engine(EngineLimits(probe_batch_rows=False))
    engine.algorithms["broken"] = Broken()
    engine.load(ModelSpec(name="m", module=Linear3()))
    try:
        job = AttributionJob(model="m", algorithm="broken", inputs=(torch.zeros(1, 3),), target=0, request_id="req-42")
        with pytest.raises(RuntimeError):
            engine.attribute(job, timeout=10)
    finally:
        engine.shutdown()
    entries = [json.loads(line) for line in json_lines]
    failed = [e for e in entries if e["message"] == "plan failed"]
    assert len(failed) == 1
    assert failed[0]["request_id"] == "req-42" and failed[0]["level"] == "ERROR"
    assert "RuntimeError: a bug in the plugin" in failed[0]["exception"]
    assert failed[0]["logger"] == "attrserve_engine.scheduler" and failed[0]["time"].endswith("Z")


def test_lines_written_while_handling_a_request_carry_its_id(json_lines) -> None:
    log = logging.getLogger("attrserve_service.test")

    async def handle(request_id: str) -> None:
        REQUEST_ID.set(request_id)  # what methods.py does for each RPC's task
        await asyncio.sleep(0)
        log.warning("about %s", request_id)

    async def main() -> None:
        await asyncio.gather(handle("a"), handle("b"))
        log.warning("outside")

    asyncio.run(main())
    entries = {e["message"]: e for e in map(json.loads, json_lines) if e["logger"] == "attrserve_service.test"}
    assert entries["about a"]["request_id"] == "a" and entries["about b"]["request_id"] == "b"
    assert "request_id" not in entries["outside"]


def test_a_long_request_id_is_cut_in_log_lines(json_lines) -> None:
    """A client's request id of any length went whole into every log line about its request; a line carries its first
    200 characters and its length, and a short one whole."""
    log = logging.getLogger("attrserve_service.test")
    for request_id in ("x" * 200, "y" * 100_000):
        REQUEST_ID.set(request_id)
        log.warning("about it")
    REQUEST_ID.set("")
    ids = [e["request_id"] for e in map(json.loads, json_lines) if e["logger"] == "attrserve_service.test"]
    assert ids == ["x" * 200, "y" * 200 + "... (100000 characters)"]


def test_configure_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="text, json"):
        configure("INFO", "xml")
