"""The `attrserve` command: `attribute`, `models`, `describe`, `repository`, `load` and `unload` call a server; `serve`
runs one (from the server package, imported only then).

Both packages install this module's `main` as `attrserve`, so the command is the same whichever was installed last.
It imports no torch: a client call starts in a fraction of a second."""

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

from . import viz
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


def _load(text: str, flag: str = "") -> Any:
    """A JSON literal, or the path of a .json or .npy file (no JSON literal ends that way); errors name `flag`."""
    prefix = f"{flag}: " if flag else ""
    try:
        if text.endswith(".npy"):
            return np.load(text)
        if text.endswith(".json"):
            with open(text) as f:
                return json.load(f)
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{prefix}not JSON (nor a .json or .npy file): {_shown(text)}: {e}") from None
    except OSError as e:
        raise ValueError(f"{prefix}cannot read {text}: {e.strerror or e}") from None


def _shown(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit] + "...")


def _load_dict(text: str | None, flag: str) -> dict[str, Any] | None:
    if text is None:
        return None
    value = _load(text, flag)
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
    for more in result.also:  # --also
        for i, a in enumerate(more.attributions if isinstance(more.attributions, tuple) else (more.attributions,)):
            which = f" of input {i}" if isinstance(more.attributions, tuple) else ""
            lines += _table(f"{more.algorithm}: attributions{which} {a.shape}", a)
        if more.convergence_delta is not None:
            lines += _table(f"{more.algorithm}: convergence delta", more.convergence_delta)
    if result.infidelity is not None:  # --evaluate
        lines += _table("infidelity", result.infidelity)
    if result.sensitivity_max is not None:
        lines += _table("sensitivity_max", result.sensitivity_max)
    t = result.timing
    lines.append(
        f"timing: queue {t['queue_ms']:.2f} ms, compute {t['compute_ms']:.2f} ms, "
        f"total {t['total_ms']:.2f} ms, passes {t['passes']}, pass_rows {t['pass_rows']}, "
        f"pass_requests {t['pass_requests']}"
    )
    return "\n".join(lines)


def _listed(attributions: np.ndarray | tuple[np.ndarray, ...]) -> Any:
    return [a.tolist() for a in attributions] if isinstance(attributions, tuple) else attributions.tolist()


def _as_json(result: Attribution) -> str:
    value: dict[str, Any] = {
        "request_id": result.request_id,
        "model_version": result.model_version,
        "seed": result.seed,
        "attributions": _listed(result.attributions),
        "convergence_delta": None if result.convergence_delta is None else result.convergence_delta.tolist(),
        "outputs": None if result.outputs is None else result.outputs.tolist(),
        "timing": result.timing,
    }
    if result.also:  # --also: one entry per extra algorithm, in the order asked
        value["also"] = [
            {
                "algorithm": a.algorithm,
                "attributions": _listed(a.attributions),
                "convergence_delta": None if a.convergence_delta is None else a.convergence_delta.tolist(),
            }
            for a in result.also
        ]
    for metric in ("infidelity", "sensitivity_max"):  # --evaluate
        if (scores := getattr(result, metric)) is not None:
            value[metric] = scores.tolist()
    return json.dumps(value)


