"""TensorBoard event files written directly: scalars and text, no TensorFlow or tensorboardX.

An event file is a TFRecord stream of ``Event`` protocol buffers (TensorFlow's ``event.proto``
and ``summary.proto``). A record is ``[u64 length][u32 masked CRC32C of the length][payload]
[u32 masked CRC32C of the payload]``, little-endian. The few messages a training run writes are
encoded here by hand, fields in number order as protobuf itself writes them:

- ``Event``: ``wall_time`` (1, double), ``step`` (2, int64), ``file_version`` (3, string; the
  first record, ``"brain.Event:2"``), ``summary`` (5, ``Summary``), ``session_log`` (7,
  ``SessionLog`` with ``status`` (1) ``START`` = 1).
- ``Summary.value`` (1, repeated ``Value``): ``tag`` (1), ``simple_value`` (2, float) for a scalar;
  for text, ``metadata`` (9: ``plugin_data`` (1) with ``plugin_name`` (1) ``"text"``) and
  ``tensor`` (8: ``TensorProto`` with ``dtype`` (1) ``DT_STRING`` = 7, ``tensor_shape`` (2) of one
  dimension of size 1, ``string_val`` (8)), as TensorBoard's text plugin reads it.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time

EVENT_FILE_VERSION = "brain.Event:2"
_DT_STRING = 7
_SESSION_START = 1


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord files use."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    """One TFRecord: the framed, checksummed ``payload``."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values take ten bytes, as protobuf writes them
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _event(wall_time: float, step: int, *, file_version: str | None = None, summary: bytes | None = None,
           session_start: bool = False) -> bytes:
    out = _key(1, 1) + struct.pack("<d", wall_time)
    if step:  # proto3: a field at its default value is left out
        out += _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if summary is not None:
        out += _bytes_field(5, summary)
    if session_start:
        out += _bytes_field(7, _key(1, 0) + _varint(_SESSION_START))
    return out


def scalar_value(tag: str, value: float) -> bytes:
    """A ``Summary.Value`` holding a float32 scalar (beyond float32's range: infinity, as protobuf
    stores it)."""
    value = float(value)
    try:
        packed = struct.pack("<f", value)
    except OverflowError:
        packed = struct.pack("<f", math.copysign(math.inf, value))
    return _bytes_field(1, tag.encode()) + _key(2, 5) + packed


def text_value(tag: str, text: str) -> bytes:
    """A ``Summary.Value`` that TensorBoard's text plugin shows (a one-element string tensor)."""
    plugin_data = _bytes_field(1, b"text")
    metadata = _bytes_field(1, plugin_data)
    shape = _bytes_field(2, _key(1, 0) + _varint(1))  # TensorShapeProto.dim: one dimension of size 1
    tensor = _key(1, 0) + _varint(_DT_STRING) + _bytes_field(2, shape) + _bytes_field(8, text.encode())
    return _bytes_field(1, tag.encode()) + _bytes_field(8, tensor) + _bytes_field(9, metadata)


class EventFileWriter:
    """Appends events to a new ``events.out.tfevents.*`` file under ``logdir``; each ``write``
    reaches the file before it returns, so a crashed run keeps every logged step."""

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}.{time.monotonic_ns()}"
        self.path = os.path.join(self.logdir, name)
        self._file = open(self.path, "wb")
        self._file.write(tfrecord(_event(now, 0, file_version=EVENT_FILE_VERSION)))
        self._file.flush()

    def write(self, step: int, values: list[bytes], wall_time: float | None = None) -> None:
        """One event at ``step`` whose summary holds ``values`` (from ``scalar_value``/``text_value``)."""
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        summary = b"".join(_bytes_field(1, value) for value in values)
        self._file.write(tfrecord(_event(time.time() if wall_time is None else wall_time, step, summary=summary)))
        self._file.flush()

    def write_session_start(self, step: int, wall_time: float | None = None) -> None:
        """A ``SessionLog.START`` event at ``step``: TensorBoard then drops the events of this run
        (its earlier files included) at ``step`` or later that it read before this one, as a
        restarted writer's (``purge_step`` in tensorboardX)."""
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        self._file.write(tfrecord(_event(time.time() if wall_time is None else wall_time, step, session_start=True)))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
