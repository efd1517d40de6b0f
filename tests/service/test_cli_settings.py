"""`attrserve serve`'s settings: every ServerConfig and EngineLimits field has a flag and an ATTRSERVE_* variable,
defaults come from the dataclasses, and a flag wins over its variable."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from attrserve_engine import EngineLimits
from attrserve_service.cli import MINIMUMS, SETTINGS, server_config
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
    assert "--busy-poll-us -1: must be 0 or more" in capsys.readouterr().err


def test_every_numeric_setting_below_its_least_value_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    """A negative limit made a server that said SERVING and refused every request (--max-queued-requests -1: "this
    server holds 0 requests", --max-n-steps -1: "over this server's limit of -1"); --engine-threads -1 failed in the
    engine process with a traceback. Each numeric setting has its least value (MINIMUMS), given as a flag or as its
    variable: refused at start, naming it. The least value itself is taken."""
    numeric = {s.flag: s for s in SETTINGS if s.parse in (int, float)}
    assert set(numeric) - set(MINIMUMS) == {"--metrics-port"}  # a new numeric setting must say its least value
    for flag, least in MINIMUMS.items():
        s = numeric[flag]
        below = s.parse("-1") if least == 0 else s.parse("0")
        for argv, environ in (([flag, str(below)], {}), ([], {s.env: str(below)})):
            with pytest.raises(SystemExit):
                server_config(argv, environ=environ)
            err = capsys.readouterr().err
            assert f"must be {least:g} or more" in err and (flag in err if argv else s.env in err), err
        config, _ = server_config([flag, str(s.parse(str(least)))], environ={})
        field = s.field.removeprefix("limits.")
        assert getattr(config.limits if s.field.startswith("limits.") else config, field) == least


def test_a_port_above_65535_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    """gRPC bound --port 70000 as port 4464 (70000 - 65536) and served there."""
    for argv, environ, named in (
        (["--port", "70000"], {}, "--port 70000"),
        ([], {"ATTRSERVE_METRICS_PORT": "65536"}, "ATTRSERVE_METRICS_PORT='65536'"),
    ):
        with pytest.raises(SystemExit):
            server_config(argv, environ=environ)
        assert f"{named}: must be 65535 or less" in capsys.readouterr().err
    config, _ = server_config(["--port", "65535", "--metrics-port", "65535"], environ={})
    assert (config.port, config.metrics_port) == (65535, 65535)


def test_a_bad_variable_names_itself() -> None:
    with pytest.raises(SystemExit):
        server_config([], environ={"ATTRSERVE_PORT": "eighty"})


def test_help_lists_every_flag_and_variable() -> None:
    out = subprocess.run([sys.executable, "-m", "attrserve_service.cli", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for s in SETTINGS:
        assert s.flag in out.stdout and s.env in out.stdout


def test_every_float_setting_refuses_nan_and_infinity_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    """`value < minimum` is False for nan, so every float setting took nan and inf: --max-pass-seconds inf (or nan) then
    killed the engine's worker on every pass (int(rate * inf)), with tracebacks that never named the flag, and the server
    said SERVING with no model. Refused now, as a flag or as its variable, naming it (exit code 2)."""
    floats = [s for s in SETTINGS if s.parse is float]
    assert {s.flag for s in floats} >= {"--max-pass-seconds", "--grace-seconds", "--repository-poll-seconds", "--probe-seconds"}
    for s in floats:
        for text in ("nan", "inf", "-inf", "NaN", "Infinity"):
            for argv, environ, named in (([f"{s.flag}={text}"], {}, f"{s.flag} {float(text)}"), ([], {s.env: text}, f"{s.env}={text!r}")):
                with pytest.raises(SystemExit) as exit_:
                    server_config(argv, environ=environ)
                err = capsys.readouterr().err
                assert exit_.value.code == 2 and f"error: {named}: must be a finite number" in err, err
    config, _ = server_config(["--max-pass-seconds", "1e-3"], environ={"ATTRSERVE_GRACE_SECONDS": "2.5"})
    assert config.limits.max_pass_seconds == 1e-3 and config.grace_seconds == 2.5


def test_a_bad_log_level_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    """--log-level verbose (or ATTRSERVE_LOG_LEVEL=debg) passed the settings and failed in logging with a traceback
    and exit code 1; refused now with the other bad settings (exit code 2), naming it and the levels there are."""
    for argv, environ, named in ((["--log-level", "verbose"], {}, "--log-level verbose"),
                                 ([], {"ATTRSERVE_LOG_LEVEL": "debg"}, "ATTRSERVE_LOG_LEVEL='debg'"),
                                 ([], {"ATTRSERVE_LOG_LEVEL": "10"}, "ATTRSERVE_LOG_LEVEL='10'")):
        with pytest.raises(SystemExit) as exit_:
            server_config(argv, environ=environ)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"error: {named}: use one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in err, err
    assert server_config(["--log-level", "debug"], environ={})[1] == ("debug", "text")
    assert server_config([], environ={"ATTRSERVE_LOG_LEVEL": "Warning"})[1] == ("Warning", "text")
    out = subprocess.run([sys.executable, "-m", "attrserve_service.cli", "serve", "--port", "0", "--metrics-port", "-1",
                          "--log-level", "verbose"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--log-level verbose: use one of" in out.stderr, out.stderr


def test_a_port_in_use_is_an_error_naming_it() -> None:
    """A --port (or --metrics-port) that another program listens on ended `attrserve serve` with gRPC's RuntimeError
    (or asyncio's OSError) traceback and exit code 1; now an `error:` line naming the setting and that it is in use,
    and exit code 2 (with an engine process, and without one)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for ports, named in ((["--port", str(port), "--metrics-port", "-1"], f"--port {port}"),
                             (["--port", "0", "--metrics-port", str(port), "--no-engine-process"], f"--metrics-port {port}")):
            argv = [sys.executable, "-m", "attrserve_service.cli", "serve", *ports, "--host", "127.0.0.1", "--device", "cpu",
                    "--no-batch-probe"]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            assert out.returncode == 2, out.stderr
            assert "Traceback" not in out.stderr, out.stderr
            assert f"error: {named}: cannot listen on 127.0.0.1:{port}: address already in use" in out.stderr, out.stderr
