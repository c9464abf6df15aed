"""TensorFlow Datasets (TFDS) datasets prepared on local disk, read without TensorFlow.

A dataset is named ``NAME[/CONFIG][:VERSION][:SPLIT]`` (e.g. ``wikipedia/20230601.en``,
``mnist:3.0.1``, ``my_text:train[:10%]``) and must already be prepared in array_record (or
parquet) format under a data_dir, as ``tfds build NAME --file_format=array_record`` leaves it:
``DATA_DIR/NAME[/CONFIG]/VERSION/dataset_info.json`` plus its shard files. The folder is found
on local disk first (the newest version, and the one prepared config when none is named), so
a dataset that is not there fails at once with a one-line ``ConfigError`` saying how to prepare
it; TFDS itself is only asked to read a folder that exists (``tfds.builder_from_directory``),
never to look anything up or download. TFDS is an optional dependency:
``pip install 'jaxtrain[tfds]'``.

As a training source (``documents_for``), a dataset config reads::

    dataset:
      source: tfds
      local: ~/tensorflow_datasets      # the data_dir; default $TFDS_DATA_DIR or ~/tensorflow_datasets
      split: train                      # any TFDS split, slices too: train[:90%], train+validation
      text_field: text                  # the Text feature holding each document
      extra: {tfds_name: wikipedia/20230601.en}

``extra.tfds_name`` may carry a split too (``wikipedia/20230601.en:train``); it then wins over
``split``. ``local`` may also be a prepared version folder itself (``.../mnist/3.0.1``), with no
``tfds_name``. ``jaxtrain data prepare tfds:NAME`` reads through the same code. The
fingerprint covers ``dataset_info.json`` and the name, size and modification time of every file
in the version folder, so caches built from the dataset go stale when it is rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator

from jaxtrain.config.schema import ConfigError
from jaxtrain.data.sources import Documents, fingerprint_files

INFO_BASENAME = "dataset_info.json"
INSTALL_HINT = "pip install 'jaxtrain[tfds]'"
# File formats TFDS reads by index without TensorFlow, in order of preference.
RANDOM_ACCESS_FORMATS = ("array_record", "parquet")
_READ_BATCH = 256
_VERSION = r"\d+\.\d+\.\d+"
_SPEC = re.compile(rf"(?P<name>[A-Za-z0-9_.-]+)(?:/(?P<config>[^/:]+))?(?::(?P<version>{_VERSION}))?(?::(?P<split>.+))?")


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """The parts of ``NAME[/CONFIG][:VERSION][:SPLIT]``."""

    name: str
    config: str | None = None
    version: str | None = None
    split: str | None = None


def parse_spec(spec: str, *, what: str = "tfds") -> TfdsSpec:
    """``NAME[/CONFIG][:VERSION][:SPLIT]`` as a ``TfdsSpec``."""
    match = _SPEC.fullmatch(spec.strip())
    if not match:
        raise ConfigError(f"{what}: {spec!r} is not a TFDS dataset name: write NAME[/CONFIG][:VERSION][:SPLIT], "
                          f"e.g. wikipedia/20230601.en:train")
    return TfdsSpec(**match.groupdict())


def default_data_dir() -> str:
    """TFDS's default data_dir: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


@dataclasses.dataclass(frozen=True)
class PreparedTfds:
    """A prepared dataset version on local disk and one split of it."""

    path: str  # the version folder holding dataset_info.json
    label: str  # NAME[/CONFIG]:VERSION
    info: dict
    info_bytes: bytes
    split: str
    file_format: str

    @property
    def name(self) -> str:
        return str(self.info["name"])

    def num_shards(self) -> int:
        shards = {entry["name"]: len(entry.get("shardLengths") or [None]) for entry in self.info.get("splits", [])}
        return sum(shards.get(base, 0) for base in _split_names(self.split))


def require_tfds(what: str):
    """The ``tensorflow_datasets`` module, or a ``ConfigError`` saying how to install it."""
    try:
        import tensorflow_datasets
    except ImportError:
        raise ConfigError(f"{what} needs tensorflow-datasets, which is not installed: {INSTALL_HINT}") from None
    return tensorflow_datasets


