"""The frames the front end and the engine-core process talk in, over two Unix socket pairs, one each way:

    u64 length of the rest | u32 buffer count | u64 pickle length | u64 length of each buffer | pickle | buffers

A frame is a pickled list of messages, each a tuple (protocol 5). Tensors and numpy arrays travel as their bytes in
out-of-band buffers, never serialised, with their dtype's name and shape. They arrive as the reader asks: as torch
tensors in the engine process, as numpy arrays in the front end, whose request path does not use torch (a torch
operator, or a tensor freed, lets the gRPC poller thread take the GIL: docs/ARCHITECTURE.md, "Threads, the GIL and the
hot path"). The engine writes a frame of 64 KiB or more from where its parts lie (sendmsg);
it joins a smaller one, and the front joins every frame into one buffer first (asyncio's writelines; 3.12 turns it
into sendmsg too). A reader reads a frame of 64 KiB or more straight into a buffer of its own, which the received tensors
then view; smaller frames share one reused buffer and are copied out of it (FrameReader). Each socket asks for a 4 MiB
send buffer, so that a large frame is written in one call where the kernel grants it.

This module does not import torch: the front end does not use it, and launch.py writes the engine process's first frame
before anything imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pickle
import socket
import struct
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from attrserve_engine.user_code import is_user_module

if TYPE_CHECKING:
    import torch

_LENGTH = struct.Struct("<Q")
_HEAD = struct.Struct("<IQ")  # buffer count, pickle length
# Reading (FrameReader): a frame this large gets a buffer of its own; smaller ones share one, read into at most
# _OWN_BUFFER bytes at a time (so that a large frame's first read, which cannot know its size, copies little).
_OWN_BUFFER = 64 << 10
_SCRATCH = 2 * _OWN_BUFFER + _LENGTH.size
# Each socket asks for this much send buffer (the kernel grants at most net.core.wmem_max, often 208 KiB): a frame
# that fits is written in one system call, without the sender waiting for the reader or asyncio copying the rest.
_SOCKET_BUFFER = 4 << 20
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16


# A request's arrays view the message's immutable bytes where the engine runs in the front end's process (translate);
# the engine never writes into its inputs.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a dtype name as torch and numpy spell it; bfloat16 is ml_dtypes' (numpy has none)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _array(buffer: Any, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """An array as the front end receives it: a view on the frame's bytes."""
    return np.frombuffer(buffer, dtype=numpy_dtype(dtype)).reshape(shape)


