"""Chat-formatted fine-tuning examples: ``{"messages": [{"role": ..., "content": ...}, ...]}``.

A conversation is cut into turns, one per assistant message, as LLM Foundry cuts it: each turn's
prompt is the template's text of every message since the previous assistant message, ending with
the template's generation prompt (``add_generation_prompt``), and its response is the text the
assistant message adds after that. Prompt and response are tokenized separately, without the
tokenizer's own special tokens (the template writes those).

The template is, in this order: ``tokenizer.kwargs.chat_template`` (a Jinja template, the key
Hugging Face's ``from_pretrained`` takes); beside the tokenizer's ``tokenizer.json`` (a local one,
or the one downloaded for a Hub name, which brings these files along), a ``chat_template.jinja``,
else the ``chat_template`` of ``tokenizer_config.json`` (transformers' precedence); else
``DEFAULT_CHAT_TEMPLATE``, the ChatML template LLM Foundry falls back to when a tokenizer has none::

    <|im_start|>user\\nWhat is 2+2?<|im_end|>\\n<|im_start|>assistant\\n4<|im_end|>\\n

The default is rendered without Jinja; any other template needs the ``jinja2`` package and is
run in a sandbox as transformers runs it (``raise_exception``, ``strftime_now``, ``tojson``,
``{% generation %}`` blocks, the special tokens, ``tools`` and ``documents`` set to none) plus
Foundry's ``date_string``.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Callable, Sequence

from jaxtrain.config.schema import ConfigError
from jaxtrain.data.tokenizer import CHAT_TEMPLATE_FILE, CONFIG_FILE, config_token, read_tokenizer_config, token_text

ROLES = ("user", "assistant", "system", "tool")
Messages = tuple[tuple[str, str], ...]  # (role, content) pairs

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
_CHAT_LINES = '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}'


def validate_messages(messages, where: str) -> Messages:
    """The (role, content) pairs of a ``messages`` value; a bad one is a one-line ``ConfigError``.

    The rules are LLM Foundry's: a list of at least two messages, each exactly ``role`` and
    ``content``, roles among ``ROLES``, never the same role twice in a row, the last one the
    assistant's. Contents must be strings (text only).
    """
    fix = f"chat lines are {_CHAT_LINES}: fix or remove that line"
    if not isinstance(messages, list):
        raise ConfigError(f"{where} field 'messages' is {type(messages).__name__}, not a list of messages: {fix}")
    if len(messages) < 2:
        raise ConfigError(f"{where} has {len(messages)} message(s); a chat example needs at least two, the last "
                          f"the assistant's: {fix}")
    pairs, previous = [], None
    for index, message in enumerate(messages):
        at = f"{where} message {index}"
        if not isinstance(message, dict):
            raise ConfigError(f"{at} is {type(message).__name__}, not an object: {fix}")
        if set(message) != {"role", "content"}:
            raise ConfigError(f"{at} has keys {sorted(message)}; a message has exactly 'role' and 'content': {fix}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ConfigError(f"{at} has role {role!r}; roles are {', '.join(ROLES)}: fix or remove that line")
        if not isinstance(content, str):
            raise ConfigError(f"{at} content is {type(content).__name__}, not a string (text only): "
                              f"fix or remove that line")
        if role == previous:
            raise ConfigError(f"{at} repeats role {role!r} of the message before it; merge the two or put the "
                              f"other role between them: fix or remove that line")
        pairs.append((role, content))
        previous = role
    if previous != "assistant":
        raise ConfigError(f"{where} ends with a {previous!r} message; the last message must be the assistant's "
                          f"(it is what the model learns to write): fix or remove that line")
    return tuple(pairs)


class ChatTemplate:
    """Renders messages to text, as ``tokenizer.apply_chat_template(..., tokenize=False)`` does."""

    def __init__(self, render: Callable[[list[dict], bool], str], origin: str):
        self._render = render
        self.origin = origin  # where the template came from, for error messages

    @classmethod
    def default(cls) -> ChatTemplate:
        def render(messages: list[dict], add_generation_prompt: bool) -> str:
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

        return cls(render, "the default ChatML template")

    @classmethod
    def from_jinja(cls, source: str, origin: str, special_tokens: dict | None = None) -> ChatTemplate:
        try:
            import jinja2
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ConfigError(f"{origin} is a Jinja template, which needs the jinja2 package: "
                              f"pip install jinja2") from None

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_generation_block(), loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            template = env.from_string(source)
        except jinja2.exceptions.TemplateError as error:
            raise ConfigError(f"{origin} is not a valid Jinja template ({error}): fix it") from None
        extra = dict(special_tokens or {}, date_string=datetime.datetime.now().strftime("%d %b %Y"))

        def render(messages: list[dict], add_generation_prompt: bool) -> str:
            return template.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **extra)

        _check_renders_content(render, origin)
        return cls(render, origin)

    def render(self, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = False,
               where: str = "") -> str:
        try:
            return self._render([{"role": r, "content": c} for r, c in messages], add_generation_prompt)
        except Exception as error:  # noqa: BLE001 - a template may raise anything; name the line and the template
            raise ConfigError(f"{where}: {self.origin} failed on this conversation "
                              f"({type(error).__name__}: {error}): fix the line or the template") from None


# A conversation each template renders once when it is read: a template whose text leaves out what
# the messages say would train the model on role names and markup alone.
_PROBE = ({"role": "user", "content": "jaxtrain-probe question 7351"},
          {"role": "assistant", "content": "jaxtrain-probe answer 2946"})


def _check_renders_content(render: Callable[[list[dict], bool], str], origin: str) -> None:
    """Refuse a template that renders the probe conversation without its messages' text. One that
    fails on it (a template that demands, say, a system message first) is left to the data."""
    try:
        text = render([dict(message) for message in _PROBE], False)
    except Exception:  # noqa: BLE001 - the conversations of the dataset decide
        return
    missing = [message["role"] for message in _PROBE if message["content"] not in str(text)]
    if missing:
        raise ConfigError(f"{origin} renders a conversation without its {' and '.join(missing)} messages' text "
                          f"(no message['content'] in its output); the model would learn the markup alone: use a "
                          f"template that writes each message's content")


@functools.cache
def _generation_block() -> type:
    """A Jinja extension for transformers' ``{% generation %}...{% endgeneration %}`` tag (it marks
    the assistant's text for masks): the block renders as its content."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_content"), [], [], body).set_lineno(lineno)

        def _content(self, caller) -> str:
            return caller()

    return GenerationBlock


