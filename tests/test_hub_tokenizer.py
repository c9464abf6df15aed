"""A Hub tokenizer brings its tokenizer_config.json and chat_template.jinja along with its
tokenizer.json, and chat data is rendered with the repo's own template and special tokens.

The Hub is faked (no network): ``FakeHub`` stands in for ``huggingface_hub.hf_hub_download``,
serving the repos of ``fixtures/hub_tokenizer``. The expected renderings are transformers' own
``apply_chat_template`` output for the same files, recorded by
``fixtures/hub_tokenizer/make_expected.py``.
"""

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

import jaxtrain.data.tokenizer as tokenizer_module
from jaxtrain.config import ConfigError, load_config_dict
from jaxtrain.config.schema import TokenizerConfig
from jaxtrain.data.build import build_loaders
from jaxtrain.data.chat import ChatTemplate, chat_template, chat_turns
from jaxtrain.data.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "hub_tokenizer"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
MESSAGES = tuple((message["role"], message["content"]) for message in EXPECTED["messages"])
# The special tokens a template sees, then the text of the messages (a template must write it)
SPECIAL_TOKENS_TEMPLATE = "{{ bos_token }}{{ eos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
CONTENTS = "".join(content for _, content in MESSAGES[:2])
COMMIT = "0123456789abcdef0123456789abcdef01234567"
X = -100  # ignored label


class FakeHub:
    """``hf_hub_download`` for repos ``org/<name>``: ``fixtures/hub_tokenizer/tokenizer.json`` and the
    files of ``repos/<name>/``, copied into a cache laid out as the Hub's (``snapshots/<commit>/``);
    a file it lacks raises ``EntryNotFoundError`` as a 404 does, one in ``unreachable`` raises what
    a failed connection without a cached copy raises. ``calls``: (repo, file, revision) asked for."""

    NO_EXIST = object()  # what try_to_load_from_cache returns for a file the cache knows is absent

    def __init__(self, cache: Path, unreachable=()):
        self.cache, self.unreachable, self.calls, self.absent = cache, set(unreachable), [], set()

    def try_to_load_from_cache(self, repo_id, filename, revision=None, **kwargs):
        return self.NO_EXIST if (repo_id, filename, revision) in self.absent else None

    def __call__(self, repo_id, filename, *, revision=None, **kwargs):
        self.calls.append((repo_id, filename, revision))
        if filename in self.unreachable:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot "
                                          "find the requested files in the local cache.\nCheck your connection.")
        owner, name = repo_id.split("/")
        source = FIXTURES / ("tokenizer.json" if filename == "tokenizer.json" else f"repos/{name}/{filename}")
        if not source.is_file():
            self.absent.add((repo_id, filename, COMMIT))
            raise EntryNotFoundError(f"404 Client Error. Entry Not Found for url: https://huggingface.co/{repo_id}"
                                     f"/resolve/{revision or 'main'}/{filename}.")
        target = self.cache / f"models--{owner}--{name}" / "snapshots" / COMMIT / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return str(target)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # the reachability probe succeeds without a connection
    monkeypatch.setattr(tokenizer_module, "socket",
                        SimpleNamespace(create_connection=lambda address, timeout: SimpleNamespace(close=lambda: None)))
    fake = FakeHub(tmp_path / "hub-cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", fake.try_to_load_from_cache)
    return fake


def hub_tokenizer(name, tmp_path):
    cfg = TokenizerConfig(name=name)
    return cfg, load_tokenizer(cfg, cache_dir=str(tmp_path / "cache"), train_texts=None)


def test_a_hub_tokenizer_fetches_its_config_and_template_beside_its_tokenizer_json(hub, tmp_path):
    """The optional files are asked for at the commit tokenizer.json came from, and land beside it;
    a repo without them is fine."""
    _, tokenizer = hub_tokenizer("org/jinja-template", tmp_path)
    folder = tmp_path / "hub-cache" / "models--org--jinja-template" / "snapshots" / COMMIT
    assert tokenizer.files_dir == str(folder)
    assert sorted(path.name for path in folder.iterdir()) == ["chat_template.jinja", "tokenizer.json",
                                                                "tokenizer_config.json"]
    assert hub.calls == [("org/jinja-template", "tokenizer.json", None),
                         ("org/jinja-template", "tokenizer_config.json", COMMIT),
                         ("org/jinja-template", "chat_template.jinja", COMMIT),
                         ("org/jinja-template", "special_tokens_map.json", COMMIT)]
    _, bare = hub_tokenizer("org/no-template", tmp_path)
    assert sorted(path.name for path in Path(bare.files_dir).iterdir()) == ["tokenizer.json"]
    assert bare.eos_token_id == bare.backend.token_to_id("</s>")  # no config: the first known EOS name
    # the next load asks for tokenizer.json only: the cache remembers the commit lacks the others
    hub.calls.clear()
    hub_tokenizer("org/no-template", tmp_path)
    assert hub.calls == [("org/no-template", "tokenizer.json", None)]


