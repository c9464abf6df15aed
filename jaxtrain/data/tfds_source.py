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


def locate(spec: TfdsSpec, data_dir: str | None, split: str, *, what: str, data_dir_hint: str,
           split_key: str) -> PreparedTfds:
    """The prepared folder of ``spec`` under ``data_dir``, checked on local disk only (no network).

    ``split_key`` names where the split came from (a config key or a command-line argument)."""
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
    return _prepared(os.path.join(folder, version), split, what=what, split_key=split_key)


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


def _prepared(path: str, split: str, *, what: str, split_key: str) -> PreparedTfds:
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
                          f"set {split_key} to one of those")
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


def _reason(error: BaseException) -> str:
    """The gist of an error from TFDS or ArrayRecord: its first line, up to the first ';'."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    reason = text.splitlines()[0].split(";")[0].strip()
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _rebuild(prepared: PreparedTfds) -> str:
    """The ``tfds build`` command that prepares ``prepared`` again, over what is there."""
    named, version = prepared.label.rsplit(":", 1)
    parts = os.path.normpath(prepared.path).split(os.sep)
    tail = [*named.split("/"), version]
    data_dir = ""
    if len(parts) > len(tail) and parts[-len(tail):] == tail:  # DATA_DIR/NAME[/CONFIG]/VERSION
        data_dir = f" --data_dir={os.sep.join(parts[:-len(tail)]) or os.sep}"
    return f"`tfds build {named}:{version} --file_format=array_record --overwrite{data_dir}`"


def _builder(prepared: PreparedTfds, what: str):
    """TFDS's reader of ``prepared``'s folder (only that folder is read: no lookup, no download)."""
    tfds = require_tfds(what)
    try:
        return tfds.builder_from_directory(prepared.path, file_format=prepared.file_format)
    except Exception as error:  # TFDS raises many kinds; one line is enough to act on
        raise ConfigError(f"{what}: {prepared.label} in {prepared.path} cannot be read ({_reason(error)}): prepare it "
                          f"again with {_rebuild(prepared)}") from None


def check_split(prepared: PreparedTfds, *, what: str, split_key: str) -> None:
    """A ``ConfigError`` naming ``split_key`` when ``prepared.split`` is no TFDS split expression or a part of it
    selects no example (``train[5:2]``, ``train[:0]``, ``train[200:]`` of 100 examples)."""
    splits = _builder(prepared, what).info.splits
    split = prepared.split

    def refuse(reason: str):
        return ConfigError(f"{what}: split {split!r} of {prepared.label} {reason}: write {split_key} as NAME or "
                           f"NAME[FROM:TO] in examples or percent, parts joined by + (e.g. train, train[:1000], "
                           f"train[10%:], train[:90%]+test); a slice must select at least one example")

    try:
        splits[split]  # TFDS's own parser, as the reading will use it
    except Exception as error:
        if "percent" in str(error):
            raise refuse("has a percent bound outside -100%..100%") from None
        if "Error parsing split" in str(error) or "Unrecognized split" in str(error):
            raise refuse("is not a TFDS split expression") from None
    for part in (part.strip() for part in split.split("+")):
        name = part.split("[")[0].strip()
        try:
            available = splits[name].num_examples
        except Exception:
            raise refuse(f"names no split {name!r}") from None
        if available <= 0:
            raise ConfigError(f"{what}: split {name!r} of {prepared.label} holds no examples: set {split_key} to "
                              f"another split")
        try:
            selected = splits[part].num_examples
        except Exception as error:
            if "incompatible" in str(error):  # a bound past the end: "Requested slice [60:50] incompatible with 50"
                raise refuse(f"selects no example ({part} starts past the {available} of {name!r})") from None
            raise refuse(f"cannot take {part} ({_reason(error)})") from None
        if selected < 0:
            raise refuse(f"runs backwards ({part}: FROM must come before TO)")
        if selected == 0:
            raise refuse(f"selects no example ({part} of the {available} in {name!r})")


def _shard_ranges(builder, split: str, total: int) -> list[tuple[str | None, int, int]]:
    """(shard file, first key, end key) of each stretch of ``split``'s keys read from one shard file, in order;
    one stretch with no file when TFDS's file instructions do not add up to ``total`` (e.g. parquet)."""
    try:
        instructions = list(builder.info.splits[split].file_instructions)
    except Exception:
        instructions = []
    ranges, start = [], 0
    for instruction in instructions:
        ranges.append((instruction.filename, start, start + instruction.take))
        start += instruction.take
    return ranges if start == total else [(None, 0, total)]


