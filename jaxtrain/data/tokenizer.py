"""Tokenizers: a byte-level BPE trained on the train split, a ``tokenizer.json`` file, or a Hub name.

``bpe:default`` trains a byte-level BPE (GPT-2 style pre-tokenisation, all 256 bytes in the base
alphabet, so any text round-trips exactly) with one special token, ``<|endoftext|>``, used as
both EOS and padding. The default vocabulary is 8192: on the ~8 MB stdlib corpus it gives about
3.9 bytes per token, while keeping the embedding small for the small models the corpus can
train (8192 x 512 is 4M parameters) and every token seen often enough to learn. It is a
multiple of 128, so ``model.vocab_size: 8192`` needs no padding.

A Hub name is downloaded with ``huggingface_hub`` into its cache: ``tokenizer.json``, and beside
it, where the repo has them, ``tokenizer_config.json`` and ``chat_template.jinja`` (the chat
template, see ``jaxtrain.data.chat``). A ``tokenizer_config.json`` beside a local or downloaded
``tokenizer.json`` names the EOS and padding tokens, as transformers reads it, unless
``tokenizer.kwargs`` does; without either, the first of a few common names in the vocabulary is
taken (padding: else the EOS).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxtrain.config.schema import ConfigError, error_line
from jaxtrain.tempfiles import temp_path

EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
# bpe:default trains on the train split's documents up to this many characters (the whole
# document that crosses it included); ``tokenizer.kwargs.train_max_chars`` sets another cap.
DEFAULT_TRAIN_MAX_CHARS = 64 * 1024 * 1024
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|eos|>", "[SEP]")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")
_HUB_HOST = ("huggingface.co", 443)
_HUB_TIMEOUT_S = 3.0
# Files of a Hub tokenizer: tokenizer.json is required; the others are read where the repo has them.
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# read into the tokenizer's config, never kept beside a checkpoint: what the config saved there
# says (with tokenizer.kwargs applied) would be overridden by it, as transformers reads it
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                      "additional_special_tokens")
HUB_OPTIONAL_FILES = (CONFIG_FILE, CHAT_TEMPLATE_FILE)
TOKENIZER_FILES = (TOKENIZER_FILE, *HUB_OPTIONAL_FILES)  # what a checkpoint keeps beside its steps


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the ids a language-model loader needs."""

    def __init__(self, backend: tokenizers.Tokenizer, *, eos_token: str | None = None, pad_token: str | None = None,
                 files_dir: str | None = None):
        self.backend = backend
        # the folder it was read from (a local one or the Hub download's), which may also hold its
        # tokenizer_config.json and chat_template.jinja; None for a tokenizer built in memory
        self.files_dir = files_dir
        self.eos_token_id = self._token_id(eos_token, _EOS_CANDIDATES, "eos_token")
        pad_token_id = self._token_id(pad_token, _PAD_CANDIDATES, "pad_token")
        self.pad_token_id = self.eos_token_id if pad_token_id is None else pad_token_id

    def _token_id(self, token: str | None, candidates: tuple[str, ...], kwarg: str) -> int | None:
        if token is not None:
            token_id = self.backend.token_to_id(token)
            if token_id is None:
                raise ConfigError(f"tokenizer.kwargs.{kwarg}={token!r} is not in the tokenizer's vocabulary")
            return token_id
        for candidate in candidates:
            token_id = self.backend.token_to_id(candidate)
            if token_id is not None:
                return token_id
        return None

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """A hex digest of the whole tokenizer definition (keys caches of its output)."""
        return hashlib.sha1(self.backend.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust library; no special tokens added."""
        return batch_ids(self.backend, texts)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def special_tokens(self) -> dict[str, str]:
        """The EOS and padding tokens' texts, as a ``tokenizer_config.json`` names them."""
        ids = {"eos_token": self.eos_token_id, "pad_token": self.pad_token_id}
        return {key: self.backend.id_to_token(i) for key, i in ids.items() if i is not None}

    def save(self, path: str) -> list[str]:
        """Write ``tokenizer.json`` and, beside it, a ``tokenizer_config.json`` naming its EOS and
        padding tokens (with the rest of the config it was read with, e.g. its chat template) and
        the ``chat_template.jinja`` it was read with, if any: loadable again, with the same special
        tokens, by jaxtrain (its path as ``tokenizer.name``) and by transformers' ``AutoTokenizer``.
        Returns the paths written."""
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        folder = os.path.dirname(os.path.abspath(path))
        _atomic_write(path, self.backend.to_str())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **read_tokenizer_config(self.files_dir),
                  **self.special_tokens()}
        written = [path, os.path.join(folder, CONFIG_FILE)]
        _atomic_write(written[1], json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        template = os.path.join(self.files_dir, CHAT_TEMPLATE_FILE) if self.files_dir else None
        if template and os.path.isfile(template) and os.path.abspath(self.files_dir) != folder:
            with open(template, encoding="utf-8") as handle:
                _atomic_write(os.path.join(folder, CHAT_TEMPLATE_FILE), handle.read())
            written.append(os.path.join(folder, CHAT_TEMPLATE_FILE))
        return written


def batch_ids(backend: tokenizers.Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens added). ``encode_batch_fast`` (tokenizers 0.20
    and newer) skips the character offsets nothing here reads: the same ids in about 30 % less
    time, which is most of the data's share of a small run's start-up."""
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]


def bpe_train_max_chars(kwargs: dict | None) -> int:
    """``tokenizer.kwargs.train_max_chars`` (a positive integer), else ``DEFAULT_TRAIN_MAX_CHARS``."""
    value = (kwargs or {}).get("train_max_chars", DEFAULT_TRAIN_MAX_CHARS)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"tokenizer.kwargs.train_max_chars={value!r} must be a positive integer (characters)")
    return value


def capped_texts(texts: Callable[[], Iterable[str]], max_chars: int) -> Callable[[], Iterator[str]]:
    """``texts`` (re-iterable) cut after the document that reaches ``max_chars`` characters."""

    def capped() -> Iterator[str]:
        total = 0
        for text in texts():
            if total >= max_chars:
                return
            total += len(text)
            yield text

    return capped


def load_tokenizer(cfg, *, cache_dir: str, train_texts: Callable[[], Iterable[str]] | None = None,
                   train_fingerprint: str | None = None) -> Tokenizer:
    """The tokenizer named by ``cfg`` (a ``TokenizerConfig``).

    ``bpe:default`` needs ``train_texts`` and caches its result under ``cache_dir``, keyed by
    ``train_fingerprint`` (or, when that is not given, a hash of the training texts) and the
    vocabulary size. Recognised ``cfg.kwargs``: ``vocab_size`` and ``train_max_chars`` (bpe:default;
    the caller caps ``train_texts`` with ``capped_texts``), ``eos_token`` and ``pad_token`` (else
    those a ``tokenizer_config.json`` beside the tokenizer.json declares); other keys (e.g.
    Foundry's ``model_max_length``) are accepted and unused.
    """
    kwargs = dict(cfg.kwargs or {})
    special = {"eos_token": kwargs.get("eos_token"), "pad_token": kwargs.get("pad_token")}
    name = cfg.name
    if name == "bpe:default" or name.startswith("bpe:"):
        if name != "bpe:default":
            raise ConfigError(f"tokenizer.name={name!r} is unknown: use bpe:default, a tokenizer.json path, or a Hub name")
        vocab_size = int(kwargs.get("vocab_size", DEFAULT_VOCAB_SIZE))
        return Tokenizer(_trained_bpe(vocab_size, cache_dir, train_texts, train_fingerprint), eos_token=EOS_TOKEN)
    if _looks_like_path(name):
        path = os.path.expanduser(name)
    else:
        path = os.path.join(hub_tokenizer_files(name), TOKENIZER_FILE)
    return tokenizer_from_file(path, what=f"tokenizer.name={name!r}", **special)


def tokenizer_from_file(path: str, *, what: str, eos_token: str | None = None,
                        pad_token: str | None = None) -> Tokenizer:
    """The tokenizer in ``path`` (a tokenizer.json, or the folder holding one), with the EOS and
    padding tokens given, else those the ``tokenizer_config.json`` beside it names (as
    transformers reads them), else the first of a few common names in its vocabulary."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    backend = read_tokenizer_file(path, what=what)
    config = read_tokenizer_config(folder)
    special = {"eos_token": eos_token, "pad_token": pad_token}
    for key in special:
        token = config_token(config, key)
        if special[key] is None and token is not None:
            if backend.token_to_id(token) is None:
                mapped = os.path.join(folder, SPECIAL_TOKENS_MAP_FILE)
                named_in = mapped if config_token(_json_object(mapped), key) == token else os.path.join(folder, CONFIG_FILE)
                raise ConfigError(f"{named_in}: {key}={token!r} is not in the vocabulary of its tokenizer.json; set "
                                  f"tokenizer.kwargs.{key} to a token that is")
            special[key] = token
    return Tokenizer(backend, files_dir=folder, **special)


def read_tokenizer_config(folder: str | None) -> dict:
    """The ``tokenizer_config.json`` in ``folder`` ({} when there is none), its special tokens
    replaced by those a ``special_tokens_map.json`` beside it names, as transformers'
    ``AutoTokenizer`` reads them; a file that is not a JSON object is a one-line ``ConfigError``."""
    if folder is None:
        return {}
    config = _json_object(os.path.join(folder, CONFIG_FILE))
    mapped = _json_object(os.path.join(folder, SPECIAL_TOKENS_MAP_FILE))
    return {**config, **{key: value for key, value in mapped.items() if key in SPECIAL_TOKEN_KEYS}}


def _json_object(path: str) -> dict:
    """The JSON object in ``path``, {} when there is no such file."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is not readable JSON ({error_line(error)}): fix or remove it") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} holds a JSON {type(config).__name__}, not an object: fix or remove it")
    return config


def config_token(config: dict, key: str) -> str | None:
    """The special token ``key`` (e.g. ``eos_token``) of a tokenizer_config.json (see ``token_text``)."""
    return token_text(config.get(key))


def token_text(value: object) -> str | None:
    """A special token as a tokenizer_config.json writes it: a string, or the ``content`` of an
    AddedToken mapping; None when unset or empty."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_tokenizer_file(path: str, *, what: str) -> tokenizers.Tokenizer:
    """The tokenizer saved at ``path`` (a tokenizer.json, or a folder holding one); a missing or
    unreadable file is a one-line ``ConfigError`` starting with ``what`` (the key or flag that named it)."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: no tokenizer file at {path} (not found); give the path of a tokenizer.json")
    try:
        return tokenizers.Tokenizer.from_file(path)
    except Exception as error:  # noqa: BLE001 - the tokenizers library raises a bare Exception for every failure
        reason = error_line(error)
        raise ConfigError(f"{what}: {path} is not a readable tokenizer.json ({reason}); give the tokenizer.json "
                          f"saved with the model") from None


def _looks_like_path(name: str) -> bool:
    return name.endswith(".json") or name.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(name))


def hub_tokenizer_files(name: str) -> str:
    """The folder of the Hub repo ``name``'s tokenizer files, downloaded (or found up to date) in the
    Hugging Face cache: ``tokenizer.json`` and whichever of ``HUB_OPTIONAL_FILES`` the repo has, all
    of the commit ``tokenizer.json`` came from. ``HF_HUB_OFFLINE``, an unreachable Hub (found within
    a few seconds) or a failed download is a one-line ``ConfigError``; a missing optional file is not."""
    advice = (f"download {name}'s {TOKENIZER_FILE} (with its {' and '.join(HUB_OPTIONAL_FILES)}, where it has "
              f"them) on a machine with network access and set tokenizer.name to the local path of their folder")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"tokenizer.name={name!r} is a Hub name but HF_HUB_OFFLINE is set: {advice}")
    try:
        socket.create_connection(_HUB_HOST, timeout=_HUB_TIMEOUT_S).close()
    except OSError:
        raise ConfigError(f"tokenizer.name={name!r} is a Hub name but huggingface.co is unreachable: {advice}") from None
    path = _hub_download(name, TOKENIZER_FILE, None, advice)
    if path is None:
        raise ConfigError(f"tokenizer.name={name!r}: the Hub repo has no {TOKENIZER_FILE}; give a repo or a "
                          f"local path that has one")
    folder = os.path.dirname(path)
    # the cache keeps each commit's files in a folder named by its hash: fetch the others from that commit
    commit = os.path.basename(folder)
    revision = commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None
    for filename in (*HUB_OPTIONAL_FILES, SPECIAL_TOKENS_MAP_FILE):
        _hub_download(name, filename, revision, advice)
    return folder


def _hub_download(name: str, filename: str, revision: str | None, advice: str) -> str | None:
    """The cached path of ``filename`` from Hub repo ``name`` at ``revision`` (None: its main branch),
    downloaded when not cached or out of date, as ``tokenizers.Tokenizer.from_pretrained`` fetches
    ``tokenizer.json``; None when the repo has no such file; any other failure is a one-line
    ``ConfigError``."""
    try:
        import huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise ConfigError(f"tokenizer.name={name!r} is a Hub name, which needs the huggingface_hub package: "
                          f"pip install huggingface_hub, or {advice}") from None
    if revision is not None:
        cached = huggingface_hub.try_to_load_from_cache(repo_id=name, filename=filename, revision=revision)
        if cached is not None and not isinstance(cached, str):  # the cache remembers the commit has no such file
            return None
    try:
        return huggingface_hub.hf_hub_download(repo_id=name, filename=filename, revision=revision)
    except Exception as error:  # noqa: BLE001 - HTTP, repository, authentication and file-system failures alike
        # LocalEntryNotFoundError (also an EntryNotFoundError): the connection failed, nothing cached
        if isinstance(error, EntryNotFoundError) and not isinstance(error, LocalEntryNotFoundError):
            return None
        raise ConfigError(f"tokenizer.name={name!r}: could not fetch {filename} from the Hub "
                          f"({error_line(error)}); {advice}") from None


def _trained_bpe(vocab_size: int, cache_dir: str, train_texts: Callable[[], Iterable[str]] | None,
                 train_fingerprint: str | None) -> tokenizers.Tokenizer:
    if vocab_size < 300:
        raise ConfigError(f"tokenizer.kwargs.vocab_size={vocab_size} is too small: byte-level BPE needs at least 300")
    if train_texts is None:
        raise ConfigError("tokenizer.name=bpe:default is trained on the train split, but no training texts were given")
    if train_fingerprint is None:
        digest = hashlib.sha1()
        for text in train_texts():
            digest.update(hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest())
        train_fingerprint = digest.hexdigest()
    key = hashlib.sha1(f"bpe-bytelevel-v1\0{vocab_size}\0{train_fingerprint}".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, "tokenizers", f"bpe-{vocab_size}-{key}", "tokenizer.json")
    if os.path.isfile(path):
        try:
            return tokenizers.Tokenizer.from_file(path)
        except Exception as err:  # noqa: BLE001 - tokenizers raises bare Exception for a damaged file
            logging.warning("the cached tokenizer %s cannot be read (%s); training it again", path,
                            str(err).splitlines()[0] if str(err) else type(err).__name__)
    backend = _train_bpe(train_texts(), vocab_size)
    _atomic_write(path, backend.to_str())
    return backend


def _train_bpe(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return backend


def _atomic_write(path: str, text: str) -> None:
    """Write via a temporary file and a rename, so concurrent processes never see half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temp_path(path)
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