def _seconds(text: str) -> float:
    """--timeout: a positive number of seconds (gRPC fails a call with a timeout of 0, a negative one or nan at once)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


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
    p.add_argument(
        "--also",
        action="append",
        metavar="JSON",
        help='one more algorithm on the same inputs, as the client\'s also= entries: {"algorithm": "saliency", "params": {...}, '
        '"noise_tunnel": {...}, "layer": ..., "return_convergence_delta": true}; JSON or a .json file; repeatable',
    )
    p.add_argument(
        "--evaluate",
        metavar="JSON",
        help='quality metrics of the attributions, as the client\'s evaluate=: {"infidelity": {"n_perturb_samples": 10}, '
        '"sensitivity_max": {}}',
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--return-convergence-delta", action="store_true")
    p.add_argument("--return-outputs", action="store_true")
    p.add_argument("--request-id", default="")
    p.add_argument("--timeout", type=_seconds, help="seconds (inf: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    g = p.add_argument_group("pictures (needs matplotlib: pip install 'attrserve-client[viz]')")
    g.add_argument(
        "--render",
        metavar="FILE",
        help="also draw example 0's attributions (of the first input) to FILE: .png for an image or bars of features, "
        ".html (or .png with --render-tokens) for highlighted tokens",
    )
    g.add_argument("--render-kind", choices=viz.KINDS, default="auto", help="what to draw (default: from FILE and the shape)")
    g.add_argument("--render-method", choices=viz.METHODS, help="for images (default: blended_heat_map)")
    g.add_argument("--render-sign", choices=viz.SIGNS, default="absolute_value", help="for images (default: absolute_value)")
    g.add_argument("--render-tokens", metavar="WORDS", help='the words of a text input: a JSON list, a .json file or "the movie was ..."')
    g.add_argument("--render-feature-names", metavar="NAMES", help="the names of tabular features: a JSON list or a .json file")
    return p


def _words(text: str | None, flag: str) -> list[str] | None:
    """A JSON list (or .json file) of strings; for --render-tokens also plain words separated by spaces."""
    if text is None:
        return None
    if flag == "--render-tokens" and not text.lstrip().startswith("[") and not text.endswith(".json"):
        return text.split()
    value = _load(text, flag)
    if not isinstance(value, list):
        raise ValueError(f"{flag} must be a JSON list")
    return [str(v) for v in value]


def _draw(args: argparse.Namespace, inputs: list[Any], result: Attribution) -> int:
    """--render: draws the first input's attributions for example 0 with attrserve_client.viz."""
    attributions = result.attributions[0] if isinstance(result.attributions, tuple) else result.attributions
    try:
        kind = viz.render(
            attributions,
            np.asarray(inputs[0]),
            args.render,
            kind=args.render_kind,
            tokens=_words(args.render_tokens, "--render-tokens"),
            feature_names=_words(args.render_feature_names, "--render-feature-names"),
            method=args.render_method,
            sign=args.render_sign,
        )
    except (ImportError, ValueError, OSError) as e:
        return _error(f"--render: {e}")
    print(f"wrote {args.render} ({kind})", file=sys.stderr)
    return 0


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


# `attrserve --help`: each command with one line, in this order.
COMMANDS = {
    "serve": "run the server (needs the server package; `attrserve serve --help` lists its settings)",
    "attribute": "attributions of inputs from a server (--also: more algorithms, --evaluate: their quality)",
    "models": "the served models: version, state, inputs, layers and algorithms",
    "describe": "everything the server says about one model (GetModel): config, inputs, layers, algorithms, refusals",
    "repository": "every model version in the server's repository and its state",
    "load": "load or reload a model (server run with --model-control explicit)",
    "unload": "unload a model or one version (server run with --model-control explicit)",
}
_EXAMPLES = """\
examples:
  attrserve serve --port 50051                       # the built-in demo models
  attrserve models                                   # what 127.0.0.1:50051 serves
  attrserve describe toy --json
  attrserve attribute --model toy --algorithm integrated_gradients \\
      --inputs '[[0.3, 0.5, 0.25]]' --baselines 0 --target 0 --also '{"algorithm": "saliency"}'
  attrserve models --target-address attrserve.example.com:50051 --root-cert ca.crt   # TLS; token: $ATTRSERVE_TOKEN

Every client command takes --target-address HOST:PORT (default 127.0.0.1:50051), --timeout SECONDS, --json and the
TLS/token options; `attrserve COMMAND --help` lists them. Errors print "error: ..." on stderr and exit 2."""
_SERVER_MISSING = (
    "error: `attrserve serve` needs the attrserve server, which is not installed here (only the client is).\n"
    "Install both from a checkout of attrserve: pip install ./clients/python .   (or run `make serve` there)"
)


