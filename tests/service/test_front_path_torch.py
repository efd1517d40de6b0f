"""The front end's part of a request uses no torch: it decodes the request into numpy arrays, frames them out, reads
the engine process's answer as numpy arrays and encodes the response, without a torch operator or a tensor.

Every torch operator called from Python, and every tensor freed, releases the GIL (docs/ARCHITECTURE.md, "Threads, the
GIL and the hot path"); in the front end the gRPC poller thread takes it, and the event loop waits. Before, the
front's part of a bench W1 request ran three `detach`es and freed four or five tensors (bench/RESULTS.md, issue 12
step 29). Checked here for the bench's six workloads: the answers are the engine's, to the last bit, and nothing of
torch happens on the front's thread. And the modules of that path import without torch at all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine_loop_torch import WORKLOADS, engine  # engine: the smoke models' Engine, a fixture
from torch_calls import torch_on_this_thread

from attrserve_engine import Engine
from attrserve_service import frames
from attrserve_service.convert import array_from_proto, request_to_job, result_to_response
from attrserve_service.engine_main import _unpicklable_answer
from attrserve_service.frames import frame_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _body(parts: list) -> bytearray:
    """A frame's body as a reader hands it to `frames.decode` (the length prefix taken off)."""
    return bytearray(b"".join(parts)[8:])


@pytest.mark.parametrize("key", sorted(WORKLOADS))
def test_the_front_end_takes_a_request_in_and_answers_it_without_torch(engine: Engine, key: str) -> None:
    requests = WORKLOADS[key].requests(3)
    # What the engine process answers each request with, framed as it sends it.
    answers = []
    for i, request in enumerate(requests):
        (message,) = frames.decode(_body(frame_of([("submit", i, request_to_job(request))], _unpicklable_answer)), tensors=True)
        answers.append(engine.attribute(message[2], timeout=120))
    del message  # its tensors are the test's, freed here: the engine keeps nothing of a finished request
    answer_frames = [_body(frames.encode_parts([("result", i, a)])) for i, a in enumerate(answers)]
    responses, sent = [], []
    with torch_on_this_thread() as (died, operators):
        for i, request in enumerate(requests):
            job = request_to_job(request)
            sent.append(b"".join(frame_of([("submit", i, job)], _unpicklable_answer)))
            del job
            (message,) = frames.decode(answer_frames[i], tensors=False)
            responses.append(result_to_response(message[2]))
            del message
    assert died == [], f"{key}: tensors freed on the front's thread: {died}"
    assert not operators, f"{key}: torch operators on the front's thread: {dict(operators)}"
    for frame, request in zip(sent, requests, strict=True):  # the engine gets the request's values, as tensors
        (message,) = frames.decode(bytearray(frame[8:]), tensors=True)
        for got, wire in zip(message[2].inputs, request.inputs, strict=True):
            assert isinstance(got, torch.Tensor) and torch.equal(got, torch.from_numpy(array_from_proto(wire, "x").copy()))
    for response, answer in zip(responses, answers, strict=True):  # the caller gets the engine's answer, bit for bit
        for wire, want in zip(response.attributions, answer.attributions, strict=True):
            got = array_from_proto(wire, "attributions")
            assert got.dtype.name == str(want.dtype).removeprefix("torch.") and got.shape == tuple(want.shape)
            assert got.tobytes() == want.detach().contiguous().numpy().tobytes()


def test_the_request_path_imports_without_torch(tmp_path: Path) -> None:
    """convert.py and frames.py in a process where `import torch` fails: a request decoded and framed, an engine's
    answer (bfloat16 among its arrays) read and encoded."""
    w = WORKLOADS["W1"]
    request = w.requests(1)[0]
    answer = ("result", 5, {"attributions": torch.randn(2, 3), "bf16": torch.randn(4, dtype=torch.bfloat16), "n": 7})
    (tmp_path / "request").write_bytes(request.SerializeToString())
    (tmp_path / "answer").write_bytes(frames.encode([answer])[8:])
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch fails
from pathlib import Path
import numpy as np
from attrserve.v1 import attribution_service_pb2 as pb
from attrserve_service import convert, frames
job = convert.request_to_job(pb.AttributeRequest.FromString(Path({str(tmp_path / "request")!r}).read_bytes()))
frame = frames.encode([("submit", 1, job)])
((kind, key, answer),) = frames.decode(bytearray(Path({str(tmp_path / "answer")!r}).read_bytes()), tensors=False)
message = convert.array_to_proto(answer["bf16"])
print(type(job.inputs[0]).__name__, len(frame) > 0, kind, key, answer["attributions"].shape, answer["bf16"].dtype,
      convert.array_to_proto(answer["attributions"]).shape, message.dtype == convert.DType.DATA_TYPE_BFLOAT16, answer["n"])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ndarray", "True", "result", "5", "(2,", "3)", "bfloat16", "[2,", "3]", "True", "7"]
    want = answer[2]["bf16"]  # the bfloat16 bits the child read, checked here
    (again,) = frames.decode(bytearray(frames.encode([answer])[8:]), tensors=False)
    assert again[2]["bf16"].view(np.uint16).tobytes() == want.view(torch.int16).numpy().tobytes()
