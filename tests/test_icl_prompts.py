"""In-context-learning tasks as LLM Foundry builds and scores them: few-shot draws, prompt text
and tokenization, the gauntlet's arithmetic, and one-line errors for bad task files and entries.
Expected values are worked out from Foundry's definitions (its few-shot indices from its own
``get_fewshot_sample_idxs``)."""

import math
import random
import re
import string
from types import SimpleNamespace

import pytest
import tokenizers

from jaxtrain.config import ConfigError
from jaxtrain.data.tokenizer import Tokenizer
from jaxtrain.eval import ICLTask, evaluate_task, gauntlet_scores
from jaxtrain.eval.icl import TaskResult, read_examples
from jaxtrain.eval.perplexity import SpanScore

def text_tokenizer(*, prefix_space: bool = False, template: str | None = None) -> Tokenizer:
    """Printable ASCII one character a token; with ``prefix_space`` " x" is one token for each letter
    x (as in GPT-2's BPE); ``template`` adds special tokens to whole inputs (e.g. "<s> $A")."""
    vocab = {ch: i for i, ch in enumerate([chr(c) for c in range(32, 127)] + ["\n"])}
    merges = [(" ", ch) for ch in string.ascii_letters] if prefix_space else []
    vocab.update({first + second: len(vocab) + i for i, (first, second) in enumerate(merges)})
    vocab.update({"<|endoftext|>": len(vocab), "<s>": len(vocab) + 1})
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    backend.add_special_tokens(["<|endoftext|>", "<s>"])
    backend.decoder = tokenizers.decoders.Fuse()
    if template:
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single=template, special_tokens=[("<s>", vocab["<s>"]), ("<|endoftext|>", vocab["<|endoftext|>"])])
    return Tokenizer(backend)


class RecordingScorer:
    """Stands in for SpanScorer: keeps the requests, scores every span as right."""

    def __init__(self):
        self.requests = []

    def score(self, requests, **hooks):
        self.requests += list(requests)
        return [SpanScore(0.0, 1, True) for _ in requests]


def scored_text(task, rows, shots, tok):
    """(context, continuation) text of each request evaluate_task builds for ``rows``."""
    scorer = RecordingScorer()
    evaluate_task(SimpleNamespace(max_seq_len=512), tok, task, shots, examples=rows, scorer=scorer)
    return [(tok.decode(tokens[:start]), tok.decode(tokens[start:])) for tokens, start in scorer.requests]


def test_fewshot_examples_are_drawn_as_foundry_draws_them():
    """Foundry samples once and swaps the example itself for one more draw, and writes the
    demonstrations in the order of the set holding them (expected values from Foundry's own
    get_fewshot_sample_idxs, seed 1234)."""
    from jaxtrain.eval.icl import fewshot_indices

    rng = random.Random(1234)
    assert [list(fewshot_indices(5, 2, i, rng)) for i in range(5)] == [[3, 4], [0, 4], [0, 1], [0, 4], [0, 2]]
    rng = random.Random(1234)
    assert [list(fewshot_indices(10, 2, i, rng)) for i in range(10)] == [
        [1, 7], [0, 9], [0, 1], [1, 5], [0, 3], [0, 9], [5, 7], [9, 2], [1, 2], [0, 1]]
    rows = [{"context": f"c{i}", "continuation": f"a{i}"} for i in range(10)]
    task = ICLTask("lm", "lm.jsonl", "language_modeling")
    assert scored_text(task, rows, 2, text_tokenizer())[7] == ("c9 a9\nc2 a2\nc7", "a7")


def test_language_modeling_prompt_is_foundrys():
    """prompt_string, prelimiter (or its older name question_prelimiter), stripped fields, the
    delimiter's trailing whitespace off the context, and one space before the continuation for a
    tokenizer that spells " x" as one token."""
    from jaxtrain.eval.icl import task_from_dict

    rows = [{"context": " The cat ", "continuation": "sat "}, {"context": "A dog", "continuation": "ran"}]
    task = task_from_dict({"label": "lm", "dataset_uri": "lm.jsonl", "icl_task_type": "language_modeling",
                           "prompt_string": "Q", "example_delimiter": "\n\n", "continuation_delimiter": "\nA:\n",
                           "question_prelimiter": "Say: "})
    assert scored_text(task, rows, 1, text_tokenizer(prefix_space=True)) == [
        ("Q\n\nSay: A dog\nA:\nran\n\nSay: The cat\nA:", " sat"),
        ("Q\n\nSay: The cat\nA:\nsat\n\nSay: A dog\nA:", " ran")]
    assert scored_text(task, rows, 0, text_tokenizer())[0] == ("Q\n\nSay: The cat\nA:", "sat")


