"""Evaluation against a model whose answers are known by construction.

The model's blocks are silenced (zero attention and MLP output projections), so its logits depend
only on the current token; its embedding and output head are set so that token i always predicts
token i + 1 (mod 16) by a wide margin. A character tokenizer maps "a".."m" to 0..12, " " to 13,
"\\n" to 14 and EOS to 15, so "abc" predicts "d", "m" predicts " ", and " " predicts "\\n".
"""

import json
import math
import random
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx

from jaxtrain.config import ConfigError
from jaxtrain.config.schema import AttnConfig, ModelConfig
from jaxtrain.data.tokenizer import Tokenizer
from jaxtrain.eval import ICLTask, evaluate_task, gauntlet_scores, load_tasks, normalize_answer, perplexity
from jaxtrain.eval.cli import main as eval_main
from jaxtrain.eval.icl import TaskResult, read_examples
from jaxtrain.eval.perplexity import text_batches
from jaxtrain.models import build_model
from test_icl_prompts import text_tokenizer

VOCAB, D_MODEL = 16, 32
CHARS = "abcdefghijklm \n"


def char_tokenizer() -> Tokenizer:
    vocab = {ch: i for i, ch in enumerate(CHARS)} | {"<|endoftext|>": 15}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(["<|endoftext|>"])
    backend.decoder = tokenizers.decoders.Fuse()
    return Tokenizer(backend)


def model_cfg(**model) -> ModelConfig:
    base = dict(d_model=D_MODEL, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=64, no_bias=True)
    base.update(model)
    return ModelConfig(attn_config=AttnConfig(alibi=True), **base)


def _set_params(model, rule):
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)

    def visit(tree, path):
        for key, value in tree.items():
            if isinstance(value, dict):
                visit(value, path + (str(key),))
            else:
                tree[key] = rule(path + (str(key),), np.asarray(value))

    visit(pure, ())
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def successor(shift: int = 1):
    """Token i -> argmax i + shift (mod VOCAB), margin ~50 nats."""
    embedding = np.eye(VOCAB, D_MODEL, dtype=np.float32) - 1.0 / D_MODEL  # zero-mean rows: LayerNorm only scales them
    head = 10.0 * np.roll(embedding, shift, axis=0).T  # column j is row j - shift

    def rule(path, value):
        if "out_proj" in path or "down_proj" in path:
            return np.zeros_like(value)
        if path[:1] == ("wte",):
            return embedding
        if path[:1] == ("lm_head",):
            return head
        return value

    return _set_params(build_model(model_cfg(tie_word_embeddings=False), rngs=nnx.Rngs(0)), rule)


@pytest.fixture(scope="module")
def successor_model():
    return successor()


@pytest.fixture(scope="module")
def skip_two_model():
    return successor(shift=2)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_tokenizer_and_model_follow_the_construction(successor_model, tokenizer):
    assert tokenizer.encode("abc m\n") == [0, 1, 2, 13, 12, 14] and tokenizer.eos_token_id == 15
    logits = np.asarray(successor_model(jnp.arange(VOCAB)[None]))
    assert (logits[0].argmax(-1) == (np.arange(VOCAB) + 1) % VOCAB).all()


def test_language_modeling_accuracy(tmp_path, successor_model, tokenizer):
    rows = [{"context": "abc", "continuation": "def"}, {"context": "fg", "continuation": "hi"},
            {"context": "ab", "continuation": "cc"}]  # the last breaks the chain at its second token
    task = ICLTask("lm", write_jsonl(tmp_path / "lm.jsonl", rows), "language_modeling", continuation_delimiter="")
    for shots in (0, 2):
        result = evaluate_task(successor_model, tokenizer, task, shots, batch_size=2)
        assert result.accuracy == pytest.approx(2 / 3) and result.num_examples == 3


def test_fields_are_stripped_and_the_delimiter_space_leaves_the_context(tmp_path, successor_model, tokenizer):
    """Foundry strips each string field and the context's trailing whitespace; this character
    tokenizer spells " a" as two tokens, so the continuation gets no space: "abc" then "d" (right),
    "fg" then "hi" (right), "kl" then "m" (right), "ab" then "d" (wrong)."""
    rows = [{"context": "abc", "continuation": "d"}, {"context": "fg ", "continuation": " hi"},
            {"context": "\nkl", "continuation": "m\n"}, {"context": "ab", "continuation": "d"}]
    task = ICLTask("lm", write_jsonl(tmp_path / "lm.jsonl", rows), "language_modeling")  # delimiter " "
    assert evaluate_task(successor_model, tokenizer, task, 0).accuracy == 0.75


