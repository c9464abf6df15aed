"""MDS column encodings, shard compression and shard hashes, byte-compatible with MosaicML Streaming.

A column encoding turns one value into bytes and back. Scalars (``int8`` .. ``float64``, ``int``)
have a fixed size; ``str``, ``bytes``, ``json``, the ``str_*`` number strings, images and
``ndarray`` without a fixed dtype and shape are variable-size. ``ndarray[:dtype[:shape]]``
serialises as ``[dtype code: 1 byte, unless fixed] [ndim << 2 | shape dtype code: 1 byte,
shape: ndim uints, unless fixed] [values]``, exactly as Streaming does. ``pkl`` (pickle) can
run arbitrary code when read, so it is refused in both directions.
"""

from __future__ import annotations

import bz2
import decimal
import gzip
import hashlib
import io
import json
from typing import Any

import numpy as np

from jaxtrain.config.schema import ConfigError

SCALAR_DTYPES = {name: np.dtype(name) for name in (
    "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32", "float64")}
# Streaming's one-byte codes for array value dtypes and (index < 4) array shape dtypes.
NDARRAY_DTYPE_CODES = {"uint8": 8, "int8": 9, "uint16": 16, "int16": 17, "float16": 18, "uint32": 32,
                       "int32": 33, "float32": 34, "uint64": 64, "int64": 65, "float64": 66}
NDARRAY_CODE_DTYPES = {code: name for name, code in NDARRAY_DTYPE_CODES.items()}
SHAPE_DTYPES = ("uint8", "uint16", "uint32", "uint64")
IMAGE_ENCODINGS = ("jpeg", "png", "pil", "list[jpeg]", "list[png]", "list[pil]", "jpeg_array", "jpegarray")
VARIABLE_ENCODINGS = ("str", "bytes", "json", "str_int", "str_float", "str_decimal") + IMAGE_ENCODINGS
UNSAFE_ENCODINGS = ("pkl",)


def _pickle_error(where: str) -> ConfigError:
    return ConfigError(f"{where} uses the pkl encoding (pickle), which can run arbitrary code when read and is "
                       f"refused: re-write that column with json, bytes or ndarray")


def check_encoding(encoding: str, where: str = "column") -> None:
    """Raise a ``ConfigError`` naming ``where`` unless ``encoding`` is a supported, safe MDS encoding."""
    if encoding in UNSAFE_ENCODINGS:
        raise _pickle_error(f"{where} ({encoding})")
    if encoding in SCALAR_DTYPES or encoding == "int" or encoding in VARIABLE_ENCODINGS:
        return
    if encoding == "ndarray" or encoding.startswith("ndarray:"):
        parse_ndarray(encoding, where)
        return
    raise ConfigError(f"{where} has the unknown MDS encoding {encoding!r}: use one of int8..int64, uint8..uint64, "
                      f"float16/32/64, str, bytes, json, ndarray[:dtype[:shape]], jpeg, png")


def parse_ndarray(encoding: str, where: str = "column") -> tuple[str | None, tuple[int, ...] | None]:
    """(dtype or None, shape or None) of an ``ndarray[:dtype[:shape]]`` encoding."""
    args = encoding.split(":")[1:]
    dtype = args[0] if args else None
    shape = None
    if dtype is not None and dtype not in NDARRAY_DTYPE_CODES:
        raise ConfigError(f"{where}: {encoding!r} names the unsupported array dtype {dtype!r}: use one of "
                          f"{', '.join(NDARRAY_DTYPE_CODES)}")
    if len(args) == 2:
        try:
            shape = tuple(int(dim) for dim in args[1].split(","))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise ConfigError(f"{where}: {encoding!r} has a bad shape: write it as positive ints joined by commas")
    elif len(args) > 2:
        raise ConfigError(f"{where}: {encoding!r} is not ndarray[:dtype[:shape]]")
    return dtype, shape


def encoded_size(encoding: str) -> int | None:
    """Fixed encoded size in bytes, or None for a variable-size encoding."""
    if encoding in SCALAR_DTYPES:
        return SCALAR_DTYPES[encoding].itemsize
    if encoding == "int":
        return 8
    if encoding.startswith("ndarray"):
        dtype, shape = parse_ndarray(encoding)
        if dtype is not None and shape is not None:
            return int(np.prod(shape)) * np.dtype(dtype).itemsize
    return None


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("image columns (jpeg, png, pil) need Pillow: pip install Pillow") from None
    return Image


def _image_to_bytes(image, image_format: str) -> bytes:
    Image = _pillow()
    if not isinstance(image, Image.Image):
        raise TypeError(f"a {image_format.lower()} column takes PIL images, got {type(image).__name__}")
    if image_format == "JPEG" and getattr(image, "format", None) == "JPEG" and getattr(image, "filename", ""):
        try:  # an image opened from a JPEG file keeps its exact bytes, as Streaming does
            with open(image.filename, "rb") as handle:
                return handle.read()
        except OSError:
            pass
    out = io.BytesIO()
    image.save(out, format=image_format)
    return out.getvalue()