def test_multiple_choice_and_schema_prompts_are_foundrys():
    mc = ICLTask("mc", "mc.jsonl", "multiple_choice", continuation_delimiter="\nAnswer: ")
    row = [{"query": " Q? ", "choices": [" yes", "no ", "maybe"], "gold": 0}]  # choices are kept as written
    assert scored_text(mc, row, 0, text_tokenizer(prefix_space=True)) == [
        ("Q?\nAnswer:", " yes"), ("Q?\nAnswer:", " no "), ("Q?\nAnswer:", " maybe")]
    assert [cont for _, cont in scored_text(mc, row, 0, text_tokenizer())] == [" yes", "no ", "maybe"]
    # schema: with no preamble an option stands alone; after one, the delimiter (less its trailing
    # whitespace) follows it
    schema = ICLTask("s", "s.jsonl", "schema", continuation_delimiter=": ")
    rows = [{"context_options": ["The cat", "A dog"], "continuation": "ran", "gold": 1},
            {"context_options": ["Big", "Small"], "continuation": " won ", "gold": 0}]
    tok = text_tokenizer(prefix_space=True)
    assert scored_text(schema, rows, 0, tok) == [("The cat", " ran"), ("A dog", " ran"), ("Big", " won"),
                                                  ("Small", " won")]
    assert scored_text(schema, rows, 1, tok) == [
        ("Big: won\nThe cat:", " ran"), ("Big: won\nA dog:", " ran"),
        ("A dog: ran\nBig:", " won"), ("A dog: ran\nSmall:", " won")]


def test_preamble_is_tokenized_on_its_own_with_special_tokens():
    """The preamble gets the tokenizer's special tokens (a BOS; a final EOS dropped) and is not
    merged with the context's first characters; context and continuation get none."""
    task = ICLTask("lm", "lm.jsonl", "language_modeling", prompt_string="Q: ", example_delimiter="")
    rows = [{"context": "The cat", "continuation": "sat"}]
    for template, added in (("<s> $A", "<s>"), ("$A <|endoftext|>", None), (None, None)):
        tok = text_tokenizer(prefix_space=True, template=template)
        scorer = RecordingScorer()
        evaluate_task(SimpleNamespace(max_seq_len=512), tok, task, 0, examples=rows, scorer=scorer)
        head = ([tok.backend.token_to_id(added)] if added else []) + tok.encode("Q: ")
        context = head + tok.encode("The cat")
        assert scorer.requests == [(context + tok.encode(" sat"), len(context))]
    assert tok.encode("Q: The cat") != tok.encode("Q: ") + tok.encode("The cat")  # one string merges " T"


def test_a_long_context_loses_tokens_from_its_left():
    task = ICLTask("lm", "lm.jsonl", "language_modeling", continuation_delimiter="")
    tok = text_tokenizer()
    scorer = RecordingScorer()
    evaluate_task(SimpleNamespace(max_seq_len=8), tok, task, 0, scorer=scorer,
                  examples=[{"context": "abcdefghij", "continuation": "xyz"}])
    assert scorer.requests == [(tok.encode("fghijxyz"), 5)]


def test_gauntlet_weightings_averages_and_baselines():
    spec = {"categories": [
        {"name": "one", "benchmarks": [{"name": "a", "num_fewshot": 0, "random_baseline": 0.25},
                                       {"name": "b", "num_fewshot": 5, "random_baseline": 0.0}]},
        {"name": "two", "benchmarks": [{"name": "c", "num_fewshot": 0, "random_baseline": 0.5}]}]}
    # "a" scored 10 of its 40 examples: weights count the file's examples, as Foundry's benchmark sizes do
    results = [TaskResult("a", "multiple_choice", 0, 0.5, 10, dataset_size=40),
               TaskResult("b", "language_modeling", 5, 0.8, 30), TaskResult("c", "schema", 0, 0.1, 1)]
    sample = gauntlet_scores(dict(spec, weighting="SAMPLE_SZ"), results)
    assert sample["categories"]["one"] == pytest.approx((40 / 3 + 0.8 * 30) / 70)
    log = gauntlet_scores(dict(spec, weighting="LOG_SAMPLE_SZ"), results)
    assert log["categories"]["one"] == pytest.approx((math.log2(40) / 3 + 0.8 * math.log2(30))
                                                     / (math.log2(40) + math.log2(30)))
    assert log["categories"]["two"] == pytest.approx(-0.8)  # one example: weight max(log2(1), 1)
    named = gauntlet_scores(dict(spec, averages={"core": ["two"]}), results)
    assert named["averages"] == {"core": pytest.approx(-0.8)} and named["average"] == pytest.approx((17 / 30 - 0.8) / 2)
    raw = gauntlet_scores(dict(spec, subtract_random_baseline=False, rescale_accuracy=False), results)
    assert raw["categories"] == {"one": pytest.approx(0.65), "two": pytest.approx(0.1)}
    for bad, message in (({"subtract_random_baseline": False}, "rescale_accuracy .* needs subtract_random_baseline"),
                         ({"averages": {"one": ["two"]}}, "average 'one' has a category's name"),
                         ({"averages": {"core": ["three"]}}, r"average 'core' lists \['three'\]")):
        with pytest.raises(ConfigError, match=message):
            gauntlet_scores(dict(spec, **bad), results)