def _text(value, field: str, what: str, hint: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    item = getattr(value, "item", None)  # a NumPy scalar or 0-d array of bytes / str
    if item is not None and getattr(value, "ndim", 0) == 0:
        return _text(item(), field, what, hint)
    raise ConfigError(f"{what}: feature {field!r} holds {type(value).__name__}, not text: {hint}")


def read_texts(prepared: PreparedTfds, text_field: str, *, what: str, field_hint: str) -> Iterator[str]:
    """The ``text_field`` of every example of ``prepared``'s split, in stored order.

    ``field_hint`` says how to choose another feature (e.g. ``set train_loader.dataset.text_field to``). A shard
    file that cannot be read is a ``ConfigError`` naming it."""
    tfds = require_tfds(what)
    builder = _builder(prepared, what)
    try:
        containers = (tfds.features.FeaturesDict, tfds.features.Sequence)
        skip = {name: tfds.decode.SkipDecoding() for name, feature in builder.info.features.items()
                if name != text_field and not isinstance(feature, containers)}  # e.g. images: not decoded
        source = builder.as_data_source(split=prepared.split, decoders=skip)
        total = len(source)
    except Exception as error:  # TFDS raises many kinds; one line is enough to act on
        raise ConfigError(f"{what}: {prepared.label} split {prepared.split!r} in {prepared.path} cannot be read "
                          f"({_reason(error)}): prepare it again with {_rebuild(prepared)}") from None
    feature_items = dict(getattr(builder.info.features, "items", lambda: [])())
    features = sorted(feature_items)
    text_features = [name for name in features if isinstance(feature_items[name], tfds.features.Text)]
    choose = f"{field_hint} a Text feature" + (f" ({', '.join(text_features)})" if text_features else "")
    if features and text_field not in features:
        raise ConfigError(f"{what}: {prepared.label} has no feature {text_field!r} (it has {', '.join(features)}): "
                          f"{choose}")
    for filename, first, end in _shard_ranges(builder, prepared.split, total):
        for start in range(first, end, _READ_BATCH):
            try:  # each batch within one shard file, so a damaged one is named
                records = source.__getitems__(list(range(start, min(start + _READ_BATCH, end))))
            except Exception as error:
                shard = f"shard file {filename}" if filename else f"a shard file in {prepared.path}"
                raise ConfigError(f"{what}: {shard} of {prepared.label} split {prepared.split!r} is damaged "
                                  f"({_reason(error)}): prepare the dataset again with {_rebuild(prepared)}") from None
            for record in records:
                if text_field not in record:
                    raise ConfigError(f"{what}: {prepared.label} has no feature {text_field!r} (it has "
                                      f"{', '.join(sorted(record))}): {choose}")
                yield _text(record[text_field], text_field, what, choose)


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
    if dataset.streams:
        raise ConfigError(f"{key}.streams is set, but streams are for MDS data (source: mds) and tfds reads one "
                          f"dataset: remove {key}.streams and name the dataset in {key}.extra.tfds_name, or prepare "
                          f"each as MDS with `jaxtrain data prepare tfds:NAME` and stream those")
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
    split_key = f"the split in {key}.extra.tfds_name" if spec.split else f"{key}.split"
    if spec.name:
        prepared = locate(spec, dataset.local, dataset.split, what=what, data_dir_hint=f"{key}.local",
                          split_key=split_key)
    else:
        prepared = _prepared(os.path.expanduser(dataset.local), dataset.split, what=what, split_key=split_key)
    check_split(prepared, what=what, split_key=split_key)
    text_field = dataset.text_field

    def texts() -> Iterator[str]:
        return read_texts(prepared, text_field, what=what, field_hint=f"set {key}.text_field to")

    return Documents(f"tfds:{prepared.label}:{prepared.split}", fingerprint(prepared, text_field), texts,
                     prepared.num_shards())


def tfds_input(spec: str, *, data_dir: str | None, split: str, text_field: str) -> Callable[[], Iterator[str]]:
    """``jaxtrain data prepare``'s ``tfds:SPEC`` input: checked now, read when called."""
    what = f"tfds:{spec}"
    require_tfds(what)
    parsed = parse_spec(spec, what=what)
    split_key = f"the split in {what}" if parsed.split else "--input-split"
    prepared = locate(parsed, data_dir, split, what=what, data_dir_hint="--tfds-data-dir", split_key=split_key)
    check_split(prepared, what=what, split_key=split_key)
    return lambda: read_texts(prepared, text_field, what=what, field_hint="set --text-field to")