def _pil_raw_encode(image) -> bytes:
    if not isinstance(image, _pillow().Image):
        raise TypeError(f"a pil column takes PIL images, got {type(image).__name__}")
    mode = image.mode.encode("utf-8")
    return np.array([image.width, image.height, len(mode)], np.uint32).tobytes() + mode + image.tobytes()


def _pil_raw_decode(data: bytes):
    width, height, mode_size = (int(v) for v in np.frombuffer(data[:12], np.uint32))
    mode = data[12:12 + mode_size].decode("utf-8")
    return _pillow().frombytes(mode, (width, height), data[12 + mode_size:])


def _list_encode(items: list, encode_one) -> bytes:
    parts = [encode_one(item) for item in items]
    sizes = np.array([len(part) for part in parts], np.uint32).tobytes()
    return np.uint32(0).tobytes() + np.uint32(len(parts)).tobytes() + sizes + b"".join(parts)


def _list_decode(data: bytes, header: int, decode_one) -> list:
    count = int(np.frombuffer(data[header - 4:header], np.uint32)[0])
    sizes = np.frombuffer(data[header:header + 4 * count], np.uint32)
    position, items = header + 4 * count, []
    for size in sizes.tolist():
        items.append(decode_one(data[position:position + size]))
        position += size
    return items


def _ndarray_encode(encoding: str, value) -> bytes:
    dtype, shape = parse_ndarray(encoding)
    array = np.asarray(value)
    code = NDARRAY_DTYPE_CODES.get(array.dtype.name)
    if code is None:
        raise ValueError(f"arrays of dtype {array.dtype.name} cannot be stored in MDS: cast to one of "
                         f"{', '.join(NDARRAY_DTYPE_CODES)}")
    if array.ndim == 0 or array.size == 0:
        raise ValueError("MDS ndarray columns need a non-empty array with at least one axis")
    parts = []
    if dtype is None:
        parts.append(bytes([code]))
    elif array.dtype.name != dtype:
        raise ValueError(f"wrong array dtype for {encoding}: got {array.dtype.name}")
    if shape is None:
        if array.ndim >= 64:
            raise ValueError(f"arrays of {array.ndim} axes cannot be stored in MDS (at most 63)")
        largest = max(array.shape)
        shape_code = 0 if largest < 1 << 8 else 1 if largest < 1 << 16 else 2 if largest < 1 << 32 else 3
        parts.append(bytes([(array.ndim << 2) | shape_code]))
        parts.append(np.array(array.shape, SHAPE_DTYPES[shape_code]).tobytes())
    elif array.shape != shape:
        raise ValueError(f"wrong array shape for {encoding}: got {array.shape}")
    parts.append(np.ascontiguousarray(array).tobytes())
    return b"".join(parts)


def ndarray_header(encoding: str, data) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, header length in bytes) of one ``ndarray`` value's bytes."""
    dtype, shape = parse_ndarray(encoding)
    position = 0
    if dtype is None:
        dtype = NDARRAY_CODE_DTYPES[data[0]]
        position = 1
    if shape is None:
        byte = data[position]
        ndim, shape_dtype = byte >> 2, np.dtype(SHAPE_DTYPES[byte & 3])
        start = position + 1
        shape = tuple(int(dim) for dim in np.frombuffer(data[start:start + ndim * shape_dtype.itemsize], shape_dtype))
        position = start + ndim * shape_dtype.itemsize
    return np.dtype(dtype), shape, position


def encode(encoding: str, value: Any) -> bytes:
    """The bytes of one value in ``encoding`` (Streaming's layout)."""
    if encoding in SCALAR_DTYPES:
        return SCALAR_DTYPES[encoding].type(value).tobytes()
    if encoding == "int":
        return np.int64(value).tobytes()
    if encoding == "str":
        if not isinstance(value, str):
            raise TypeError(f"a str column takes str values, got {type(value).__name__}")
        return value.encode("utf-8")
    if encoding == "bytes":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"a bytes column takes bytes values, got {type(value).__name__}")
        return bytes(value)
    if encoding == "json":
        return json.dumps(value.tolist() if isinstance(value, np.ndarray) else value).encode("utf-8")
    if encoding in ("str_int", "str_float", "str_decimal"):
        return str(value).encode("utf-8")
    if encoding.startswith("ndarray"):
        return _ndarray_encode(encoding, value)
    if encoding in ("jpeg", "png"):
        return _image_to_bytes(value, encoding.upper())
    if encoding == "pil":
        return _pil_raw_encode(value)
    if encoding.startswith("list["):
        inner = encoding[5:-1]
        return _list_encode(list(value), lambda item: encode(inner, item))
    if encoding in ("jpeg_array", "jpegarray"):
        sizes = np.array([len(image) for image in value], np.uint32).tobytes()
        return np.uint32(len(value)).tobytes() + sizes + b"".join(bytes(image) for image in value)
    check_encoding(encoding)
    raise AssertionError(encoding)


