"""Reading a folder of safetensors files one tensor at a time, and writing them the same way.

Hugging Face folders hold ``model.safetensors`` or shards ``model-0000i-of-0000n.safetensors``
listed in ``model.safetensors.index.json``. Pickle files (``pytorch_model.bin``, ``*.pt``) are
never opened. The writer emits each file's header first, then each tensor's bytes as it is
produced, so an export never holds a second copy of the model.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import struct
from typing import Callable, Iterator

import numpy as np

from jaxtrain.config import ConfigError
from jaxtrain.config.schema import error_line
from jaxtrain.tempfiles import temp_path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class SafetensorsFolder:
    """The tensors of every safetensors file in a folder, read lazily by name."""

    def __init__(self, files: list[str]):
        from safetensors import SafetensorError, safe_open

        self._stack = contextlib.ExitStack()
        self._file_of: dict[str, str] = {}
        self._handles = {}
        for path in files:
            try:
                handle = self._stack.enter_context(safe_open(path, framework="numpy"))
            except (SafetensorError, OSError) as error:
                self._stack.close()
                raise _unreadable(path, error) from None
            self._handles[path] = handle
            for name in handle.keys():
                if name in self._file_of:
                    raise ConfigError(f"{path}: tensor {name} also appears in {self._file_of[name]}")
                self._file_of[name] = path
        self.names = sorted(self._file_of)

    def file_of(self, name: str) -> str:
        return self._file_of[name]

    def get(self, name: str) -> np.ndarray:
        from safetensors import SafetensorError

        path = self._file_of[name]
        try:
            return self._handles[path].get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise _unreadable(path, error, f"tensor {name}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name``, from its file's header (no tensor bytes are read)."""
        from safetensors import SafetensorError

        path = self._file_of[name]
        try:
            return tuple(self._handles[path].get_slice(name).get_shape())
        except (SafetensorError, OSError) as error:
            raise _unreadable(path, error, f"tensor {name}") from None

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The part ``index`` (one slice per dimension) of tensor ``name``; only its bytes are read."""
        from safetensors import SafetensorError

        path = self._file_of[name]
        try:
            return self._handles[path].get_slice(name)[index]
        except (SafetensorError, OSError) as error:
            raise _unreadable(path, error, f"tensor {name}") from None

    def close(self) -> None:
        self._stack.close()


def _unreadable(path: str, error: Exception, what: str = "") -> ConfigError:
    """A damaged or truncated safetensors file, named with the reason and what to do."""
    reason = error_line(error)
    reason = reason.removeprefix("Error while deserializing header: ")
    subject = f"{path}: {what} cannot be read" if what else f"{path}: not a readable safetensors file"
    return ConfigError(f"{subject} ({reason}); the file is damaged or incomplete: download or save it again")


@contextlib.contextmanager
def open_safetensors_folder(folder: str) -> Iterator[SafetensorsFolder]:
    """Open ``folder``'s safetensors weights; a folder with only pickle weights is refused."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as handle:
                index = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{index_path}: not valid JSON ({error}); fix or download the file again") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index_path}: has no weight_map object; fix or download the file again")
        files = sorted({os.path.join(folder, name) for name in weight_map.values()})
        absent = [path for path in files if not os.path.isfile(path)]
        if absent:
            raise ConfigError(f"{index_path}: lists {os.path.basename(absent[0])}, which is not in {folder}")
    elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
        files = [os.path.join(folder, SINGLE_FILE)]
    else:
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        pickles = sorted(os.path.basename(p) for pattern in _PICKLE_PATTERNS for p in glob.glob(os.path.join(folder, pattern)))
        if pickles:
            raise ConfigError(f"{folder}: holds only PyTorch pickle weights ({', '.join(pickles[:3])}); jaxtrain never "
                              "reads pickle: safetensors required (re-save with save_pretrained(safe_serialization=True))")
        raise ConfigError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; safetensors weights required")
    tensors = SafetensorsFolder(files)
    try:
        yield tensors
    finally:
        tensors.close()


def parse_size(size: str | int) -> int:
    """Bytes in ``"5GB"``, ``"500MiB"`` or an integer."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ConfigError(f"--max-shard-size {size!r}: use a number of bytes or e.g. 5GB, 500MB, 2GiB")
    value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if value < 1:
        raise ConfigError(f"--max-shard-size {size!r}: must be at least one byte (e.g. 5GB)")
    return value


class SafetensorsWriter:
    """Write tensors of one dtype into ``folder`` as ``model.safetensors`` or numbered shards."""

    def __init__(self, folder: str, dtype: np.dtype, max_shard_bytes: int):
        self.folder, self.dtype, self.max_shard_bytes = folder, dtype, max_shard_bytes
        self.code = _DTYPE_NAMES[dtype.name]

    def write(self, entries: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]) -> list[str]:
        """``entries``: (name, shape, function producing the tensor). Returns the files written."""
        shards: list[list] = [[]]
        shard_bytes = 0
        for entry in entries:
            nbytes = int(np.prod(entry[1], dtype=np.int64)) * self.dtype.itemsize
            if shards[-1] and shard_bytes + nbytes > self.max_shard_bytes:
                shards.append([])
                shard_bytes = 0
            shards[-1].append(entry)
            shard_bytes += nbytes
        if len(shards) == 1:
            names = [SINGLE_FILE]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map, total = {}, 0
        for name, shard in zip(names, shards):
            total += self._write_file(os.path.join(self.folder, name), shard)
            weight_map.update({entry[0]: name for entry in shard})
        if len(shards) > 1:
            with open(os.path.join(self.folder, INDEX_FILE), "w", encoding="utf-8") as handle:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
        return names

    def write_single(self, name: str, entries: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]) -> str:
        """Write every entry into the one file ``name`` (e.g. a PEFT adapter's, never sharded)."""
        self._write_file(os.path.join(self.folder, name), entries)
        return name

    def _write_file(self, path: str, entries: list) -> int:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, _ in entries:
            nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
            header[name] = {"dtype": self.code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # tensors start 8-byte aligned
        tmp = temp_path(path)
        with open(tmp, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for name, shape, produce in entries:
                tensor = produce()
                if tensor.dtype != self.dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{name}: produced {tensor.dtype}{list(tensor.shape)}, expected "
                                     f"{self.dtype}{list(shape)}")
                handle.write(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
        return offset