def chat_turns(messages: Messages, template: ChatTemplate, where: str) -> list[tuple[str, str]]:
    """(prompt text, response text) of each assistant message, in order (see the module doc)."""
    turns, previous = [], ""
    for index, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        full = template.render(messages[: index + 1], where=where)
        prompt = template.render(messages[:index], add_generation_prompt=True, where=where)
        if not (full.startswith(previous) and prompt.startswith(previous) and full.startswith(prompt)):
            raise ConfigError(f"{where}: {template.origin} does not render this conversation turn by turn (the text "
                              f"up to message {index} is not the start of the text through it); use a template "
                              f"whose rendering of a conversation starts with its rendering of every earlier part")
        turns.append((prompt[len(previous):], full[len(prompt):]))
        previous = full
    return turns


def chat_template(tokenizer_cfg, tokenizer=None) -> ChatTemplate:
    """The template for a ``TokenizerConfig`` (see the module doc for the order); for a Hub name,
    ``tokenizer`` (as ``load_tokenizer`` returns it) tells where its files were downloaded."""
    name = os.path.expanduser(tokenizer_cfg.name or "")
    folder = name if os.path.isdir(name) else os.path.dirname(name) if name.endswith(".json") else None
    if folder is None:  # a Hub name: the folder its files were downloaded to
        folder = getattr(tokenizer, "files_dir", None)
    config = read_tokenizer_config(folder)
    source = (tokenizer_cfg.kwargs or {}).get("chat_template")
    if source is not None:
        return _template_value(source, "tokenizer.kwargs.chat_template", _special_tokens(config, tokenizer))
    if folder is not None:
        config_path = os.path.join(folder, CONFIG_FILE)
        jinja_path = os.path.join(folder, CHAT_TEMPLATE_FILE)
        if os.path.isfile(jinja_path):  # transformers lets it override the config's template
            try:
                with open(jinja_path, encoding="utf-8") as handle:
                    source = handle.read()
            except (OSError, UnicodeDecodeError) as error:
                raise ConfigError(f"{jinja_path} is not readable UTF-8 text ({error}): fix or remove it") from None
            return ChatTemplate.from_jinja(source, jinja_path, _special_tokens(config, tokenizer))
        if config.get("chat_template") is not None:
            return _template_value(config["chat_template"], f"{config_path} chat_template",
                                   _special_tokens(config, tokenizer))
    return ChatTemplate.default()


def _template_value(value, origin: str, special_tokens: dict) -> ChatTemplate:
    """A template given as a string, or as Hugging Face's list of named templates (the one named default)."""
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        value = named.get("default")
        origin = f"{origin} (the one named 'default')"
    if not isinstance(value, str):
        raise ConfigError(f"{origin} is not a template string: give the Jinja text of the chat template")
    return ChatTemplate.from_jinja(value, origin, special_tokens)


def _special_tokens(config: dict, tokenizer) -> dict:
    """The special-token strings a template may use, from a tokenizer_config.json (as transformers'
    ``special_tokens_map`` gives them) or the tokenizer. The tokenizer's EOS wins: it is the
    config's unless ``tokenizer.kwargs.eos_token`` overrides it, as a keyword argument of
    transformers' ``from_pretrained`` overrides it."""
    tokens = {}
    for name in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        token = config_token(config, name)
        if token is not None:
            tokens[name] = token
    listed = config.get("additional_special_tokens")
    if isinstance(listed, list):
        additional = [token for token in map(token_text, listed) if token is not None]
        if additional:
            tokens["additional_special_tokens"] = additional
    for name, token_id in (("eos_token", getattr(tokenizer, "eos_token_id", None)),
                           ("pad_token", getattr(tokenizer, "pad_token_id", None))):
        if (name == "eos_token" or name not in tokens) and token_id is not None:
            tokens[name] = tokenizer.backend.id_to_token(token_id)
    return tokens
