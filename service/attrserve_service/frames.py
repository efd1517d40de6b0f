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
import functools
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


@functools.cache
def dtype_name(dtype: np.dtype) -> str:
    """`dtype.name`, remembered: numpy works it out in Python on every read (~2 µs), and each array of every frame and
    answer asks."""
    return dtype.name


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


# What an object from the engine process may be made of: classes and functions of these modules only (and of the
# standard library and protobuf), which the front end imports, or may import without torch. The engine's modules not
# named here import torch, as do the engine process's own (local_core, engine_main) and the demo models; a plugin's or a
# model's module exists in the engine process only; a third-party package (transformers, torchvision, ...) may import
# torch or may not be installed where the front runs.
_FRONT_MODULES = frozenset(
    {"attrserve_engine", "attrserve_engine.errors", "attrserve_engine.events", "attrserve_engine.job", "attrserve_engine.limits"}
)
_ENGINE_SIDE = ("attrserve_service.local_core", "attrserve_service.engine_main", "attrserve_service.demo_models")
_LIBRARIES = frozenset({"numpy", "ml_dtypes", "attrserve"})  # attrserve: the generated contract (GetModel's ModelInfo)
_IMPORTS_TORCH = "its module imports torch, which the front end does not"


def unreadable_by_the_front(module: str) -> str:
    """Why the front end must not read a class or function of `module` (it would import torch, or a module only the
    engine process has, or one the front end does not use); "" when it may. One rule for both ends: the engine refuses
    to send such an object (_Pickler), the front end to read one (_ArrayUnpickler)."""
    top = module.partition(".")[0]
    if top == "torch":
        return "the front end does not import torch"
    if top == "attrserve_engine":
        return "" if module in _FRONT_MODULES else _IMPORTS_TORCH
    if top == "attrserve_service":
        engine_side = any(module == m or module.startswith(m + ".") for m in _ENGINE_SIDE)
        return _IMPORTS_TORCH if engine_side else ""
    if top in sys.stdlib_module_names or top in _LIBRARIES or module == "google.protobuf" or module.startswith("google.protobuf."):
        return ""
    if is_user_module(module):
        return "a plugin's or a model's module, which only the engine process has"
    return "the front end reads only objects of the standard library, numpy, ml_dtypes, protobuf and attrserve's own front-end modules"


# The classes and functions found readable so far (a handful: results, their dataclasses, errors, reduce functions).
_READABLE: set[Any] = set()
# Objects that a pickle names (a global) rather than builds: a class, a function (types.FunctionType, len's type).
_NAMED = (type, type(unreadable_by_the_front), type(len))


def _check_readable(kind: Any, obj: Any) -> None:
    """Add `kind` (a class or function) to _READABLE, or raise PicklingError naming `obj` and why the front end must
    not read it."""
    module = getattr(kind, "__module__", None) or pickle.whichmodule(kind, kind.__qualname__)  # type: ignore[attr-defined]
    why = unreadable_by_the_front(module)
    if why:
        raise pickle.PicklingError(f"{module}.{kind.__qualname__} {obj!r}: {why}")
    _READABLE.add(kind)