def usage() -> str:
    """`attrserve --help`."""
    width = max(map(len, COMMANDS))
    lines = [
        "usage: attrserve COMMAND [options]    (attrserve COMMAND --help for its options)",
        "",
        "Explanations of PyTorch models from an attrserve gRPC server (Captum's algorithms).",
        "",
        "commands:",
        *(f"  {name.ljust(width)}  {text}" for name, text in COMMANDS.items()),
        "",
        _EXAMPLES,
    ]
    return "\n".join(lines)


def serve(argv: Sequence[str]) -> int:
    """`attrserve serve`: the server package's command, imported only now (it imports torch)."""
    try:
        from attrserve_service.cli import serve_main
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("attrserve_service", "attrserve_engine"):
            raise  # the server is there but broken (e.g. no torch): show the real error
        print(_SERVER_MISSING, file=sys.stderr)
        return 2
    return serve_main(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """The `attrserve` command: the first word picks the command (COMMANDS); options alone mean `attribute`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    subcommands = {
        "serve": serve,
        "models": models_main,
        "describe": describe_main,
        "repository": repository_main,
        "load": load_main,
        "unload": unload_main,
    }
    if argv[0] in subcommands:
        return subcommands[argv[0]](argv[1:])
    if not argv[0].startswith("-") and argv[0] != "attribute":
        print(f"error: unknown command {argv[0]!r}; use one of {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    if argv[:1] == ["attribute"]:
        argv = argv[1:]
    parser = _attribute_parser()
    args = parser.parse_args(argv)
    if args.render is not None:
        try:  # before the request, not after it
            viz.require_matplotlib()
        except ImportError as e:
            return _error(str(e))
    try:
        with _connect(parser, args) as client:
            inputs = [_load(x, "--inputs") for x in args.inputs]
            baselines = [_load(x, "--baselines") for x in args.baselines or ()]
            also = [_load_dict(x, "--also") for x in args.also or ()]
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
                additional_forward_args=_one_or_tuple([_load(x, "--additional-forward-args") for x in args.additional_forward_args or ()]),
                feature_mask=_one_or_tuple([_load(x, "--feature-mask") for x in args.feature_mask or ()]),
                layer=args.layer,
                params=_load_dict(args.params, "--params"),
                noise_tunnel=_load_dict(args.noise_tunnel, "--noise-tunnel"),
                seed=args.seed,
                return_convergence_delta=args.return_convergence_delta,
                return_outputs=args.return_outputs,
                model_version=args.model_version,
                request_id=args.request_id,
                also=also or None,
                evaluate=_load_dict(args.evaluate, "--evaluate"),
                timeout=args.timeout,
            )
    except grpc.RpcError as e:
        return _error(f"{e.code().name}: {e.details()}")
    except (ValueError, TypeError, OSError) as e:  # unreadable or ill-formed arguments
        return _error(str(e))
    print(_as_json(result) if args.json else _render(result))
    return 0 if args.render is None else _draw(args, inputs, result)


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
    p.add_argument("--timeout", type=_seconds, help="seconds (inf: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _dtype(value: int) -> str:
    """DATA_TYPE_FLOAT32 → "float32"; "any" for an unspecified dtype."""
    try:
        name = _DT.Name(cast("tensor_pb2.DataType", value)).removeprefix("DATA_TYPE_").lower()
    except ValueError:
        return str(value)
    return "any" if name == "unspecified" else name


def _inputs(info: pb.ModelInfo) -> list[dict[str, Any]]:
    """The model's declared inputs: name, dtype and per-example dims (-1: varies)."""
    return [{"name": i.name, "dtype": _dtype(i.dtype), "dims": list(i.dims)} for i in info.config.inputs]


def _input_text(spec: dict[str, Any]) -> str:
    """{"name": "x", "dtype": "float32", "dims": [-1, 3]} → "x:float32[*,3]" (dims per example; *: varies)."""
    return f"{spec['name']}:{spec['dtype']}[{','.join('*' if d < 0 else str(d) for d in spec['dims'])}]"


def models_main(argv: Sequence[str] | None = None) -> int:
    """`attrserve models`: the served models, their versions, readiness, state, inputs (name:dtype[dims per example]),
    layer count and algorithms (--json: the layers and the algorithms each cannot serve, with why)."""
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
            "inputs": _inputs(m),
            "layers": list(m.layers),
            "algorithms": [algorithm_name(a) for a in m.algorithms] + list(m.custom_algorithms),
            "refused": {r.name: r.reason for r in m.refused},  # the algorithms it cannot serve, and why
        }
        for m in models
    ]
    if args.json:
        print(json.dumps({"models": rows}))
        return 0
    _print_table(
        [("name", "version", "ready", "state", "inputs", "layers", "algorithms")]
        + [
            (
                r["name"],
                r["version"],
                "yes" if r["ready"] else "no",
                r["state"],
                " ".join(map(_input_text, r["inputs"])) or "-",
                str(len(r["layers"])),
                ", ".join(r["algorithms"]),
            )
            for r in rows
        ]
    )
    _print_reasons(rows, "name")
    return 0


