"""`attrserve serve`'s settings: every ServerConfig and EngineLimits field has a flag and an ATTRSERVE_* variable,
defaults come from the dataclasses, and a flag wins over its variable."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from attrserve_engine import EngineLimits
from attrserve_service.cli import SETTINGS, server_config
from attrserve_service.config import ServerConfig


def test_every_setting_is_reachable_from_the_command_line() -> None:
    fields = {f.name for f in dataclasses.fields(ServerConfig) if f.name != "limits"}
    fields |= {f"limits.{f.name}" for f in dataclasses.fields(EngineLimits)}
    assert {s.field for s in SETTINGS} == fields
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)


def test_no_arguments_give_the_declared_defaults() -> None:
    config, logging_options = server_config([], environ={})
    assert config == ServerConfig() and logging_options == ("INFO", "text")
    _, logging_options = server_config(["--log-format", "json"], environ={"ATTRSERVE_LOG_LEVEL": "DEBUG"})
    assert logging_options == ("DEBUG", "json")


def test_flags_and_variables() -> None:
    env = {"ATTRSERVE_PORT": "7001", "ATTRSERVE_MAX_BATCH_ROWS": "64", "ATTRSERVE_BATCH_PROBE": "0",
           "ATTRSERVE_PLUGINS": "a.py,b.py", "ATTRSERVE_GRACE_SECONDS": "2.5", "ATTRSERVE_MODEL_REPOSITORY": "/models"}
    config, _ = server_config(["--port", "7002", "--metrics-port", "-1"], environ=env)
    assert config.port == 7002  # the flag wins
    assert config.metrics_port is None  # -1: off
    assert config.limits.default_max_batch_rows == 64 and config.limits.probe_batch_rows is False
    assert config.plugins == ["a.py", "b.py"] and config.grace_seconds == 2.5 and config.model_repository == Path("/models")
    config, _ = server_config(["--no-batch-probe", "--plugins", "x.py", "--plugins", "y.py"], environ={})
    assert config.limits.probe_batch_rows is False and config.plugins == ["x.py", "y.py"]


def test_busy_polling_is_set_in_microseconds_and_a_negative_time_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert server_config([], environ={})[0].busy_poll_us == 3000
    assert server_config(["--busy-poll-us", "0"], environ={"ATTRSERVE_BUSY_POLL_US": "500"})[0].busy_poll_us == 0
    assert server_config([], environ={"ATTRSERVE_BUSY_POLL_US": "500"})[0].busy_poll_us == 500
    with pytest.raises(SystemExit):
        server_config(["--busy-poll-us", "-1"], environ={})
    assert "--busy-poll-us -1: use 0 (off)" in capsys.readouterr().err


def test_a_negative_engine_thread_count_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    """It reached torch.set_num_threads in the engine process, which failed with a traceback before any model loaded."""
    assert server_config([], environ={"ATTRSERVE_ENGINE_THREADS": "3"})[0].engine_threads == 3
    for argv, environ in ((["--engine-threads", "-1"], {}), ([], {"ATTRSERVE_ENGINE_THREADS": "-2"})):
        with pytest.raises(SystemExit):
            server_config(argv, environ=environ)
        assert "--engine-threads -" in capsys.readouterr().err


def test_a_bad_variable_names_itself() -> None:
    with pytest.raises(SystemExit):
        server_config([], environ={"ATTRSERVE_PORT": "eighty"})


def test_help_lists_every_flag_and_variable() -> None:
    out = subprocess.run([sys.executable, "-m", "attrserve_service.cli", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for s in SETTINGS:
        assert s.flag in out.stdout and s.env in out.stdout