def test_multiple_choice_accuracy(tmp_path, successor_model, tokenizer):
    rows = [{"query": "ab", "choices": ["c", "d", "e"], "gold": 0},
            {"query": "de", "choices": ["g", "fghij"], "gold": 1},
            {"query": "hi", "choices": ["j", "k"], "gold": 1}]  # gold deliberately wrong
    task = ICLTask("mc", write_jsonl(tmp_path / "mc.jsonl", rows), "multiple_choice", continuation_delimiter="")
    result = evaluate_task(successor_model, tokenizer, task, 1, batch_size=4)
    assert result.accuracy == pytest.approx(2 / 3)


def test_new_parameters_of_the_same_model_reuse_the_compiled_scorer(tmp_path, successor_model, skip_two_model,
                                                                    tokenizer):
    """During training the ICL tasks are scored after every evaluation, each time with new
    parameters: a model of the same structure compiles nothing again, and its own parameters
    decide its answers."""
    from jaxtrain.eval.perplexity import _span_scores

    rows = [{"query": "ab", "choices": ["c", "d"], "gold": 0}, {"query": "de", "choices": ["f", "g"], "gold": 0}]
    task = ICLTask("mc", write_jsonl(tmp_path / "mc.jsonl", rows), "multiple_choice", continuation_delimiter="")
    assert evaluate_task(successor_model, tokenizer, task, 0, batch_size=2).accuracy == 1.0
    compiled = _span_scores._cache_size()
    assert evaluate_task(skip_two_model, tokenizer, task, 0, batch_size=2).accuracy == 0.0  # "ab" -> "d"
    assert _span_scores._cache_size() == compiled


def test_a_subset_scores_the_first_examples_with_the_full_runs_demonstrations(tmp_path, successor_model, tokenizer):
    rows = [{"query": "ab", "choices": ["c", "d", "e"], "gold": 0},
            {"query": "de", "choices": ["g", "fghij"], "gold": 1},
            {"query": "hi", "choices": ["j", "k"], "gold": 1}]  # gold deliberately wrong
    task = ICLTask("mc", write_jsonl(tmp_path / "mc.jsonl", rows), "multiple_choice", continuation_delimiter="")
    subset = evaluate_task(successor_model, tokenizer, task, 1, batch_size=4, max_examples=2)
    assert (subset.accuracy, subset.num_examples) == (1.0, 2)
    assert evaluate_task(successor_model, tokenizer, task, 1, batch_size=4, max_examples=10).num_examples == 3


def test_training_callback_takes_inline_tasks_and_checks_the_subset(tmp_path, monkeypatch):
    from jaxtrain.eval.gauntlet import ICLEvalCallback

    write_jsonl(tmp_path / "mc.jsonl", [{"query": "ab", "choices": ["c", "d"], "gold": 0}])
    monkeypatch.chdir(tmp_path)  # an inline task's dataset_uri is relative to the working folder, as in Foundry
    callback = ICLEvalCallback([{"label": "mc", "dataset_uri": "mc.jsonl", "icl_task_type": "multiple_choice",
                                 "num_fewshot": 1}], subset_num_batches=2)
    assert [(task.label, task.num_fewshot, task.dataset_uri) for task in callback.tasks] == [("mc", [1], "mc.jsonl")]
    with pytest.raises(ConfigError, match="icl_tasks: unknown icl_tasks key 'few_shot'"):
        ICLEvalCallback([{"label": "mc", "dataset_uri": "mc.jsonl", "icl_task_type": "multiple_choice", "few_shot": 1}])
    with pytest.raises(ConfigError, match="icl_subset_num_batches: 0 must be at least 1"):
        ICLEvalCallback(str(write_tasks(tmp_path)), subset_num_batches=0)
    with pytest.raises(ConfigError, match="icl_tasks: give a tasks YAML path or a non-empty list"):
        ICLEvalCallback([])