@pytest.mark.parametrize("field, value, message", [
    ("random_baseline", [1], r"benchmark a: random_baseline=\[1\] must be a number in \[0, 1\)"),
    ("random_baseline", None, r"benchmark a: random_baseline=None must be a number in \[0, 1\)"),
    ("random_baseline", "abc", r"benchmark a: random_baseline='abc' must be a number"),
    ("random_baseline", 1.0, r"benchmark a: random_baseline=1.0 must be a number in \[0, 1\)"),
    ("num_fewshot", [0], r"benchmark a: num_fewshot=\[0\] must be one whole number >= 0"),
    ("num_fewshot", 0.7, r"benchmark a: num_fewshot=0.7 must be one whole number"),
    ("num_fewshot", "abc", r"benchmark a: num_fewshot='abc' must be one whole number"),
    ("name", 5, r"gauntlet benchmark name=5: give the label of an ICL task"),
])
def test_a_gauntlet_benchmark_field_of_the_wrong_type_is_one_line_naming_file_and_line(tmp_path, field, value,
                                                                                        message):
    import yaml

    benchmark = {"name": "a", "num_fewshot": 0, "random_baseline": 0.25, field: value}
    path = tmp_path / "gauntlet.yaml"
    path.write_text(yaml.safe_dump({"eval_gauntlet": {"categories": [{"name": "one", "benchmarks": [benchmark]}]}}))
    with pytest.raises(ConfigError) as error:
        gauntlet_scores(str(path), [TaskResult("a", "multiple_choice", 0, 0.5, 10)])
    assert str(error.value).startswith(f"{path}:") and "\n" not in str(error.value)
    assert re.search(message, str(error.value)), str(error.value)


def test_a_tasks_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    from jaxtrain.eval.icl import load_tasks

    path = tmp_path / "tasks.yaml"
    path.write_bytes(b"\xff\xfe icl")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 0\): save it as UTF-8"):
        load_tasks(str(path))


@pytest.mark.parametrize("kind, lines, message", [
    ("multiple_choice", ['{"query": "a", "choices": ["b"], "gold": 0}', '{"query": "a", '],
     r":2 is not valid JSON \(.*\); each line must be one JSON object"),
    ("multiple_choice", ['["a", "b"]'], r":1: a line must be one JSON object with query, choices, gold"),
    ("multiple_choice", ['{"query": "a", "choices": ["b"]}'], r":1 has no field 'gold' \(multiple_choice needs"),
    ("multiple_choice", ['{"query": "a", "choices": ["b", "c"], "gold": 2}'],
     r":1 field 'gold'=2 is not an index into its 2 choices \(0 to 1; gold counts from 0\)"),
    ("schema", ['{"context_options": ["b", "c"], "continuation": "d", "gold": true}'], r":1 field 'gold'=true"),
    ("multiple_choice", ['{"query": "a", "choices": "bc", "gold": 1}'],
     r":1: field 'choices' must be a non-empty list of strings"),
    ("language_modeling", ['{"context": 5, "continuation": "b"}'], r":1: field 'context' must be a string, got 5"),
    ("generation_task_with_answers", ['{"context": "a", "answer": "b", "aliases": "c"}'],
     r":1: field 'aliases' must be a list of strings"),
    ("schema", ["", "  "], r": the task file has no examples; write one JSON object per line with context_options"),
    ("multiple_choice", ['{"query": "a", "choices": ["b", ""], "gold": 0}'],
     r":1: an empty text in field 'choices' is scored as nothing"),
    ("language_modeling", ['{"context": "a", "continuation": " "}'],
     r":1: an empty text in field 'continuation' is scored as nothing"),
])
def test_a_bad_task_file_is_one_line_naming_file_line_and_field(tmp_path, kind, lines, message):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as error:
        read_examples(str(path), kind)
    assert "\n" not in str(error.value) and str(error.value).startswith(str(path))
    assert re.search(message, str(error.value)), str(error.value)