def locate(spec: TfdsSpec, data_dir: str | None, split: str, *, what: str, data_dir_hint: str) -> PreparedTfds:
    """The prepared folder of ``spec`` under ``data_dir``, checked on local disk only (no network)."""
    if data_dir and "://" in data_dir:
        raise ConfigError(f"{what}: data_dir {data_dir} is remote; TFDS datasets are read from local disk: copy the "
                          f"prepared dataset folder to local disk and point {data_dir_hint} at it")
    data_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
    split = spec.split or split
    base = os.path.join(data_dir, spec.name)
    named = f"{spec.name}/{spec.config}" if spec.config else spec.name
    build = (f"`tfds build {named}{'' if spec.version is None else ':' + spec.version} --file_format=array_record "
             f"--data_dir={data_dir}`")
    not_prepared = (f"{what}: {named} is not prepared in {data_dir} (no {named}/"
                    f"{spec.version or 'VERSION'}/{INFO_BASENAME} there): prepare it with {build}, or point "
                    f"{data_dir_hint} at the data_dir that holds it")
    folder = os.path.join(base, spec.config) if spec.config else base
    versions = _versions(folder)
    if not spec.config and not versions and os.path.isdir(base):
        configs = sorted(entry for entry in os.listdir(base) if _versions(os.path.join(base, entry)))
        if len(configs) > 1:
            raise ConfigError(f"{what}: {spec.name} is prepared in {data_dir} for the configs {', '.join(configs)}: "
                              f"name one, e.g. {spec.name}/{configs[0]}")
        if configs:
            folder = os.path.join(base, configs[0])
            versions = _versions(folder)
    if spec.version is not None:
        if spec.version not in versions:
            found = f" (prepared versions: {', '.join(versions)})" if versions else ""
            raise ConfigError(not_prepared + found)
        version = spec.version
    elif versions:
        version = versions[-1]
    else:
        raise ConfigError(not_prepared)
    return _prepared(os.path.join(folder, version), split, what=what)


def _versions(folder: str) -> list[str]:
    """Version sub-folders of ``folder`` holding a dataset_info.json, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = [entry for entry in os.listdir(folder)
             if re.fullmatch(_VERSION, entry) and os.path.isfile(os.path.join(folder, entry, INFO_BASENAME))]
    return sorted(found, key=lambda version: tuple(int(part) for part in version.split(".")))


def _split_names(split: str) -> list[str]:
    """The split names in a TFDS split expression: ``train[:10%]+test`` -> [train, test]."""
    return [part.split("[")[0].strip() for part in split.split("+")]


def _prepared(path: str, split: str, *, what: str) -> PreparedTfds:
    info_path = os.path.join(path, INFO_BASENAME)
    with open(info_path, "rb") as handle:
        info_bytes = handle.read()
    try:
        info = json.loads(info_bytes)
        splits = {entry["name"] for entry in info.get("splits", [])}
        named = "/".join(str(part) for part in (info["name"], info.get("configName")) if part)
        label = f"{named}:{info.get('version') or os.path.basename(os.path.normpath(path))}"
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{what}: {info_path} is not a TFDS dataset_info.json: prepare the dataset again") from None
    unknown = [name for name in _split_names(split) if name not in splits]
    if unknown:
        raise ConfigError(f"{what}: {label} has no split {unknown[0]!r} (it has {', '.join(sorted(splits)) or 'none'}): "
                          f"choose one of those")
    formats = [info.get("fileFormat") or "tfrecord", *(info.get("alternativeFileFormats") or [])]
    usable = [name for name in RANDOM_ACCESS_FORMATS if name in formats]
    if not usable:
        raise ConfigError(f"{what}: {label} in {path} is stored as {formats[0]}, which only TensorFlow reads: rebuild "
                          f"it with `tfds build {label.split(':')[0]} --file_format=array_record`")
    prepared = PreparedTfds(path, label, info, info_bytes, split, usable[0])
    dataset_name = prepared.name
    for entry in info["splits"]:
        if entry["name"] in _split_names(split):
            expected = len(entry.get("shardLengths") or [])
            prefix = f"{dataset_name}-{entry['name']}.{prepared.file_format}"
            present = [name for name in os.listdir(path) if name.startswith(prefix)]
            if len(present) < expected:
                raise ConfigError(f"{what}: {label} split {entry['name']!r} in {path} has {len(present)} of its "
                                  f"{expected} shard files: the preparation was cut short; prepare it again")
    return prepared


def _text(value, field: str, what: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    item = getattr(value, "item", None)  # a NumPy scalar or 0-d array of bytes / str
    if item is not None and getattr(value, "ndim", 0) == 0:
        return _text(item(), field, what)
    raise ConfigError(f"{what}: feature {field!r} holds {type(value).__name__}, not text: set text_field to a Text "
                      f"feature")


def read_texts(prepared: PreparedTfds, text_field: str, *, what: str, field_hint: str) -> Iterator[str]:
    """The ``text_field`` of every example of ``prepared``'s split, in stored order."""
    tfds = require_tfds(what)
    try:
        builder = tfds.builder_from_directory(prepared.path, file_format=prepared.file_format)
        containers = (tfds.features.FeaturesDict, tfds.features.Sequence)
        skip = {name: tfds.decode.SkipDecoding() for name, feature in builder.info.features.items()
                if name != text_field and not isinstance(feature, containers)}  # e.g. images: not decoded
        source = builder.as_data_source(split=prepared.split, decoders=skip)
    except Exception as error:  # TFDS raises many kinds; one line is enough to act on
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{what}: {prepared.label} split {prepared.split!r} in {prepared.path} cannot be read "
                          f"({reason}); prepare it again with `tfds build ... --file_format=array_record`") from None
    features = sorted(getattr(builder.info.features, "keys", lambda: [])())
    if features and text_field not in features:
        raise ConfigError(f"{what}: {prepared.label} has no feature {text_field!r} (it has {', '.join(features)}): "
                          f"{field_hint}")
    total = len(source)
    for start in range(0, total, _READ_BATCH):
        for record in source.__getitems__(list(range(start, min(start + _READ_BATCH, total)))):
            if text_field not in record:
                raise ConfigError(f"{what}: {prepared.label} has no feature {text_field!r} (it has "
                                  f"{', '.join(sorted(record))}): {field_hint}")
            yield _text(record[text_field], text_field, what)


