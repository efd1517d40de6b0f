"""The frames the front end and the engine-core process talk in, over two Unix socket pairs, one each way:

    u64 length of the rest | u32 buffer count | u64 pickle length | u64 length of each buffer | pickle | buffers

A frame is a pickled list of messages, each a tuple (protocol 5). Tensors travel as numpy arrays whose bytes are
out-of-band buffers, never serialised. The engine writes a frame of 64 KiB or more from where its parts lie (sendmsg);
it joins a smaller one, and the front joins every frame into one buffer first (asyncio's writelines; 3.12 turns it
into sendmsg too). A reader reads a frame of 64 KiB or more straight into a buffer of its own, which the received tensors
then view; smaller frames share one reused buffer and are copied out of it (FrameReader). Each socket asks for a 4 MiB
send buffer, so that a large frame is written in one call where the kernel grants it.

This module does not import torch (launch.py writes the engine process's first frame before the front has it).
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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

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


def _tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    import torch  # a process that is sent tensors has imported torch (the front, once it serves; the engine)

    t = torch.from_numpy(array)
    return t.view(getattr(torch, dtype)) if dtype else t


class _Pickler(pickle.Pickler):
    """Tensors as numpy arrays (protocol 5: their bytes out of band). Torch is looked up, not imported: a process
    that has not imported it has no tensors to send (the front when it starts the engine process, launch.py)."""

    def __init__(self, file: io.BytesIO, buffer_callback: Callable[[pickle.PickleBuffer], None]) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self._torch = sys.modules.get("torch")

    def reducer_override(self, obj: Any) -> Any:
        torch = self._torch
        if torch is None or not isinstance(obj, torch.Tensor):
            return NotImplemented
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype is torch.bfloat16:  # numpy has no bfloat16: its bits travel as int16
            return _tensor, (t.contiguous().view(torch.int16).numpy(), "bfloat16")
        return _tensor, (t.contiguous().numpy(), "")


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


def decode(frame: bytearray) -> Any:
    """The message of one frame (without its length prefix); its arrays are views on `frame`."""
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
    return pickle.loads(data, buffers=buffers)


class FrameReader(asyncio.BufferedProtocol):
    """Reads frames off a socket on the event loop; `on_message` gets each message, `on_end` the socket's end.

    The loop reads into our buffers (recv_into), not into a fresh bytes object per read. Small frames land in one
    reused buffer, several per read, and each is copied out of it (its tensors must not view a buffer that is read
    into again). A frame of _OWN_BUFFER bytes or more (a 3x224x224 image is 588 KiB) gets a buffer of its own, read
    into directly: its tensors view the bytes that came through the kernel, with no copy in between."""

    def __init__(self, on_message: Callable[[Any], None], on_end: Callable[[], None]) -> None:
        self.on_message = on_message
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
        for message in decode(frame):
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