def _describe_text(info: pb.ModelInfo) -> list[str]:
    config = info.config
    lines = [f"model {config.name} version {config.version}: {state_name(info.state)}" + ("" if info.ready else " (not ready)")]
    if info.reason:
        lines.append(f"reason: {info.reason}")
    lines.append("config:")
    for field, value in config.ListFields():
        if field.name in ("name", "version", "inputs", "output"):
            continue
        shown = (
            field.enum_type.values_by_number[value].name
            if field.enum_type is not None and value in field.enum_type.values_by_number
            else value
        )
        lines.append(f"  {field.name}: {shown}")
    lines.append("inputs:" if config.inputs else "inputs: not declared (any number, dtype and shape)")
    lines += [f"  {i['name'] or '-'}  {i['dtype']}  dims per example [{', '.join(map(str, i['dims']))}]" for i in _inputs(info)]
    which = config.output.WhichOneof("selector") if config.HasField("output") else None
    output = {"index": f"index {config.output.index}", "key": f"key {config.output.key!r}", None: "the forward's output"}[which]
    lines.append(f"output selector: {output}")
    lines.append(f"layers ({len(info.layers)}):" if info.layers else "layers: none (no layer methods)")
    lines += [f"  {layer}" for layer in info.layers]
    lines.append("algorithms: " + (", ".join(algorithm_name(a) for a in info.algorithms) or "none"))
    if info.custom_algorithms:
        lines.append("plugin algorithms: " + ", ".join(info.custom_algorithms))
    if info.refused:
        lines.append(f"refused ({len(info.refused)}):")
        lines += [f"  {r.name}: {r.reason}" for r in info.refused]
    if info.batch_probe:
        lines.append("batch probe (rows per pass: rows/s):")
        lines += [f"  {p.rows}: {p.rows_per_second:.1f}" for p in info.batch_probe]
    return lines


def describe_main(argv: Sequence[str] | None = None) -> int:
    """`attrserve describe MODEL [--version V]`: everything GetModel says about a model (--json: GetModel's ModelInfo
    as JSON, with the proto's field names)."""
    p = _parser("attrserve describe", "Show everything an attrserve server says about one model (GetModel).")
    p.add_argument("model")
    p.add_argument("--version", default="", help="one version (default: the one the server serves by default)")
    args = p.parse_args(argv)
    try:
        with _connect(p, args) as client:
            info = client.get_model(args.model, args.version, timeout=args.timeout)
    except grpc.RpcError as e:
        return _error(f"{e.code().name}: {e.details()}")
    if args.json:
        from google.protobuf import json_format

        value = json_format.MessageToDict(
            info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, unquote_int64_if_possible=True
        )
        value["state"] = state_name(info.state)
        value["algorithms"] = [algorithm_name(a) for a in info.algorithms]
        print(json.dumps(value))
        return 0
    print("\n".join(_describe_text(info)))
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