def fingerprint(prepared: PreparedTfds, text_field: str) -> str:
    """Changes whenever the prepared files, the split or the field change."""
    paths = sorted(os.path.join(prepared.path, name) for name in os.listdir(prepared.path)
                   if os.path.isfile(os.path.join(prepared.path, name)))
    return fingerprint_files(paths, "tfds", prepared.label, prepared.split, text_field, prepared.info_bytes)


def tfds_documents(dataset, *, key: str = "train_loader.dataset") -> Documents:
    """The ``text_field`` of each example of the prepared TFDS dataset a ``DatasetConfig`` names (see the module doc)."""
    extra = dataset.extra or {}
    if dataset.remote:
        raise ConfigError(f"{key}.remote is set, but tfds reads a prepared data_dir on local disk: unset remote and "
                          f"set {key}.local to the data_dir")
    spec_text = extra.get("tfds_name")
    what = f"{key} (tfds:{spec_text})" if spec_text else key
    require_tfds(what)
    if spec_text:
        spec = parse_spec(str(spec_text), what=f"{key}.extra.tfds_name")
    elif dataset.local and os.path.isfile(os.path.join(os.path.expanduser(dataset.local), INFO_BASENAME)):
        spec = TfdsSpec(name="")
    else:
        raise ConfigError(f"{key}.extra.tfds_name is not set: name the TFDS dataset, e.g. "
                          f"extra: {{tfds_name: wikipedia/20230601.en}}, with local: its data_dir")
    if spec.name:
        prepared = locate(spec, dataset.local, dataset.split, what=what, data_dir_hint=f"{key}.local")
    else:
        prepared = _prepared(os.path.expanduser(dataset.local), dataset.split, what=what)
    text_field = dataset.text_field

    def texts() -> Iterator[str]:
        return read_texts(prepared, text_field, what=what, field_hint=f"set {key}.text_field to the Text feature")

    return Documents(f"tfds:{prepared.label}:{prepared.split}", fingerprint(prepared, text_field), texts,
                     prepared.num_shards())


def tfds_input(spec: str, *, data_dir: str | None, split: str, text_field: str) -> Callable[[], Iterator[str]]:
    """``jaxtrain data prepare``'s ``tfds:SPEC`` input: checked now, read when called."""
    what = f"tfds:{spec}"
    require_tfds(what)
    prepared = locate(parse_spec(spec, what=what), data_dir, split, what=what, data_dir_hint="--tfds-data-dir")
    return lambda: read_texts(prepared, text_field, what=what, field_hint="choose one with --text-field")
