"""Command line of the client side of attrserve: `attrserve attribute`, `models`, `repository`, `load` and `unload`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, cast

import grpc
import numpy as np

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import tensor_pb2

from .client import Attribution, AttributionClient, algorithm_name, algorithm_names

_MAX_COLUMNS = 12
_STATE_PREFIX = "MODEL_STATE_"
_DEFAULT_ADDRESS = "127.0.0.1:50051"
_TOKEN_ENV = "ATTRSERVE_TOKEN"
_DT = tensor_pb2.DataType
# A model input's wire dtype -> the numpy dtype JSON data is cast to. Absent (no cast): unspecified,
# bfloat16 (numpy has none) and any type this client does not know.
_CAST_TO = {
    _DT.DATA_TYPE_FLOAT32: np.dtype(np.float32),
    _DT.DATA_TYPE_FLOAT64: np.dtype(np.float64),
    _DT.DATA_TYPE_FLOAT16: np.dtype(np.float16),
    _DT.DATA_TYPE_INT64: np.dtype(np.int64),
    _DT.DATA_TYPE_INT32: np.dtype(np.int32),
    _DT.DATA_TYPE_INT16: np.dtype(np.int16),
    _DT.DATA_TYPE_INT8: np.dtype(np.int8),
    _DT.DATA_TYPE_UINT8: np.dtype(np.uint8),
    _DT.DATA_TYPE_BOOL: np.dtype(np.bool_),
}


def _load(text: str) -> Any:
    """A JSON literal, or the path of a .json or .npy file (no JSON literal ends that way)."""
    if text.endswith(".npy"):
        return np.load(text)
    if text.endswith(".json"):
        with open(text) as f:
            return json.load(f)
    return json.loads(text)


def _load_dict(text: str | None, flag: str) -> dict[str, Any] | None:
    if text is None:
        return None
    value = _load(text)
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object")
    return value


def _input_dtypes(client: AttributionClient, model: str, version: str, timeout: float | None) -> list[Any]:
    """The numpy dtype of each model input from GetModel (None where the config leaves it open);
    [] when GetModel fails: the Attribute call then reports the real error."""
    try:
        info = client.get_model(model, version, timeout=timeout)
    except grpc.RpcError:
        return []
    return [_CAST_TO.get(spec.dtype) for spec in info.config.inputs]


def _cast(value: Any, dtype: Any, *, floats_only: bool = False) -> Any:
    """JSON data (a Python list or number) as an array of the model input's dtype; numpy arrays
    (.npy files) keep their exact dtype. A cast that would change a value (1.5 or 300 to an int8
    input) is not made, so the server still names the dtype mismatch."""
    if dtype is None or isinstance(value, np.ndarray) or (floats_only and dtype.kind != "f"):
        return value
    try:
        array = np.asarray(value)
    except ValueError:  # ragged lists: left to the usual error
        return value
    if array.dtype.kind not in "biuf":
        return value
    if dtype.kind == "f":
        return array.astype(dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        cast = array.astype(dtype)
    return cast if np.array_equal(cast, array) else value


def _one_or_tuple(values: list[Any] | None) -> Any:
    # One flag means a single-input model (a single array back); repeats mean one per input.
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _target(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # JSON has no tuples, so "1,2" spells one tuple index for every example.
        return tuple(int(part) for part in text.split(","))


def _table(title: str, array: np.ndarray) -> list[str]:
    array = np.asarray(array)
    rows = array.reshape(1, -1) if array.ndim == 0 else array.reshape(array.shape[0], -1)
    cells = [[f"{v:.4f}" for v in row[:_MAX_COLUMNS]] for row in rows]
    width = max((len(c) for row in cells for c in row), default=6)
    more = " …" if rows.shape[1] > _MAX_COLUMNS else ""
    header = "example " + " ".join(f"{j:>{width}}" for j in range(min(rows.shape[1], _MAX_COLUMNS)))
    return [title, header + more] + [f"{i:>7} " + " ".join(f"{c:>{width}}" for c in row) + more for i, row in enumerate(cells)]


def _render(result: Attribution) -> str:
    lines = [f"model version {result.model_version}, seed {result.seed}"]
    if isinstance(result.attributions, tuple):
        for i, a in enumerate(result.attributions):
            lines += _table(f"attributions of input {i} {a.shape}", a)
    else:
        lines += _table(f"attributions {result.attributions.shape}", result.attributions)
    if result.convergence_delta is not None:
        lines += _table("convergence delta", result.convergence_delta)
    if result.outputs is not None:
        lines += _table(f"outputs {result.outputs.shape}", result.outputs)
    t = result.timing
    lines.append(
        f"timing: queue {t['queue_ms']:.2f} ms, compute {t['compute_ms']:.2f} ms, "
        f"total {t['total_ms']:.2f} ms, passes {t['passes']}, pass_rows {t['pass_rows']}, "
        f"pass_requests {t['pass_requests']}"
    )
    return "\n".join(lines)


def _as_json(result: Attribution) -> str:
    attributions = result.attributions
    return json.dumps(
        {
            "request_id": result.request_id,
            "model_version": result.model_version,
            "seed": result.seed,
            "attributions": ([a.tolist() for a in attributions] if isinstance(attributions, tuple) else attributions.tolist()),
            "convergence_delta": None if result.convergence_delta is None else result.convergence_delta.tolist(),
            "outputs": None if result.outputs is None else result.outputs.tolist(),
            "timing": result.timing,
        }
    )


def _add_connection(p: argparse.ArgumentParser) -> None:
    """The options of every command that connects: the address, TLS, client certificate and token."""
    p.add_argument("--target-address", default=_DEFAULT_ADDRESS, help="server host:port")
    g = p.add_argument_group("security")
    g.add_argument("--tls", action="store_true", help="connect over TLS, checking the server against the system's root certificates")
    g.add_argument("--root-cert", metavar="FILE", help="connect over TLS, checking the server against this CA certificate (PEM)")
    g.add_argument("--client-cert", metavar="FILE", help="mutual TLS: this client certificate (PEM; with --client-key)")
    g.add_argument("--client-key", metavar="FILE", help="mutual TLS: the private key of --client-cert (PEM)")
    g.add_argument(
        "--token",
        help=f"bearer token sent with every call (default: ${_TOKEN_ENV}; the variable keeps it out of the process list)",
    )


def _connect(p: argparse.ArgumentParser, args: argparse.Namespace) -> AttributionClient:
    """A client for the connection options of `args`; a bad option is a usage error (exit 2)."""
    if (args.client_cert is None) != (args.client_key is None):
        p.error("--client-cert and --client-key go together")
    token = args.token if args.token is not None else os.environ.get(_TOKEN_ENV) or None
    try:
        return AttributionClient(
            args.target_address,
            tls=args.tls,
            root_certificates=args.root_cert,
            client_cert=None if args.client_cert is None else (args.client_cert, args.client_key),
            token=token,
        )
    except ValueError as e:
        p.error(str(e))


def _attribute_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attrserve attribute", description="Ask an attrserve server for attributions.")
    _add_connection(p)
    p.add_argument("--model", required=True)
    p.add_argument("--model-version", default="")
    p.add_argument("--algorithm", required=True, help="one of: " + ", ".join(algorithm_names()))
    p.add_argument("--inputs", action="append", required=True, help="JSON literal, .json or .npy file; repeat once per model input")
    p.add_argument("--baselines", action="append", help="number, JSON literal, .json or .npy file (null: zeros); repeat once per input")
    p.add_argument("--target", help='an int, "i,j" for a tuple index, or a JSON list with one per example')
    p.add_argument("--additional-forward-args", action="append", help="JSON literal, .json or .npy; repeatable")
    p.add_argument("--feature-mask", action="append", help="JSON literal, .json or .npy; repeat once per input")
    p.add_argument("--layer")
    p.add_argument("--params", help='JSON object of the algorithm\'s parameters, e.g. {"n_steps": 50}')
    p.add_argument("--noise-tunnel", help='JSON object, e.g. {"nt_type": "smoothgrad", "nt_samples": 10}')
    p.add_argument("--seed", type=int)
    p.add_argument("--return-convergence-delta", action="store_true")
    p.add_argument("--return-outputs", action="store_true")
    p.add_argument("--request-id", default="")
    p.add_argument("--timeout", type=float, help="seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """`attrserve attribute`; a leading "attribute", "models", "repository", "load" or "unload" word picks the subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    subcommands = {"models": models_main, "repository": repository_main, "load": load_main, "unload": unload_main}
    if argv[:1] and argv[0] in subcommands:
        return subcommands[argv[0]](argv[1:])
    if argv[:1] == ["attribute"]:
        argv = argv[1:]
    parser = _attribute_parser()
    args = parser.parse_args(argv)
    try:
        with _connect(parser, args) as client:
            inputs = [_load(x) for x in args.inputs]
            baselines = [_load(x) for x in args.baselines or ()]
            # JSON numbers arrive as int64 or float32; cast them to the dtypes the model's config
            # declares, so `--inputs '[[1, 2, 3]]'` works for a float32 model.
            if any(isinstance(v, list) for v in inputs + baselines):
                dtypes = _input_dtypes(client, args.model, args.model_version, args.timeout)
                inputs = [_cast(v, dtypes[i] if i < len(dtypes) else None) for i, v in enumerate(inputs)]
                # Baselines only to a floating input's dtype (the server casts them to the input's anyway).
                baselines = [_cast(v, dtypes[i] if i < len(dtypes) else None, floats_only=True) for i, v in enumerate(baselines)]
            result = client.attribute(
                args.model,
                args.algorithm,
                _one_or_tuple(inputs),
                baselines=_one_or_tuple(baselines),
                target=_target(args.target),
                additional_forward_args=_one_or_tuple([_load(x) for x in args.additional_forward_args or ()]),
                feature_mask=_one_or_tuple([_load(x) for x in args.feature_mask or ()]),
                layer=args.layer,
                params=_load_dict(args.params, "--params"),
                noise_tunnel=_load_dict(args.noise_tunnel, "--noise-tunnel"),
                seed=args.seed,
                return_convergence_delta=args.return_convergence_delta,
                return_outputs=args.return_outputs,
                model_version=args.model_version,
                request_id=args.request_id,
                timeout=args.timeout,
            )
    except grpc.RpcError as e:
        return _error(f"{e.code().name}: {e.details()}")
    except (ValueError, TypeError, OSError) as e:  # unreadable or ill-formed arguments
        return _error(str(e))
    print(_as_json(result) if args.json else _render(result))
    return 0