def _tensor(buffer: Any, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """An array as the engine process receives it: a tensor viewing the frame's bytes (torch.from_numpy keeps the
    GIL). The name the pickles refer to: readers that want numpy arrays take `_array` in its place (_ArrayUnpickler)."""
    import torch  # a process that is sent tensors has imported torch (the engine)

    if dtype == "bfloat16":  # torch.from_numpy takes no ml_dtypes array: the bits, viewed
        return torch.from_numpy(np.frombuffer(buffer, dtype=np.int16).reshape(shape)).view(torch.bfloat16)
    return torch.from_numpy(np.frombuffer(buffer, dtype=dtype).reshape(shape))


# The modules of the engine and the service that the front end imports: the others import torch.
_FRONT_MODULES = frozenset({"attrserve_engine.errors", "attrserve_engine.events", "attrserve_engine.job", "attrserve_engine.limits"})
_ENGINE_SIDE = frozenset({"attrserve_service.local_core", "attrserve_service.engine_main"})


def unreadable_by_the_front(module: str) -> str:
    """Why the front end could not read an object of a class defined in `module` without importing torch or a
    module only the engine process has; "" when it can."""
    top = module.partition(".")[0]
    if top == "torch":
        return "the front end does not import torch"
    if (top == "attrserve_engine" and module not in _FRONT_MODULES) or module in _ENGINE_SIDE:
        return "its module imports torch, which the front end does not"
    if is_user_module(module):
        return "a plugin's or a model's module, which only the engine process has"
    return ""


# The types _Pickler has found the front end can read (a handful: results, their dataclasses, classes and functions).
_READABLE: set[type] = set()


class _Pickler(pickle.Pickler):
    """Tensors and numpy arrays as (their bytes out of band, dtype name, shape). Torch is looked up, not imported: a
    process that has not imported it has no tensors to send (the front end).

    Any other object the front end could not read is refused: one of torch's (a dtype, a torch.Size,
    torch.__version__), of a class from an engine module that imports torch, or from a plugin's or a model's module
    (unreadable_by_the_front). Its reader would fail the whole frame, and take that for the engine's end. Refused here,
    in the engine process, the message alone fails (frame_of) and the error is logged where the object was made."""

    def __init__(self, file: io.BytesIO, buffer_callback: Callable[[pickle.PickleBuffer], None]) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self._torch = sys.modules.get("torch")

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                return NotImplemented
            a = obj if obj.flags.c_contiguous else obj.copy(order="C")  # (ascontiguousarray makes a 0-d array 1-d)
            # Its bytes: ml_dtypes' bfloat16 has no buffer format of its own.
            return _tensor, (pickle.PickleBuffer(a.reshape(-1).view(np.uint8).data), a.dtype.name, a.shape)
        torch = self._torch
        if torch is None:
            return NotImplemented
        if not isinstance(obj, torch.Tensor):
            kind = type(obj)
            if kind not in _READABLE:  # a type seen before: one set lookup, not a module name check per object
                why = unreadable_by_the_front(kind.__module__)
                if why:
                    raise pickle.PicklingError(f"{kind.__module__}.{kind.__qualname__} {obj!r}: {why}")
                _READABLE.add(kind)
            return NotImplemented
        t = obj.detach() if obj.requires_grad else obj
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.dtype is torch.bfloat16:
            return _tensor, (pickle.PickleBuffer(t.view(torch.int16).numpy()), "bfloat16", tuple(t.shape))
        a = t.numpy()
        return _tensor, (pickle.PickleBuffer(a), a.dtype.name, a.shape)


class _ArrayUnpickler(pickle.Unpickler):
    """Reads a frame's tensors and arrays as numpy arrays (the front end)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_tensor":
            return _array
        return super().find_class(module, name)


def encode_parts(message: Any) -> list:
    """One frame holding `message` (a list of messages, on the wire), as the buffers to write one after another: the
    length, the head, the pickle, then each tensor's bytes where they lie."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    _Pickler(stream, buffers.append).dump(message)
    raw = [b.raw() for b in buffers]
    data = stream.getbuffer()
    head = _HEAD.pack(len(raw), data.nbytes) + struct.pack(f"<{len(raw)}Q", *(r.nbytes for r in raw))
    size = len(head) + data.nbytes + sum(r.nbytes for r in raw)
    return [_LENGTH.pack(size), head, data, *raw]


def encode(message: Any) -> bytes:
    """One frame holding `message`, in one piece."""
    return b"".join(encode_parts(message))


def frame_of(messages: list[tuple], unpicklable: Callable[[tuple, Exception], tuple | None]) -> list:
    """One frame of `messages`, as encode_parts' buffers ([] for none). One that cannot be pickled does not take the
    others with it: it goes as what `unpicklable(message, error)` returns instead, or is left out where that is None."""
    try:
        return encode_parts(messages) if messages else []
    except Exception:
        pass
    kept = []
    for message in messages:
        try:
            encode_parts([message])
        except Exception as e:
            replaced = unpicklable(message, e)
            if replaced is None:
                continue
            message = replaced
        kept.append(message)
    return encode_parts(kept) if kept else []


def send_parts(sock: socket.socket, parts: list) -> None:
    """Write a frame (encode_parts) to a blocking socket: a large one from where its parts lie (sendmsg, no joined
    copy), a small one joined (one buffer for the kernel instead of many small ones)."""
    (size,) = _LENGTH.unpack(parts[0])
    if size < _OWN_BUFFER or len(parts) > _IOV_MAX:
        sock.sendall(b"".join(parts))
        return
    sent = sock.sendmsg(parts)
    if sent < _LENGTH.size + size:  # the socket took part of it: the rest, in order
        sock.sendall(memoryview(b"".join(parts))[sent:])


def decode(frame: bytearray, tensors: bool) -> Any:
    """The message of one frame (without its length prefix); its tensors and arrays are views on `frame`: torch
    tensors where `tensors`, numpy arrays otherwise."""
    view = memoryview(frame)
    count, length = _HEAD.unpack_from(view, 0)
    sizes = struct.unpack_from(f"<{count}Q", view, _HEAD.size)
    at = _HEAD.size + 8 * count
    data = view[at : at + length]
    at += length
    buffers = []
    for size in sizes:
        buffers.append(view[at : at + size])
        at += size
    if tensors:
        return pickle.loads(data, buffers=buffers)
    return _ArrayUnpickler(io.BytesIO(data), buffers=buffers).load()


def translate(obj: Any, tensors: bool) -> Any:
    """`obj` as a frame would carry it, without the bytes: its tensors and arrays as torch tensors where `tensors`, as
    numpy arrays otherwise, viewing the same memory where they can. For an engine in the front end's own process
    (LocalCore's callers send numpy arrays and take numpy arrays back)."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    _Pickler(stream, buffers.append).dump(obj)
    stream.seek(0)
    if tensors:
        return pickle.load(stream, buffers=buffers)
    return _ArrayUnpickler(stream, buffers=buffers).load()


class FrameReader(asyncio.BufferedProtocol):
    """Reads frames off a socket on the event loop; `on_message` gets each message, `on_end` the socket's end.

    The loop reads into our buffers (recv_into), not into a fresh bytes object per read. Small frames land in one
    reused buffer, several per read, and each is copied out of it (its tensors must not view a buffer that is read
    into again). A frame of _OWN_BUFFER bytes or more (a 3x224x224 image is 588 KiB) gets a buffer of its own, read
    into directly: its tensors view the bytes that came through the kernel, with no copy in between."""

    def __init__(self, on_message: Callable[[Any], None], on_end: Callable[[], None], tensors: bool) -> None:
        self.on_message = on_message
        self.tensors = tensors  # decode's
        self.on_end = on_end
        self._scratch = bytearray(_SCRATCH)  # never resized: get_buffer hands out views of it
        self._have = 0  # bytes read into _scratch, not yet taken
        self._frame: bytearray | None = None  # the large frame being read into its own buffer
        self._got = 0  # ... and how much of it has arrived

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._frame is not None:
            return memoryview(self._frame)[self._got :]
        return memoryview(self._scratch)[self._have : self._have + _OWN_BUFFER]

    def buffer_updated(self, nbytes: int) -> None:
        if self._frame is not None:
            self._got += nbytes
            if self._got == len(self._frame):
                frame, self._frame = self._frame, None
                self._deliver(frame)
            return
        self._have += nbytes
        scratch, at = self._scratch, 0
        while self._have - at >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(scratch, at)
            start = at + _LENGTH.size
            if size >= _OWN_BUFFER:
                frame = bytearray(size)
                part = min(size, self._have - start)
                frame[:part] = memoryview(scratch)[start : start + part]
                at = start + part
                if part < size:  # the rest is read straight into it
                    self._frame, self._got = frame, part
                    break
                self._deliver(frame)
                continue
            if start + size > self._have:
                break
            at = start + size
            self._deliver(scratch[start:at])
        if at:  # an unfinished small frame's bytes move to the front (fewer than _OWN_BUFFER + 8: room stays)
            rest = self._have - at
            scratch[:rest] = scratch[at : self._have]  # through a copy: bytearray would memcpy a view of itself
            self._have = rest

    def _deliver(self, frame: bytearray) -> None:
        for message in decode(frame, self.tensors):
            self.on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_end()


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected pair whose ends ask for _SOCKET_BUFFER bytes of send buffer (the kernel may grant less)."""
    pair = socket.socketpair()
    for end in pair:
        with contextlib.suppress(OSError):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
    return pair