def test_training_callback_reads_every_task_file_and_checks_the_gauntlet_before_training(tmp_path):
    from jaxtrain.eval.gauntlet import ICLEvalCallback

    write_jsonl(tmp_path / "mc.jsonl", [{"query": "ab", "choices": ["c", "d"], "gold": 0}])
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("icl_tasks:\n- label: mc\n  dataset_uri: mc.jsonl\n  icl_task_type: multiple_choice\n"
                     "- label: gone\n  dataset_uri: nope.jsonl\n  icl_task_type: multiple_choice\n")
    with pytest.raises(ConfigError, match=r"^icl_tasks: task 'gone': nope\.jsonl: cannot read the task file \(No such file"):
        ICLEvalCallback(str(tasks))
    write_jsonl(tmp_path / "bad.jsonl", [{"query": "ab", "choices": ["c", "d"], "gold": 2}])
    with pytest.raises(ConfigError, match=r"task 'bad': .*bad\.jsonl:1 field 'gold'=2 is not an index"):
        ICLEvalCallback([{"label": "bad", "dataset_uri": str(tmp_path / "bad.jsonl"), "icl_task_type": "multiple_choice"}])
    gauntlet = {"categories": [{"name": "reading", "benchmarks": [{"name": "mc", "num_fewshot": 5, "random_baseline": 0.5}]}]}
    with pytest.raises(ConfigError, match=r"gauntlet benchmark mc \(5-shot\) was not evaluated"):
        ICLEvalCallback([{"label": "mc", "dataset_uri": str(tmp_path / "mc.jsonl"), "icl_task_type": "multiple_choice"}],
                        gauntlet=gauntlet)
    with pytest.raises(ConfigError, match=r"^icl_tasks: .*missing\.yaml: cannot read it"):
        ICLEvalCallback(str(tmp_path / "missing.yaml"))