def test_a_bad_task_entry_is_one_line(tmp_path):
    from jaxtrain.eval.icl import task_from_dict

    base = {"label": "t", "dataset_uri": "t.jsonl", "icl_task_type": "multiple_choice"}
    for change, message in (({"icl_task_type": "code_evaluation"}, "icl_task_type='code_evaluation' is not one of"),
                            ({"num_fewshot": "five"}, "num_fewshot='five' must be a whole number >= 0"),
                            ({"num_fewshot": [0, -1]}, r"num_fewshot=\[0, -1\] must be"),
                            ({"batch_size": 0}, r"batch_size=0 must be a whole number >= 1"),
                            ({"continuation_delimiter": 5}, "continuation_delimiter=5 must be a string"),
                            ({"prelimiter": "Q: ", "question_prelimiter": "Q: "}, "give prelimiter or question_"),
                            ({"early_stopping_criteria": "\n"}, "early_stopping_criteria=.* must be a list of")):
        with pytest.raises(ConfigError, match=f"^tasks.yaml: {message}"):
            task_from_dict(dict(base, **change), source="tasks.yaml")


def test_tasks_file_naming_another_tasks_file_and_gauntlet(tmp_path):
    """Foundry's eval configs give icl_tasks and eval_gauntlet as paths to other YAML files."""
    from jaxtrain.eval.icl import load_tasks

    (tmp_path / "yamls").mkdir()
    (tmp_path / "yamls" / "tasks.yaml").write_text(
        "icl_tasks:\n- {label: lm, dataset_uri: lm.jsonl, icl_task_type: language_modeling}\n")
    (tmp_path / "yamls" / "lm.jsonl").write_text('{"context": "a", "continuation": "b"}\n')
    (tmp_path / "yamls" / "eval.yaml").write_text("icl_tasks: tasks.yaml\neval_gauntlet: gauntlet.yaml\n")
    tasks, gauntlet = load_tasks(str(tmp_path / "yamls" / "eval.yaml"))
    assert [task.label for task in tasks] == ["lm"] and tasks[0].dataset_uri == str(tmp_path / "yamls" / "lm.jsonl")
    assert gauntlet == str(tmp_path / "yamls" / "gauntlet.yaml")
    (tmp_path / "yamls" / "empty.yaml").write_text(
        "icl_tasks:\n- {label: piqa, dataset_uri: '', icl_task_type: multiple_choice}\n")
    with pytest.raises(ConfigError, match=r"task 'piqa': dataset_uri is empty; set it to the task's JSONL file"):
        load_tasks(str(tmp_path / "yamls" / "empty.yaml"))


# ----------------------------------------------------------------------------- generated answers, cut

# The reference: LLM Foundry's cleaning of a generated answer, copied from
# InContextLearningGenerationExactMatchAccuracy (llmfoundry/eval/metrics/nlp.py; Copyright 2024
# MosaicML LLM Foundry authors, Apache License 2.0), folded into one function.
def foundry_normalize_answer(answer: str):
    def remove_articles(text: str) -> str:
        return re.sub(r'\b(a|an|the)\b', ' ', text)

    def white_space_fix(text: str) -> str:
        return ' '.join(text.split())

    def handle_punc(text: str) -> str:
        exclude = set(string.punctuation + ''.join([u'‘', u'’', u'´', u'`']))
        return ''.join(ch if ch not in exclude else ' ' for ch in text)

    def lower(text: str) -> str:
        return text.lower()

    def replace_underscore(text: str) -> str:
        return text.replace('_', ' ')

    return white_space_fix(remove_articles(handle_punc(lower(replace_underscore(answer))))).strip()