@pytest.mark.parametrize("name", sorted(EXPECTED["renders"]))
def test_a_hub_tokenizers_chat_template_renders_as_transformers_renders_it(hub, tmp_path, name):
    cfg, tokenizer = hub_tokenizer(name, tmp_path)
    template = chat_template(cfg, tokenizer)
    assert template.origin.startswith(tokenizer.files_dir)
    renders = {(n, add): text for n, add, text in EXPECTED["renders"][name]}
    for (n, add), text in renders.items():
        assert template.render(MESSAGES[:n], add_generation_prompt=add) == text, (n, add)
    # Foundry's turns: the prompt up to each assistant message with the generation prompt, the response after it
    assert chat_turns(MESSAGES, template, "w") == [
        (renders[(2, True)], renders[(3, False)][len(renders[(2, True)]):]),
        (renders[(4, True)][len(renders[(3, False)]):], renders[(5, False)][len(renders[(4, True)]):])]


def test_chat_rows_from_a_hub_tokenizer_use_its_template_and_eos_without_the_chatml_notice(hub, tmp_path, capsys):
    """The EOS that ends the last response is the one tokenizer_config.json declares ("<|end|>", not
    "</s>", which the vocabulary also has); only a repo with no template gets ChatML and the notice."""
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [dict(role=r, content=c) for r, c in MESSAGES]}) + "\n")

    def first_row(name):
        cfg = load_config_dict({
            "max_seq_len": 256, "global_train_batch_size": 1, "device_train_microbatch_size": 1,
            "model": {"d_model": 32, "n_heads": 4, "n_layers": 1, "vocab_size": 128, "max_seq_len": 256},
            "tokenizer": {"name": name},
            "train_loader": {"dataset": {"source": "finetune_jsonl", "local": str(data), "shuffle": False}}})
        train, _, _ = build_loaders(cfg, cache_dir=str(tmp_path / "cache"))
        return train.rows[0], train.labels[0]

    _, tokenizer = hub_tokenizer("org/jinja-template", tmp_path)
    eos = tokenizer.backend.token_to_id("<|end|>")
    assert tokenizer.eos_token_id == eos and tokenizer.pad_token_id == eos
    renders = {(n, add): text for n, add, text in EXPECTED["renders"]["org/jinja-template"]}
    full, prompt = renders[(5, False)], renders[(4, True)]
    capsys.readouterr()
    rows, labels = first_row("org/jinja-template")
    expected = tokenizer.encode(full) + [eos]
    np.testing.assert_array_equal(rows[: len(expected)], expected)
    np.testing.assert_array_equal(labels[: len(expected)], [X] * len(tokenizer.encode(prompt))
                                  + tokenizer.encode(full[len(prompt):]) + [eos])
    assert "ChatML" not in capsys.readouterr().err
    first_row("org/no-template")
    assert "chat examples use the default ChatML template" in capsys.readouterr().err
    bare = hub_tokenizer("org/no-template", tmp_path)[1]
    assert chat_template(TokenizerConfig(name="org/no-template"), bare).origin == ChatTemplate.default().origin


def test_a_failed_download_of_an_optional_file_is_one_line_and_quick(tmp_path, hub):
    """A connection that fails after tokenizer.json (no cached copy) is an error, not a silent fallback to
    ChatML; a missing file is not."""
    hub.unreachable.add("chat_template.jinja")
    start = time.monotonic()
    with pytest.raises(ConfigError) as error:
        hub_tokenizer("org/config-template", tmp_path)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        "tokenizer.name='org/config-template': could not fetch chat_template.jinja from the Hub (An error happened")
    assert message.endswith("set tokenizer.name to the local path of their folder")


def test_a_local_folder_reads_the_same_files(tmp_path):
    """The files a Hub repo serves, saved in a folder, give the same tokenizer and template."""
    folder = tmp_path / "tok"
    shutil.copytree(FIXTURES / "repos" / "config-template", folder)
    shutil.copy(FIXTURES / "tokenizer.json", folder)
    cfg = TokenizerConfig(name=str(folder))
    tokenizer = load_tokenizer(cfg, cache_dir=str(tmp_path), train_texts=None)
    assert tokenizer.eos_token_id == tokenizer.backend.token_to_id("</s>")
    rendered = chat_template(cfg, tokenizer).render(MESSAGES, add_generation_prompt=False)
    assert rendered == EXPECTED["renders"]["org/config-template"][-2][2]
    # a template given as tokenizer.kwargs.chat_template sees the same special tokens
    given = TokenizerConfig(name=str(folder), kwargs={"chat_template": SPECIAL_TOKENS_TEMPLATE})
    assert chat_template(given, tokenizer).render(MESSAGES[:2]) == "<s></s>" + CONTENTS