def write_tasks(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("icl_tasks:\n- label: mc\n  dataset_uri: mc.jsonl\n  icl_task_type: multiple_choice\n")
    return path


def test_schema_accuracy(tmp_path, successor_model, tokenizer):
    rows = [{"context_options": ["al", "ab"], "continuation": "c", "gold": 1},
            {"context_options": ["ef", "eg"], "continuation": "h", "gold": 0}]  # "eg" predicts h: gold is wrong
    task = ICLTask("schema", write_jsonl(tmp_path / "s.jsonl", rows), "schema", continuation_delimiter="")
    assert evaluate_task(successor_model, tokenizer, task, 0).accuracy == 0.5


def test_generation_exact_match(tmp_path, successor_model, tokenizer):
    rows = [{"context": "abc", "answer": "def", "aliases": []},
            {"context": "ab", "answer": "kkk", "aliases": ["c d e"]},  # spaces are kept: "c d e" is not "cde"
            {"context": "ab", "answer": "kkk", "aliases": ["cde"]},
            {"context": "fg", "answer": "hj", "aliases": []}]
    task = ICLTask("gen", write_jsonl(tmp_path / "g.jsonl", rows), "generation_task_with_answers",
                   continuation_delimiter="")
    # greedy output: as many tokens as the longest answer ("c d e"), "defgh" from "abc"
    assert evaluate_task(successor_model, tokenizer, task, 0, batch_size=4).accuracy == 0.5


def test_generation_compiles_one_decode_program_per_length_bucket(tmp_path, successor_model, tokenizer):
    """Prompts of different lengths and a short last batch share one compiled program (padded to
    a length bucket, the batch filled up), and the answers are those of unpadded generation."""
    from jaxtrain.inference.generate import _compiled

    rows = [{"context": "a", "answer": "b"}, {"context": "abcd", "answer": "e"}, {"context": "ghi", "answer": "k"},
            {"context": "abcdefg", "answer": "h"}, {"context": "kl", "answer": "m"}]  # "ghi" -> "j", not "k"
    task = ICLTask("gen", write_jsonl(tmp_path / "g.jsonl", rows), "generation_task_with_answers",
                   continuation_delimiter="", early_stopping_criteria=[])
    before = _compiled.cache_info().misses
    assert evaluate_task(successor_model, tokenizer, task, 0, batch_size=2, max_len=48).accuracy == pytest.approx(4 / 5)
    assert _compiled.cache_info().misses - before <= 1  # 3 batches: prompts of 1-4, 3-7 and 2 tokens
    compiled = _compiled.cache_info().misses
    assert evaluate_task(successor_model, tokenizer, task, 1, batch_size=2, max_len=48).num_examples == 5
    assert _compiled.cache_info().misses == compiled  # one-shot prompts (up to 13 tokens) share the bucket


def test_normalize_answer_follows_foundry_rules():
    assert normalize_answer("  The Cat's_hat!  ") == "cat s hat"
    assert normalize_answer("An apple, a day") == "apple day"


def test_generation_has_no_stopping_strings_unless_given(tmp_path, skip_two_model, tokenizer):
    """With shift 2, "i" continues "km\nace...". Foundry generates as many tokens as the longest
    answer (5) and cuts at nothing by default, so "km ac" matches; "\n" cuts it when asked."""
    rows = [{"context": "i", "answer": "km ac"}]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    task = ICLTask("gen", path, "generation_task_with_answers", continuation_delimiter="")
    assert evaluate_task(skip_two_model, tokenizer, task, 0).accuracy == 1.0
    stopped = ICLTask("gen", path, "generation_task_with_answers", continuation_delimiter="",
                      early_stopping_criteria=["\n"])
    assert evaluate_task(skip_two_model, tokenizer, stopped, 0).accuracy == 0.0


def test_generation_is_cut_at_matches_of_the_stopping_criteria_as_a_regular_expression(tmp_path, skip_two_model,
                                                                                         tokenizer):
    """The output "km\nac" holds no "a." but the regular expression a. matches "ac": as in Foundry
    the answer is cut to "km\n", which no longer starts with "km ac"; escaped, it is not cut."""
    path = write_jsonl(tmp_path / "g.jsonl", [{"context": "i", "answer": "km ac"}])
    for stops, accuracy in ((["a."], 0.0), ([r"a\."], 1.0), (["x", "c|m"], 0.0)):
        task = ICLTask("gen", path, "generation_task_with_answers", continuation_delimiter="",
                       early_stopping_criteria=stops)
        assert evaluate_task(skip_two_model, tokenizer, task, 0).accuracy == accuracy, stops


def test_generation_with_a_chain_of_thought(tmp_path, successor_model, tokenizer):
    """The answer is read after the last cot_delimiter: "a" continues "bcdefghijklm \n", so after
    "d" comes "efghijklm" (right for "efg", wrong for "bcd"); with no "d" the whole output counts."""
    from jaxtrain.eval.prompts import answer_budget, preamble

    rows = [{"context": "a", "answer": "efg", "chain_of_thought": "bc"}, {"context": "e", "answer": "fg"},
            {"context": "a", "answer": "bcd"}]
    task = ICLTask("gen", write_jsonl(tmp_path / "g.jsonl", rows), "generation_task_with_answers",
                   continuation_delimiter="", cot_delimiter="d")
    assert evaluate_task(successor_model, tokenizer, task, 0).accuracy == pytest.approx(2 / 3)
    # the longest "chain_of_thought + cot_delimiter + answer" (6 tokens, "bcdefg"), plus 10
    assert answer_budget(tokenizer, rows, "d") == 16
    assert answer_budget(tokenizer, rows[1:], "") == 3  # no chain of thought in the file: the answers alone
    assert answer_budget(text_tokenizer(template="<s> $A"), rows[1:], "") == 4  # special tokens count
    # a demonstration shows its chain of thought
    assert preamble(task, rows[:2], 1, 1, random.Random(1234), has_cot=True) == "abcdefg"


def test_a_subset_counts_foundrys_batches_of_questions(tmp_path, successor_model, tokenizer):
    """A multiple-choice batch of 4 rows holds 4 // 2 = 2 two-choice questions."""
    from jaxtrain.eval.gauntlet import run_icl_suite

    path = write_jsonl(tmp_path / "mc.jsonl", [{"query": "ab", "choices": ["c", "d"], "gold": 0}] * 5)
    suite = run_icl_suite(successor_model, tokenizer, [ICLTask("mc", path, "multiple_choice")], batch_size=4,
                          subset_num_batches=1)
    assert [(r.num_examples, r.dataset_size) for r in suite["tasks"]] == [(2, 5)]


def test_tasks_with_categories_are_scored_per_category(tmp_path, successor_model, tokenizer):
    """has_categories: each category alone; the gauntlet takes the mean of their accuracies
    ((1 + 1/2) / 2 = 3/4, not the pooled 2/3)."""
    from jaxtrain.eval.gauntlet import flat_metrics, run_icl_suite

    rows = [{"query": "ab", "choices": ["c", "d"], "gold": gold, "category": category}
            for gold, category in ((0, "y"), (0, "x"), (1, "y"))]
    task = ICLTask("mc", write_jsonl(tmp_path / "mc.jsonl", rows), "multiple_choice", has_categories=True)
    benchmark = {"name": "mc", "num_fewshot": 0, "random_baseline": 0.5}
    gauntlet = {"categories": [{"name": "one", "benchmarks": [benchmark]}]}
    suite = run_icl_suite(successor_model, tokenizer, [task], gauntlet=gauntlet)
    metrics = flat_metrics(suite)
    assert (metrics["icl/mc/0-shot/x"], metrics["icl/mc/0-shot/y"]) == (1.0, 0.5)
    assert suite["gauntlet"]["benchmarks"]["mc/0-shot"] == pytest.approx(0.5)  # (3/4 - 1/2) / (1/2)
    write_jsonl(tmp_path / "bad.jsonl", rows[:1] + [{"query": "ab", "choices": ["c"], "gold": 0}])
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2 has no field 'category' \(has_categories is set\)"):
        run_icl_suite(successor_model, tokenizer, [ICLTask("b", str(tmp_path / "bad.jsonl"), "multiple_choice",
                                                           has_categories=True)])


def test_each_finished_batch_is_reported(tmp_path, successor_model, tokenizer):
    calls = []
    rows = [{"query": "ab", "choices": ["c", "d"], "gold": 0}] * 5  # 10 rows: 3 batches of 4
    task = ICLTask("mc", write_jsonl(tmp_path / "mc.jsonl", rows), "multiple_choice")
    evaluate_task(successor_model, tokenizer, task, 0, batch_size=4, on_batch=lambda: calls.append("mc"))
    rows = [{"context": "a", "answer": "b"}] * 5  # 5 prompts: 3 batches of 2
    task = ICLTask("gen", write_jsonl(tmp_path / "g.jsonl", rows), "generation_task_with_answers")
    evaluate_task(successor_model, tokenizer, task, 0, batch_size=2, on_batch=lambda: calls.append("gen"))
    assert calls == ["mc"] * 3 + ["gen"] * 3


def test_training_callback_beats_the_watchdog_but_not_while_compiling(tmp_path, successor_model, tokenizer,
                                                                      monkeypatch):
    """After EVAL_END, scoring arms the loop's watchdog with each finished batch, and pauses it
    before a batch whose program compiles first (a length not run before)."""
    import importlib

    from jaxtrain.eval.gauntlet import ICLEvalCallback
    from jaxtrain.train.events import Event
    from jaxtrain.train.health import Watchdog

    class RecordingWatchdog(Watchdog):
        def beat(self, step_seconds=None):
            calls.append("beat")
            super().beat(step_seconds)

        def pause(self):
            calls.append("pause")
            super().pause()

    monkeypatch.setattr(importlib.import_module("jaxtrain.eval.perplexity"), "_scored_shapes", set())
    rows = [{"query": "ab", "choices": ["c", "d"], "gold": 0}, {"query": "de", "choices": ["f", "g"], "gold": 0},
            {"query": "abcdefghijklm abcdefghijk", "choices": ["a", "l"], "gold": 1}]  # rows of 26 tokens: 32
    callback = ICLEvalCallback([ICLTask("mc", write_jsonl(tmp_path / "mc.jsonl", rows), "multiple_choice",
                                        continuation_delimiter="")], batch_size=4)
    calls, written = [], []
    loop = SimpleNamespace(parts=SimpleNamespace(model_def=SimpleNamespace(merge=lambda params: successor_model),
                                                 tokenizer=tokenizer),
                           state=SimpleNamespace(params=None), cfg=SimpleNamespace(icl_seq_len=None, precision="fp32"),
                           watchdog=RecordingWatchdog(timeout=None, factor=20.0, minimum=300.0, stacks_path=""),
                           _write_metrics=written.append, print=lambda message: None)
    callback.run_event(Event.EVAL_END, loop)
    assert calls == ["pause", "beat", "pause", "beat"] and loop.watchdog._armed
    assert written == [{"icl/mc/0-shot": 1.0}]
    calls.clear()
    callback.run_event(Event.EVAL_END, loop)  # compiled now: no pause
    assert calls == ["beat", "beat"]
    del loop.watchdog  # a loop without a watchdog
    callback.run_event(Event.EVAL_END, loop)
    assert written[-1] == {"icl/mc/0-shot": 1.0}


def test_uniform_model_perplexity_is_vocab_size():
    model = build_model(model_cfg(), rngs=nnx.Rngs(0))
    model = _set_params(model, lambda path, v: np.zeros_like(v) if path[:1] == ("wte",) else v)
    batches = text_batches([[1, 2, 3], [4, 5]], seq_len=4, batch_size=2, eos_token_id=15)
    result = perplexity(model, batches)
    # rows [1 2 3 EOS] and [4 5 EOS]: 3 + 2 predicted tokens, each at probability 1/16
    assert result["tokens"] == 5
    assert result["cross_entropy"] == pytest.approx(math.log(VOCAB), rel=1e-5)
    assert result["perplexity"] == pytest.approx(VOCAB, rel=1e-5)


def test_gauntlet_arithmetic(tmp_path):
    spec = {"categories": [
        {"name": "one", "benchmarks": [{"name": "a", "num_fewshot": 0, "random_baseline": 0.25},
                                       {"name": "b", "num_fewshot": 5, "random_baseline": 0.0}]},
        {"name": "two", "benchmarks": [{"name": "c", "num_fewshot": 0, "random_baseline": 0.5}]}]}
    results = [TaskResult("a", "multiple_choice", 0, 0.5, 10), TaskResult("b", "language_modeling", 5, 0.8, 30),
               TaskResult("c", "schema", 0, 0.1, 7), TaskResult("a", "multiple_choice", 5, 0.9, 10)]
    scores = gauntlet_scores(spec, results)
    assert scores["benchmarks"]["a/0-shot"] == pytest.approx(1 / 3)  # (0.5 - 0.25) / 0.75
    assert scores["categories"]["one"] == pytest.approx(17 / 30)  # (1/3 + 0.8) / 2
    assert scores["categories"]["two"] == pytest.approx(-0.8)  # (0.1 - 0.5) / 0.5
    assert scores["average"] == pytest.approx(-7 / 60)
    weighted = gauntlet_scores(dict(spec, weighting="SAMPLE_SZ"), results)
    assert weighted["categories"]["one"] == pytest.approx((10 / 3 + 24) / 40)
    with pytest.raises(ConfigError, match=r"c \(5-shot\) was not evaluated"):
        gauntlet_scores({"categories": [{"name": "x", "benchmarks": [
            {"name": "c", "num_fewshot": 5, "random_baseline": 0}]}]}, results)


def test_results_that_would_be_meaningless_are_refused(tmp_path):
    """A gauntlet category without benchmarks (its score NaN) or named twice, a generation answer
    that is empty (it matches every generation), and two tasks of one label (one metric name)."""
    results = [TaskResult("a", "multiple_choice", 0, 0.5, 10)]
    one = {"name": "a", "num_fewshot": 0, "random_baseline": 0.25}
    with pytest.raises(ConfigError, match=r"gauntlet category 'reasoning' has no benchmarks \(its score would be NaN\)"):
        gauntlet_scores({"categories": [{"name": "x", "benchmarks": [one]}, {"name": "reasoning", "benchmarks": []}]},
                        results)
    with pytest.raises(ConfigError, match=r"gauntlet category 'x' is named twice"):
        gauntlet_scores({"categories": [{"name": "x", "benchmarks": [one]}, {"name": "x", "benchmarks": [one]}]},
                        results)
    rows = [{"context": "Q: a", "answer": "b"}, {"context": "Q: x", "answer": "c", "aliases": [" "]}]
    with pytest.raises(ConfigError, match=r"gen\.jsonl:2: an empty answer \(in 'answer' or 'aliases'\) would count"):
        read_examples(write_jsonl(tmp_path / "gen.jsonl", rows), "generation_task_with_answers")
    write_jsonl(tmp_path / "mc.jsonl", [{"query": "a", "choices": ["b"], "gold": 0}])
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("icl_tasks:\n- label: mc\n  dataset_uri: mc.jsonl\n  icl_task_type: multiple_choice\n"
                     "- label: mc\n  dataset_uri: mc.jsonl\n  icl_task_type: schema\n")
    with pytest.raises(ConfigError, match=r"tasks\.yaml: two tasks are labelled 'mc'; give each task its own label"):
        load_tasks(str(tasks))


def test_missing_fields_name_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [{"query": "a", "choices": ["b"], "gold": 0}, {"query": "a"}])
    with pytest.raises(ConfigError, match=r"mc\.jsonl:2 has no field 'choices'"):
        read_examples(path, "multiple_choice")
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("icl_tasks:\n- label: ok\n  dataset_uri: mc.jsonl\n  icl_task_type: schema\n"
                     "- label: broken\n  icl_task_type: schema\n")
    with pytest.raises(ConfigError, match=r"tasks\.yaml:5: icl_tasks entry is missing the field 'dataset_uri'"):
        load_tasks(str(tasks))
    gauntlet = tmp_path / "gauntlet.yaml"
    gauntlet.write_text("eval_gauntlet:\n  categories:\n  - name: one\n    benchmarks:\n"
                        "    - name: a\n      num_fewshot: 0\n")
    with pytest.raises(ConfigError, match=r"gauntlet\.yaml:5: .*missing the field 'random_baseline'"):
        gauntlet_scores(str(gauntlet), [TaskResult("a", "schema", 0, 1.0, 1)])