def state_name(value: int) -> str:
    """The lower-case name of a `ModelState` value without its prefix ("ready"); its number if this proto predates it."""
    try:
        return pb.ModelState.Name(cast("pb.ModelState", value))[len(_STATE_PREFIX) :].lower()
    except ValueError:
        return str(value)


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns; the last one is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]).rstrip())


def _print_reasons(rows: Sequence[dict[str, Any]], name_key: str) -> None:
    reasons = [f"{r[name_key]} v{r['version']}: {r['reason']}" for r in rows if r["reason"]]
    if reasons:
        print()
        for line in reasons:
            print(line)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    _add_connection(p)
    p.add_argument("--timeout", type=float, help="seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def models_main(argv: Sequence[str] | None = None) -> int:
    """`attrserve models`: the served models, their versions, readiness, state and algorithms (--json: and the
    algorithms each cannot serve, with why)."""
    p = _parser("attrserve models", "List an attrserve server's models.")
    args = p.parse_args(argv)
    try:
        with _connect(p, args) as client:
            models = client.list_models(timeout=args.timeout)
    except grpc.RpcError as e:
        return _error(f"{e.code().name}: {e.details()}")
    rows: list[dict[str, Any]] = [
        {
            "name": m.config.name,
            "version": m.config.version,
            "ready": m.ready,
            "state": state_name(m.state),
            "reason": m.reason,
            "algorithms": [algorithm_name(a) for a in m.algorithms],
            "refused": {r.name: r.reason for r in m.refused},  # the algorithms it cannot serve, and why
        }
        for m in models
    ]
    if args.json:
        print(json.dumps({"models": rows}))
        return 0
    _print_table(
        [("name", "version", "ready", "state", "algorithms")]
        + [(r["name"], r["version"], "yes" if r["ready"] else "no", r["state"], ", ".join(r["algorithms"])) for r in rows]
    )
    _print_reasons(rows, "name")
    return 0


def _print_statuses(statuses: Sequence[pb.ModelStatus], as_json: bool) -> None:
    rows = [{"model": s.model, "version": s.version, "state": state_name(s.state), "reason": s.reason} for s in statuses]
    if as_json:
        print(json.dumps({"models": rows}))
        return
    _print_table([("model", "version", "state")] + [(r["model"], r["version"], r["state"]) for r in rows])
    _print_reasons(rows, "model")


def repository_main(argv: Sequence[str] | None = None) -> int:
    """`attrserve repository`: every model version in the server's repository and its state."""
    p = _parser("attrserve repository", "List the model versions in an attrserve server's repository and their states.")
    p.add_argument("--ready-only", action="store_true", help="only the versions that serve now")
    args = p.parse_args(argv)
    try:
        with _connect(p, args) as client:
            statuses = client.repository_index(ready_only=args.ready_only, timeout=args.timeout)
    except grpc.RpcError as e:
        return _error(f"{e.code().name}: {e.details()}")
    _print_statuses(statuses, args.json)
    return 0


def _control_main(argv: Sequence[str] | None, verb: str) -> int:
    p = _parser(
        f"attrserve {verb}",
        f"{verb.capitalize()} a model's versions on an attrserve server run with --model-control explicit.",
    )
    p.add_argument("model")
    p.add_argument("--version", default="", help="one version (default: all of them)")
    args = p.parse_args(argv)
    try:
        with _connect(p, args) as client:
            call = client.load_model if verb == "load" else client.unload_model
            statuses = call(args.model, args.version, timeout=args.timeout)
    except grpc.RpcError as e:
        return _error(f"{e.code().name}: {e.details()}")
    _print_statuses(statuses, args.json)
    return 0


def load_main(argv: Sequence[str] | None = None) -> int:
    """`attrserve load MODEL [--version V]`: loads (or reloads) a model; prints its versions' states."""
    return _control_main(argv, "load")


def unload_main(argv: Sequence[str] | None = None) -> int:
    """`attrserve unload MODEL [--version V]`: unloads a model (or one version); prints its versions' states."""
    return _control_main(argv, "unload")


if __name__ == "__main__":
    sys.exit(main())