def test_special_tokens_of_tokenizer_config_json_that_are_wrong_are_one_line(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(FIXTURES / "tokenizer.json", folder)
    cfg = TokenizerConfig(name=str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(ConfigError, match=r"tokenizer_config.json: eos_token='<\|im_end\|>' is not in the vocabulary "
                                          r"of its tokenizer.json; set tokenizer.kwargs.eos_token to a token that is$"):
        load_tokenizer(cfg, cache_dir=str(tmp_path), train_texts=None)
    given = TokenizerConfig(name=str(folder), kwargs={"eos_token": "<|end|>"})  # the key wins over the file
    loaded = load_tokenizer(given, cache_dir=str(tmp_path), train_texts=None)
    assert loaded.eos_token_id == loaded.backend.token_to_id("<|end|>")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"tokenizer_config.json is not readable JSON \(.*\): fix or remove it$"):
        load_tokenizer(cfg, cache_dir=str(tmp_path), train_texts=None)


def test_special_tokens_map_json_overrides_the_config_as_transformers_reads_it(tmp_path):
    """A special_tokens_map.json beside the tokenizer names the special tokens over what
    tokenizer_config.json says, as transformers' AutoTokenizer reads them (checked live)."""
    import subprocess

    from conftest import REFERENCE_PYTHON

    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(FIXTURES / "tokenizer.json", folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "eos_token": "</s>", "bos_token": "<s>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|end|>", "pad_token": {"content": "<|tool|>", "lstrip": False, "special": True}}))
    cfg = TokenizerConfig(name=str(folder))
    tokenizer = load_tokenizer(cfg, cache_dir=str(tmp_path), train_texts=None)
    ours = {"eos": tokenizer.backend.id_to_token(tokenizer.eos_token_id),
            "pad": tokenizer.backend.id_to_token(tokenizer.pad_token_id)}
    assert ours == {"eos": "<|end|>", "pad": "<|tool|>"}
    assert chat_template(TokenizerConfig(name=str(folder), kwargs={"chat_template": SPECIAL_TOKENS_TEMPLATE}),
                         tokenizer).render(MESSAGES[:2]) == "<s><|end|>" + CONTENTS
    if Path(REFERENCE_PYTHON).exists():
        script = ("import json, sys; from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(sys.argv[1]); "
                  "print(json.dumps({'eos': t.eos_token, 'pad': t.pad_token}))")
        run = subprocess.run([REFERENCE_PYTHON, "-c", script, str(folder)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert json.loads(run.stdout.strip().splitlines()[-1]) == ours
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(ConfigError, match=r"special_tokens_map.json: eos_token='<\|im_end\|>' is not in the vocabulary"):
        load_tokenizer(cfg, cache_dir=str(tmp_path), train_texts=None)


def test_a_saved_tokenizer_keeps_its_special_tokens_and_chat_template(hub, tmp_path):
    """What training saves beside its checkpoints (and export copies) reads back with the EOS,
    padding and chat template it trained with, in jaxtrain and in transformers."""
    from jaxtrain.data.tokenizer import tokenizer_from_file

    cfg = TokenizerConfig(name="org/jinja-template", kwargs={"eos_token": "<s>"})  # an override wins over the repo's
    tokenizer = load_tokenizer(cfg, cache_dir=str(tmp_path / "cache"), train_texts=None)
    written = tokenizer.save(str(tmp_path / "checkpoints" / "tokenizer.json"))
    assert sorted(Path(path).name for path in written) == ["chat_template.jinja", "tokenizer.json",
                                                           "tokenizer_config.json"]
    again = tokenizer_from_file(written[0], what="the checkpoint's tokenizer")
    assert (again.eos_token_id, again.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert tokenizer.backend.id_to_token(again.eos_token_id) == "<s>"
    source = chat_template(cfg, tokenizer)
    saved = chat_template(TokenizerConfig(name=written[0]), again)
    turns = [(role, content) for role, content in MESSAGES]
    assert chat_turns(turns, saved, "t") == chat_turns(turns, source, "t")
    from conftest import REFERENCE_PYTHON

    if not Path(REFERENCE_PYTHON).is_file():
        pytest.skip("the transformers half needs .venv-ref; jaxtrain's half passed")
    import subprocess

    probe = ("import sys, transformers; t = transformers.AutoTokenizer.from_pretrained(sys.argv[1]); "
             "print(t.eos_token, t.pad_token, t.chat_template is not None)")
    shown = subprocess.run([REFERENCE_PYTHON, "-c", probe, str(tmp_path / "checkpoints")], capture_output=True,
                           text=True, timeout=120, check=True).stdout.split()
    assert shown == ["<s>", tokenizer.backend.id_to_token(tokenizer.pad_token_id), "True"]