def test_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    write_jsonl(tmp_path / "mc.jsonl", [{"query": "ab", "choices": ["c", "d"], "gold": 0}])
    assert eval_main(["--checkpoint", str(tmp_path / "nope"), "--task", str(tmp_path / "mc.jsonl")]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err
    # a task file that is missing is found first, before the slow read of a checkpoint
    assert eval_main(["--checkpoint", str(tmp_path / "nope"), "--task", str(tmp_path / "x.jsonl")]) == 2
    assert str(tmp_path / "x.jsonl") in capsys.readouterr().err


def test_cli_end_to_end(tmp_path, successor_model, tokenizer, capsys):
    from jaxtrain.convert import save_model

    tokenizer.save(str(tmp_path / "tokenizer.json"))
    save_model(str(tmp_path / "ckpt"), model_cfg(tie_word_embeddings=False),
               nnx.to_pure_dict(nnx.state(successor_model, nnx.Param)), tokenizer_path=str(tmp_path / "tokenizer.json"))
    write_jsonl(tmp_path / "mc.jsonl", [{"query": "ab", "choices": ["c", "d"], "gold": 0},
                                        {"query": "ab", "choices": ["c", "d"], "gold": 1}])
    (tmp_path / "tasks.yaml").write_text(
        "icl_tasks:\n- label: mc\n  dataset_uri: mc.jsonl\n  icl_task_type: multiple_choice\n"
        "  num_fewshot: [0]\n  continuation_delimiter: ''\n"
        "eval_gauntlet:\n  categories:\n  - name: reasoning\n    benchmarks:\n"
        "    - {name: mc, num_fewshot: 0, random_baseline: 0.25}\n")
    out = tmp_path / "results.json"
    assert eval_main(["--checkpoint", str(tmp_path / "ckpt"), "--tasks", str(tmp_path / "tasks.yaml"),
                      "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["tasks"][0]["accuracy"] == 0.5 and results["weights"] == "trained"
    assert results["gauntlet"]["average"] == pytest.approx((0.5 - 0.25) / 0.75)
    assert "gauntlet/average" in capsys.readouterr().out


def test_cli_refuses_a_tokenizer_larger_than_the_models_vocabulary(tmp_path, successor_model, tokenizer, capsys):
    from jaxtrain.convert import save_model

    tokenizer.save(str(tmp_path / "tokenizer.json"))
    save_model(str(tmp_path / "ckpt"), model_cfg(tie_word_embeddings=False),
               nnx.to_pure_dict(nnx.state(successor_model, nnx.Param)), tokenizer_path=str(tmp_path / "tokenizer.json"))
    letters = "abcdefghijklmnopqrstuvwxyz \n"  # ids up to 28: beyond the model's 16
    vocab = {ch: i for i, ch in enumerate(letters)} | {"<|endoftext|>": len(letters)}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(["<|endoftext|>"])
    larger = tmp_path / "larger.json"
    Tokenizer(backend).save(str(larger))
    (tmp_path / "code.txt").write_text("xyz zyx wvu\n" * 4)
    write_jsonl(tmp_path / "mc.jsonl", [{"query": "xy", "choices": ["z", "w"], "gold": 0}])
    out = tmp_path / "results.json"
    for data in (["--perplexity-data", str(tmp_path / "code.txt")],
                 ["--task", str(tmp_path / "mc.jsonl"), "--type", "multiple_choice"]):
        assert eval_main(["--checkpoint", str(tmp_path / "ckpt"), *data, "--tokenizer", str(larger),
                          "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
        assert captured.err.startswith(f"error: --tokenizer {larger}: token id 28 is outside the model's "
                                       "vocabulary (0..15")
        assert not out.exists()
    (tmp_path / "text.txt").write_text(CHARS)  # each character predicts the next
    assert eval_main(["--checkpoint", str(tmp_path / "ckpt"), "--perplexity-data", str(tmp_path / "text.txt"),
                      "--out", str(out)]) == 0  # the checkpoint's own tokenizer fits
    assert json.loads(out.read_text())["perplexity"]["perplexity"] < 2


def test_results_json_is_strict_with_null_for_non_finite_numbers(tmp_path):
    from jaxtrain.eval.cli import write_results

    out = tmp_path / "results.json"
    assert write_results({"perplexity": {"perplexity": float("nan"), "cross_entropy": float("inf"), "tokens": 3},
                          "tasks": [{"accuracy": float("-inf")}, {"accuracy": 0.5}]}, str(out)) is None

    def refuse(constant):
        raise AssertionError(f"{constant} in the JSON")

    results = json.loads(out.read_text(), parse_constant=refuse)
    assert results == {"perplexity": {"perplexity": None, "cross_entropy": None, "tokens": 3},
                       "tasks": [{"accuracy": None}, {"accuracy": 0.5}]}


def test_a_malformed_tasks_file_is_one_line_naming_its_line(tmp_path):
    from jaxtrain.eval.icl import load_tasks

    path = tmp_path / "tasks.yaml"
    path.write_text("icl_tasks:\n- label: [mc\n  dataset_uri: mc.jsonl\n")
    with pytest.raises(ConfigError) as error:
        load_tasks(str(path))
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(f"{path}:3: malformed YAML (") and "at line 2" in str(error.value)


def test_icl_tasks_run_at_each_evaluation_of_a_run_without_held_out_data(tmp_path):
    """A training config with ``icl_tasks`` and no ``eval_loader`` (as Foundry fine-tuning configs
    often are) scores the tasks every ``eval_interval`` and at the end, once a step."""
    import contextlib
    import io

    from jaxtrain.train.command import _callbacks
    from jaxtrain.train.loop import Trainer
    from jaxtrain.train.setup import build_run
    from test_token_accounting import finetune_config

    write_jsonl(tmp_path / "mc.jsonl", [{"query": "ab", "choices": ["c", "d"], "gold": 0}])
    (tmp_path / "tasks.yaml").write_text("icl_tasks:\n- label: mc\n  dataset_uri: mc.jsonl\n"
                                         "  icl_task_type: multiple_choice\n  num_fewshot: [0]\n")
    cfg = finetune_config(tmp_path, eval_interval="2ba", icl_tasks=str(tmp_path / "tasks.yaml"))
    assert cfg.eval_loader is None
    with contextlib.redirect_stdout(io.StringIO()):
        parts = build_run(cfg)
        try:
            Trainer(parts, callbacks=_callbacks(cfg)).fit()
        finally:
            parts.train_loader.close()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "icl/mc/0-shot" in record] == [2, 4]


def test_task_files_with_a_byte_order_mark_read_and_bad_lines_name_their_column(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"query": "a", "choices": ["b"], "gold": 0}).encode() + b"\n")
    assert read_examples(str(path), "multiple_choice") == [{"query": "a", "choices": ["b"], "gold": 0}]
    path.write_text('{"query": "x", \n')
    with pytest.raises(ConfigError, match=r"mc\.jsonl:1 is not valid JSON \(.* at column 16\)"):
        read_examples(str(path), "multiple_choice")


def test_foundry_s_old_name_of_the_generation_task_type_points_to_the_new_one(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"context": "Q: a", "answer": "b"}])
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("icl_tasks:\n- label: qa\n  dataset_uri: qa.jsonl\n  icl_task_type: question_answering\n")
    with pytest.raises(ConfigError, match=r"LLM Foundry renamed it generation_task_with_answers: use that"):
        load_tasks(str(tasks))