def foundry_correct(sample_output, sample_labels, stopping_criteria, cot_delimiter='', do_normalization=True):
    final_answer = sample_output
    if stopping_criteria is not None and len(stopping_criteria) > 0:
        final_answer = re.split('|'.join(stopping_criteria), final_answer)[0]
    if cot_delimiter is not None and len(cot_delimiter) > 0:
        final_answer = final_answer.split(cot_delimiter)[-1]
    if do_normalization:
        cleaned_final_answer = foundry_normalize_answer(final_answer)
        cleaned_sample_labels = {foundry_normalize_answer(label) for label in sample_labels}
    else:
        cleaned_final_answer = final_answer.strip()
        cleaned_sample_labels = {sample_label.strip() for sample_label in sample_labels}
    return any(cleaned_final_answer.startswith(label) for label in cleaned_sample_labels)


def literal_correct(output, answers, stops, cot_delimiter='', do_normalization=True):
    """The same cleaning with the stop strings matched literally (what a regex-escaped join gives)."""
    return foundry_correct(output, answers, [re.escape(stop) for stop in stops], cot_delimiter, do_normalization)


# (output, answers, early_stopping_criteria, cot_delimiter, do_normalization); the first five are
# cases where a literal cut and Foundry's regular expression disagree.
CUT_CASES = [
    ("Paris. France", ["Paris"], ["."], "", True),  # "." matches any character: nothing is left
    ("Paris. France", ["Paris"], ["Q:", "."], "", True),  # one alternative of the joined pattern
    ("A so Rome\n\nB so Paris", ["Rome"], [r"\n\n"], " so ", True),  # backslash-n is a newline in a regex
    ("5 $ 6", ["5 6"], ["$"], "", True),  # "$" is the end of the text, not a dollar sign
    ("ParisFrance", ["Paris"], ["s?F"], "", False),  # "?" makes the "s" optional: "sF" is cut
    ("Paris. France", ["Paris"], [r"\."], "", False),  # an escaped full stop is a literal one
    ("Paris\n\nQ: where", ["paris"], ["\n\n", "Q:"], "", True),  # no special characters: both agree
    ("x so y Q: so z", ["y"], ["Q:"], " so ", True),  # cut first, then read after the last cot_delimiter
    ("  Paris  ", [" Paris"], [], "", False),  # no criteria: nothing cut, both sides stripped
]


@pytest.mark.parametrize("output, answers, stops, cot, normalize", CUT_CASES)
def test_generated_answers_are_cut_as_foundrys_regular_expression(output, answers, stops, cot, normalize):
    from jaxtrain.eval.icl import generation_correct

    expected = foundry_correct(output, answers, stops, cot, normalize)
    assert generation_correct(output, answers, stopping_criteria=stops, cot_delimiter=cot,
                              do_normalization=normalize) == expected


def test_the_cut_cases_include_ones_where_a_literal_cut_differs():
    differ = [case for case in CUT_CASES if foundry_correct(*case) != literal_correct(*case)]
    assert len(differ) == 5 and differ == CUT_CASES[:5]


def test_stopping_criteria_that_are_no_regular_expression_are_one_line_naming_task_and_key(tmp_path):
    from jaxtrain.eval.gauntlet import ICLEvalCallback
    from jaxtrain.eval.icl import task_from_dict

    base = {"label": "qa", "dataset_uri": "qa.jsonl", "icl_task_type": "generation_task_with_answers"}
    for stops, message in ((["(Q:"], r"early_stopping_criteria=\['\(Q:'\] is not a valid regular expression once "
                                     r"joined with '\|' \(.+\); answers are cut at its matches as in LLM Foundry"),
                           (["Q:", ""], r"early_stopping_criteria=\['Q:', ''\] has an empty string, which would cut "
                                        r"every generated answer to nothing: remove it")):
        with pytest.raises(ConfigError, match=f"^tasks.yaml: task 'qa': {message}") as error:
            task_from_dict(dict(base, early_stopping_criteria=stops), source="tasks.yaml")
        assert "\n" not in str(error.value)
    # Foundry compiles the joined pattern only: entries that are no pattern alone may form one
    assert task_from_dict(dict(base, early_stopping_criteria=["Q(", ")"])).early_stopping_criteria == ["Q(", ")"]
    path = tmp_path / "qa.jsonl"
    path.write_text('{"context": "a", "answer": "b"}\n')
    task = ICLTask("qa", str(path), "generation_task_with_answers", early_stopping_criteria=["[A"])
    with pytest.raises(ConfigError, match=r"^task 'qa': early_stopping_criteria=\['\[A'\] is not a valid"):
        evaluate_task(SimpleNamespace(max_seq_len=8), text_tokenizer(), task, 0)
    with pytest.raises(ConfigError, match=r"^icl_tasks: task 'qa': early_stopping_criteria=\['\[A'\] is not a valid"):
        ICLEvalCallback([task])