def decode(encoding: str, data) -> Any:
    """The value ``encode(encoding, value)`` produced ``data`` from (arrays are read-only views)."""
    if encoding in SCALAR_DTYPES:
        return np.frombuffer(data, SCALAR_DTYPES[encoding], count=1)[0]
    if encoding == "int":
        return int(np.frombuffer(data, np.int64, count=1)[0])
    if encoding == "str":
        return bytes(data).decode("utf-8")
    if encoding == "bytes":
        return bytes(data)
    if encoding == "json":
        return json.loads(bytes(data).decode("utf-8"))
    if encoding == "str_int":
        return int(bytes(data).decode("utf-8"))
    if encoding == "str_float":
        return float(bytes(data).decode("utf-8"))
    if encoding == "str_decimal":
        return decimal.Decimal(bytes(data).decode("utf-8"))
    if encoding.startswith("ndarray"):
        dtype, shape, header = ndarray_header(encoding, data)
        return np.frombuffer(data, dtype, offset=header).reshape(shape)
    if encoding in ("jpeg", "png"):
        return _pillow().open(io.BytesIO(bytes(data)))
    if encoding == "pil":
        return _pil_raw_decode(bytes(data))
    if encoding.startswith("list["):
        inner = encoding[5:-1]
        return _list_decode(bytes(data), 8, lambda item: decode(inner, item))
    if encoding in ("jpeg_array", "jpegarray"):
        return _list_decode(bytes(data), 4, lambda item: decode("jpeg", item))
    check_encoding(encoding)
    raise AssertionError(encoding)


# ----------------------------------------------------------------------------- shard compression

_COMPRESSION_LEVELS = {"zstd": (range(1, 23), 3), "gz": (range(10), 9), "bz2": (range(1, 10), 9),
                       "br": (range(12), 11), "snappy": (None, None)}


def parse_compression(compression: str | None) -> tuple[str, int | None] | None:
    """(algorithm, level) of Streaming's ``"algo"`` or ``"algo:level"`` compression, or None."""
    if not compression:
        return None
    algo, _, level_text = compression.partition(":")
    if algo not in _COMPRESSION_LEVELS:
        raise ConfigError(f"compression {compression!r} is unknown: use zstd, zstd:LEVEL, gz, bz2, br or snappy")
    levels, default = _COMPRESSION_LEVELS[algo]
    if not level_text:
        return algo, default
    if levels is None or not level_text.isdigit() or int(level_text) not in levels:
        raise ConfigError(f"compression {compression!r} has a bad level for {algo}")
    return algo, int(level_text)


def compression_extension(compression: str) -> str:
    return parse_compression(compression)[0]


def _codec_module(algo: str):
    modules = {"zstd": ("zstandard", "zstandard"), "br": ("brotli", "Brotli"), "snappy": ("snappy", "python-snappy")}
    module, package = modules[algo]
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"{algo} shard compression needs the {package} package: pip install {package}") from None


def compress(compression: str, data: bytes) -> bytes:
    algo, level = parse_compression(compression)
    if algo == "zstd":
        return _codec_module(algo).ZstdCompressor(level=level).compress(data)
    if algo == "gz":
        return gzip.compress(data, level)
    if algo == "bz2":
        return bz2.compress(data, level)
    if algo == "br":
        return _codec_module(algo).compress(data, quality=level)
    return _codec_module(algo).compress(data)


def decompress(compression: str, data: bytes) -> bytes:
    algo, _ = parse_compression(compression)
    if algo == "zstd":  # Streaming's frames may omit the content size, so read them as a stream
        return _codec_module(algo).ZstdDecompressor().decompressobj().decompress(data)
    if algo == "gz":
        return gzip.decompress(data)
    if algo == "bz2":
        return bz2.decompress(data)
    return _codec_module(algo).decompress(data)


# ----------------------------------------------------------------------------- shard hashes

XXHASH_ALGORITHMS = ("xxh32", "xxh64", "xxh128", "xxh3_64", "xxh3_128")


def check_hash(algo: str) -> None:
    if algo in XXHASH_ALGORITHMS:
        try:
            import xxhash  # noqa: F401
        except ImportError:
            raise ConfigError(f"the {algo} shard hash needs the xxhash package: pip install xxhash") from None
    elif algo not in hashlib.algorithms_available or algo.startswith("shake_") or not hasattr(hashlib, algo):
        raise ConfigError(f"shard hash {algo!r} is unknown: use e.g. sha1, sha256, md5, blake2b, xxh64, xxh3_64")


def file_hash(algo: str, data) -> str:
    """Hex digest of ``data`` under ``algo`` (a hashlib or xxhash algorithm name, as Streaming uses)."""
    check_hash(algo)
    if algo in XXHASH_ALGORITHMS:
        import xxhash
        return getattr(xxhash, algo)(data).hexdigest()
    return getattr(hashlib, algo)(data).hexdigest()