class _Pickler(pickle.Pickler):
    """Tensors and numpy arrays as (their bytes out of band, dtype name, shape). Torch is looked up, not imported: a
    process that has not imported it has no tensors to send (the front end).

    `to_front` (the engine's answers): any other object the front end must not read is refused, an object, class or
    function of torch's (a dtype, a torch.Size, torch.__version__, nn.Linear), of an engine module that imports torch,
    of a plugin's or a model's module, of a third-party package (unreadable_by_the_front). Refused here, in the engine
    process, the message alone fails (frame_of) and the error is logged where the object was made."""

    def __init__(self, file: io.BytesIO, buffer_callback: Callable[[pickle.PickleBuffer], None], to_front: bool) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self._torch = sys.modules.get("torch")
        self._to_front = to_front

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                return NotImplemented
            a = obj if obj.flags.c_contiguous else obj.copy(order="C")  # (ascontiguousarray makes a 0-d array 1-d)
            # Its bytes: ml_dtypes' bfloat16 has no buffer format of its own.
            return _tensor, (pickle.PickleBuffer(a.reshape(-1).view(np.uint8).data), dtype_name(a.dtype), a.shape)
        torch = self._torch
        if torch is None or not isinstance(obj, torch.Tensor):
            if not self._to_front:
                return NotImplemented
            if isinstance(obj, _NAMED):  # pickled as its module and name (its metaclass is not in the pickle)
                if obj not in _READABLE:
                    _check_readable(obj, obj)
            elif type(obj) not in _READABLE:  # a type seen before: one set lookup, not a module name check per object
                _check_readable(type(obj), obj)
            return NotImplemented
        t = obj.detach() if obj.requires_grad else obj
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.dtype is torch.bfloat16:
            return _tensor, (pickle.PickleBuffer(t.view(torch.int16).numpy()), "bfloat16", tuple(t.shape))
        a = t.numpy()
        return _tensor, (pickle.PickleBuffer(a), dtype_name(a.dtype), a.shape)


# The modules the front end's reader has found readable so far.
_READABLE_MODULES: set[str] = set()


class _ArrayUnpickler(pickle.Unpickler):
    """Reads a frame's tensors and arrays as numpy arrays (the front end). A class or function of a module that
    unreadable_by_the_front refuses fails the read (UnpicklingError) before that module is imported."""

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_tensor":
            return _array
        if module not in _READABLE_MODULES:
            why = unreadable_by_the_front(module)
            if why:
                raise pickle.UnpicklingError(f"{module}.{name}: {why}")
            _READABLE_MODULES.add(module)
        return super().find_class(module, name)


