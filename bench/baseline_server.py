"""B2: the explanation server a user would write today, and the no-op transport ceiling.

    python bench/baseline_server.py --port 50071 [--noop] [--workers N]

It implements the same `attrserve.v1.AttributionService` proto as attrserve, so the same load client
drives both. `Attribute` decodes the request, runs the matching Captum algorithm on the model with the
request's parameters — one request per Captum call, no fusing — in a `concurrent.futures.ThreadPoolExecutor`
(default size, torch's default intra-op threads: what a TorchServe-style handler does), and encodes the
attributions. Each pool thread gets its own replica of the model, as TorchServe gives each worker its own
model: Captum's layer methods install hooks on the model's modules, which two threads must not share.

`--noop` answers `Attribute` on the event loop with attributions equal to the input tensor (same dtype,
shape and bytes): the gRPC + protobuf cost of the same payload in both directions with no compute at all.

Both run on the event loop `attrserve serve` picks (`--event-loop`, default auto: uvloop where it is installed), so the
ceiling is the transport stack attrserve's front end runs on, and B2 gets what its own server could have.

Both fill `AttributeResponse.timing` with the Captum passes (model forward calls) and rows the request
ran, so the bench reports passes and rows per pass for B2 as it does for attrserve.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import copy
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import torch

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve.v1 import model_config_pb2 as mc
from attrserve.v1 import tensor_pb2
from attrserve_client.tensors import from_tensor_proto, to_tensor_proto
from attrserve_service import eventloop

from captum_calls import PassCounter, as_tensor, run_captum
from workloads import MODELS, build_model, model_names

_PREFIX = "ALGORITHM_"


def decode(request: pb.AttributeRequest) -> dict:
    """The Captum call a request asks for: algorithm, input, baselines, target, parameters, layer."""
    algorithm = pb.Algorithm.Name(request.algorithm)[len(_PREFIX) :].lower()
    if len(request.inputs) != 1:
        raise ValueError("the baseline serves single-input models")
    x = as_tensor(from_tensor_proto(request.inputs[0]))
    baselines = None
    if request.baselines:
        b = request.baselines[0]
        which = b.WhichOneof("value")
        if which == "scalar":
            baselines = int(b.scalar) if not x.is_floating_point() else float(b.scalar)
        elif which == "tensor":
            baselines = as_tensor(from_tensor_proto(b.tensor))
    target = None
    which = request.target.WhichOneof("value")
    if which == "index":
        target = int(request.target.index)
    elif which == "tuple":
        target = tuple(request.target.tuple.index)
    elif which == "per_example":
        target = [tuple(t.index) if len(t.index) > 1 else int(t.index[0]) for t in request.target.per_example.indices]
    params: dict = {}
    field = request.WhichOneof("params")
    if field is not None:
        msg = getattr(request, field)
        if field in ("integrated_gradients", "layer_integrated_gradients"):
            params = {"n_steps": msg.n_steps or 50, "method": msg.method or "gausslegendre"}
        elif field == "occlusion":
            params = {
                "sliding_window_shapes": tuple(msg.sliding_window_shapes[0].values),
                "strides": tuple(msg.strides[0].values) if msg.strides else (1,) * (x.dim() - 1),
                "perturbations_per_eval": msg.perturbations_per_eval or 1,
            }
        elif field == "saliency":
            params = {"abs": msg.abs if msg.HasField("abs") else True}
    return {
        "model": request.model,
        "algorithm": algorithm,
        "x": x,
        "baselines": baselines,
        "target": target,
        "params": params,
        "layer": request.layer or None,
    }


class BaselineServicer(pb_grpc.AttributionServiceServicer):
    def __init__(
        self,
        models: dict[str, torch.nn.Module],
        noop: bool,
        pool: concurrent.futures.Executor | None,
        device: torch.device = torch.device("cpu"),
    ) -> None:
        self.models = models
        self.noop = noop
        self.pool = pool
        self.device = device
        self._local = threading.local()

    def _replica(self, name: str) -> tuple[torch.nn.Module, PassCounter]:
        replicas = getattr(self._local, "replicas", None)
        if replicas is None:
            replicas = self._local.replicas = {}
        if name not in replicas:
            model = copy.deepcopy(self.models[name]).to(self.device)
            replicas[name] = (model, PassCounter(model))
        return replicas[name]

    def _attribute(self, request: pb.AttributeRequest, arrival: float) -> pb.AttributeResponse:
        call = decode(request)
        model, counter = self._replica(call.pop("model"))
        counter.take()
        start = time.perf_counter()
        if self.device.type != "cpu":  # what a user's handler does on a GPU: copy in, attribute, copy out
            call["x"] = call["x"].to(self.device)
            if isinstance(call["baselines"], torch.Tensor):
                call["baselines"] = call["baselines"].to(self.device)
        attributions = run_captum(model, call.pop("algorithm"), call.pop("x"), **call).detach().cpu()
        compute_ms = 1e3 * (time.perf_counter() - start)
        passes, rows = counter.take()
        return pb.AttributeResponse(
            request_id=request.request_id,
            attributions=[to_tensor_proto(attributions.numpy())],
            model_version="1",
            timing=pb.Timing(
                queue_ms=1e3 * (start - arrival),
                compute_ms=compute_ms,
                total_ms=1e3 * (time.perf_counter() - arrival),
                rows=rows,
                passes=passes,
                pass_rows=rows,
                pass_requests=1,
            ),
        )

    async def Attribute(self, request: pb.AttributeRequest, context: grpc.aio.ServicerContext) -> pb.AttributeResponse:
        if request.model not in self.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not served")
        if self.noop:
            x = request.inputs[0]
            return pb.AttributeResponse(
                request_id=request.request_id,
                model_version="1",
                attributions=[tensor_pb2.Tensor(dtype=x.dtype, shape=x.shape, data=x.data)],
            )
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.pool, self._attribute, request, time.perf_counter())
        except (ValueError, KeyError, IndexError, RuntimeError, AssertionError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {e}")

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[pb.ModelInfo(config=mc.ModelConfig(name=name, version="1"), ready=True) for name in self.models]
        )


async def serve(port: int, noop: bool, workers: int | None, repo: Path, names: list[str], device: str = "cpu") -> None:
    models = {name: None if noop else build_model(name, repo) for name in names}
    pool = None if noop else concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="captum")
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)]
    )
    pb_grpc.add_AttributionServiceServicer_to_server(BaselineServicer(models, noop, pool, torch.device(device)), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise OSError(f"could not bind 127.0.0.1:{port}")
    await server.start()
    mode = "no-op" if noop else f"captum thread pool ({pool._max_workers} workers, {torch.get_num_threads()} torch threads, {device})"
    print(f"baseline server ({mode}) listening on 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(2)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--noop", action="store_true", help="answer with the input bytes, no compute (transport ceiling)")
    p.add_argument("--workers", type=int, default=None, help="thread pool size (default: ThreadPoolExecutor's)")
    p.add_argument("--model-repository", type=Path, default=MODELS, help="folder of model folders (default: bench/models)")
    p.add_argument("--models", default="", help="comma-separated model folders to serve (default: all)")
    p.add_argument("--device", default="cpu", help="where Captum runs: cpu or cuda[:i] (each pool thread keeps its own replica there)")
    p.add_argument(
        "--event-loop", default="auto", choices=eventloop.EVENT_LOOPS, help="as attrserve serve's (default auto: uvloop where installed)"
    )
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n] or model_names(args.model_repository)
    eventloop.run(partial(serve, args.port, args.noop, args.workers, args.model_repository, names, args.device), args.event_loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