class _Unreadable:
    """Stands, in a salvaged frame, for an object made by a class or function the front end did not read (`name`
    says which, and why). It takes whatever a pickle does to build it."""

    name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Unreadable:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _SalvagingUnpickler(_ArrayUnpickler):
    """Reads what it can of a frame that _ArrayUnpickler could not read: a class or function it refuses, or cannot
    find, is read as a subclass of _Unreadable that names it."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except Exception as error:
            what = str(error) if isinstance(error, pickle.UnpicklingError) else f"{module}.{name}: {error}"
            return type(name, (_Unreadable,), {"name": what})


_ATOMS = (str, bytes, bytearray, memoryview, int, float, complex, type, type(None))


def _unreadable_in(obj: Any, seen: set[int]) -> str:
    """The `name` of the first _Unreadable in `obj` (its items, attributes, an exception's args), or ""."""
    if isinstance(obj, _Unreadable) or (isinstance(obj, type) and issubclass(obj, _Unreadable)):
        return obj.name
    if isinstance(obj, _ATOMS) or id(obj) in seen:
        return ""
    seen.add(id(obj))
    items: Any
    if isinstance(obj, dict):
        items = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = obj
    elif isinstance(obj, np.ndarray):
        items = obj.ravel() if obj.dtype.hasobject else ()
    else:
        items = [*getattr(obj, "__dict__", {}).values(), *(getattr(obj, s, None) for s in getattr(type(obj), "__slots__", ()))]
        if isinstance(obj, BaseException):
            items += obj.args
    for item in items:
        found = _unreadable_in(item, seen)
        if found:
            return found
    return ""


def salvage(frame: bytearray) -> list[tuple[Any, str]]:
    """The messages of a frame that the front end could not read (decode raised), each with what it holds that the
    front end does not read ("" for a message read whole). Raises where even this cannot read the frame."""
    data, buffers = _parts(frame)
    messages = _SalvagingUnpickler(io.BytesIO(data), buffers=buffers).load()
    return [(message, _unreadable_in(message, set())) for message in messages]


def encode_parts(message: Any, to_front: bool = False) -> list:
    """One frame holding `message` (a list of messages, on the wire), as the buffers to write one after another: the
    length, the head, the pickle, then each tensor's bytes where they lie. `to_front`: the engine's, to the front end
    (_Pickler refuses what the front end must not read)."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    _Pickler(stream, buffers.append, to_front).dump(message)
    raw = [b.raw() for b in buffers]
    data = stream.getbuffer()
    head = _HEAD.pack(len(raw), data.nbytes) + struct.pack(f"<{len(raw)}Q", *(r.nbytes for r in raw))
    size = len(head) + data.nbytes + sum(r.nbytes for r in raw)
    return [_LENGTH.pack(size), head, data, *raw]


def encode(message: Any) -> bytes:
    """One frame holding `message`, in one piece."""
    return b"".join(encode_parts(message))


def frame_of(messages: list[tuple], unpicklable: Callable[[tuple, Exception], tuple | None], to_front: bool = False) -> list:
    """One frame of `messages`, as encode_parts' buffers ([] for none). One that cannot be pickled does not take the
    others with it: it goes as what `unpicklable(message, error)` returns instead, or is left out where that is None."""
    try:
        return encode_parts(messages, to_front) if messages else []
    except Exception:
        pass
    kept = []
    for message in messages:
        try:
            encode_parts([message], to_front)
        except Exception as e:
            replaced = unpicklable(message, e)
            if replaced is None:
                continue
            message = replaced
        kept.append(message)
    return encode_parts(kept, to_front) if kept else []


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
    data, buffers = _parts(frame)
    if tensors:
        return pickle.loads(data, buffers=buffers)
    return _ArrayUnpickler(io.BytesIO(data), buffers=buffers).load()


def _parts(frame: bytearray) -> tuple[memoryview, list[memoryview]]:
    """A frame's pickle and its out-of-band buffers, as views on it."""
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
    return data, buffers


def translate(obj: Any, tensors: bool) -> Any:
    """`obj` as a frame would carry it, without the bytes: its tensors and arrays as torch tensors where `tensors`, as
    numpy arrays otherwise, viewing the same memory where they can. For an engine in the front end's own process
    (LocalCore's callers send numpy arrays and take numpy arrays back)."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    _Pickler(stream, buffers.append, to_front=not tensors).dump(obj)
    stream.seek(0)
    if tensors:
        return pickle.load(stream, buffers=buffers)
    return _ArrayUnpickler(stream, buffers=buffers).load()


class FrameReader(asyncio.BufferedProtocol):
    """Reads frames off a socket on the event loop; `on_message` gets each message, `on_end` the socket's end.

    The loop reads into our buffers (recv_into), not into a fresh bytes object per read. Small frames land in one
    reused buffer, several per read, and each is copied out of it (its tensors must not view a buffer that is read
    into again). A frame of _OWN_BUFFER bytes or more (a 3x224x224 image is 588 KiB) gets a buffer of its own, read
    into directly: its tensors view the bytes that came through the kernel, with no copy in between.

    A frame that cannot be read whole (the front end's reader refuses a class or function, or cannot find one) is
    salvaged where `on_unreadable` is given: it gets each message that holds such an object, with what and why, and
    `on_message` the others. Frames are delimited by their lengths, so the frames after it read as ever. A frame not
    even salvage can read ends the reader, as before (the transport closes: `on_end`)."""

    def __init__(
        self,
        on_message: Callable[[Any], None],
        on_end: Callable[[], None],
        tensors: bool,
        on_unreadable: Callable[[Any, str], None] | None = None,
    ) -> None:
        self.on_message = on_message
        self.tensors = tensors  # decode's
        self.on_end = on_end
        self.on_unreadable = on_unreadable
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
        try:
            messages = decode(frame, self.tensors)
        except Exception as error:
            if self.on_unreadable is None:
                raise
            try:
                salvaged = salvage(frame)
            except Exception:
                raise error from None
            for message, why in salvaged:
                if why:
                    self.on_unreadable(message, why)
                else:
                    self.on_message(message)
            return
        for message in messages:
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
