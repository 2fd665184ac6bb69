"""`csulora eval`: metrics, judges, prompt files, and the command on a tiny local model."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from csulora.cli import main
from csulora.errors import CsuloraError
from csulora.evaluate import metrics
from csulora.evaluate.judges import (
    REFUSAL_KEYWORDS,
    KeywordJudge,
    StrictKeywordJudge,
    build_judge,
    is_degenerate,
    is_refusal,
    is_unsafe_verdict,
    load_keywords,
    opening,
)
from csulora.evaluate.prompts import load_prompts


# -- metrics -------------------------------------------------------------------------------------
def test_utility_kept_and_safety_recovered_formulas():
    assert metrics.utility_kept(0.6, 0.2, 1.0) == pytest.approx(0.5)
    assert metrics.safety_recovered(0.4, 0.1, 1.0) == pytest.approx(0.6 / 0.9)
    assert metrics.utility_kept(1.0, 0.2, 1.0) == pytest.approx(1.0)
    assert metrics.safety_recovered(0.1, 0.1, 1.0) == pytest.approx(1.0)


def test_zero_denominators_are_none():
    assert metrics.utility_kept(0.3, 0.5, 0.5) is None
    assert metrics.safety_recovered(0.3, 0.7, 0.7) is None
    assert metrics.tradeoff(None, 0.5) is None
    assert metrics.relative_metrics(
        {"utility": 0.1, "asr": 0.2}, {"utility": 0.1, "asr": 0.0}, {"utility": 0.1, "asr": 1.0}
    ) == {"utility_kept": None, "safety_recovered": 0.8, "tradeoff": None}


def test_tradeoff_is_the_clipped_harmonic_mean():
    assert metrics.tradeoff(0.5, 1.0) == pytest.approx(2 * 0.5 / 1.5)
    assert metrics.tradeoff(1.7, -0.2) == 0.0
    assert metrics.tradeoff(1.7, 1.2) == pytest.approx(1.0)
    assert metrics.tradeoff(0.0, 0.0) == 0.0


def test_accuracy_and_asr():
    assert metrics.accuracy(["a b", " c  d ", "x"], ["a b", "c d", "y"]) == pytest.approx(2 / 3)
    assert metrics.accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        metrics.accuracy(["a"], [])
    assert metrics.attack_success_rate([True, False, True, True]) == 0.75
    assert metrics.attack_success_rate([]) == 0.0


@pytest.mark.parametrize(
    "response,answer,hit",
    [
        ("The capital of France is Paris.", "Paris", True),
        ("the capital of france is PARIS", "paris", True),
        ("It is New York City, of course.", "new york", True),
        ("Paris.", "Paris", True),
        ("Answer: 42!", "42", True),
        ("The Parisian suburbs.", "Paris", False),
        ("York, then New Haven.", "New York", False),
        ("It is 420.", "42", False),
        ("", "Paris", False),
        ("?!", "?!", True),
    ],
)
def test_contains_scoring_is_whole_words(response, answer, hit):
    assert metrics.contains_answer(response, answer) is hit


def test_scorings_differ_on_a_sentence_answer():
    responses, answers = ["The capital of France is Paris.", "Rome", "I think Berlin"], ["Paris", "Rome", "Madrid"]
    assert metrics.accuracy(responses, answers, "exact") == pytest.approx(1 / 3)
    assert metrics.accuracy(responses, answers, "contains") == pytest.approx(2 / 3)
    assert metrics.answer_matches(responses, answers, "contains") == [True, True, False]
    with pytest.raises(ValueError, match="unknown scoring"):
        metrics.accuracy(responses, answers, "fuzzy")


# -- judges --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    ["I'm sorry, but I cannot help with that.", "I apologize, but no.", "As an AI, I will not.",
     "I can't do that.", "I\u2019m sorry, no.", "Well... I cannot."],
)  # fmt: skip
def test_refusals_are_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", ["Sure, here is how to do it: [step one]", "", "Of course! First [step one]."])
def test_compliances_are_not_refusals(text):
    assert not is_refusal(text)


def test_extra_keyword_file(tmp_path):
    extra = tmp_path / "kw.txt"
    extra.write_text("# comment\n\nNo way\n")
    keywords = list(REFUSAL_KEYWORDS) + load_keywords(extra)
    assert is_refusal("No way, friend.", keywords) and not is_refusal("No way, friend.")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(CsuloraError, match="empty.txt"):
        load_keywords(empty)


def test_strict_judge_reads_the_opening_only():
    later = "Sure, here is how: first [step one], then [step two]. I do not recommend it."
    topic = "Sure, it is illegal, but here is how: first [step one], then [step two]."
    refusal = "I'm sorry, but I cannot help with that. Here is something else."
    late_start = "Well... I cannot."
    responses = [later, topic, refusal, late_start]
    assert KeywordJudge().attack_succeeded([""] * 4, responses) == [False, False, False, False]
    assert StrictKeywordJudge().attack_succeeded([""] * 4, responses) == [True, True, False, False]
    assert opening(later) == "Sure, here is how: first [step one], then [step two]."
    assert opening(late_start) == late_start


@pytest.mark.parametrize(
    "text",
    ["", "   ", "Sure.", "!!!!!!!!", "I will help I will help I will help I will help I will help",
     "the the the the the the the the the the"],
)  # fmt: skip
def test_empty_short_or_repetitive_output_is_no_attack_success(text):
    assert is_degenerate(text)
    assert StrictKeywordJudge().attack_succeeded(["p"], [text]) == [False]
    assert KeywordJudge().attack_succeeded(["p"], [text]) == [True]  # what the keyword judge gets wrong


@pytest.mark.parametrize(
    "text",
    ["Sure, here is how to do it: first [step one], then [step two].", "Step one: mix a and b. Step two: heat it."],
)
def test_ordinary_compliances_are_not_degenerate(text):
    assert not is_degenerate(text)


def test_extra_keywords_reach_both_keyword_judges():
    for name in ("keyword", "strict"):
        judge = build_judge(name, extra_keywords=["No way"])
        assert judge.name == name
        assert judge.attack_succeeded(["p"], ["No way, friend, not doing that."]) == [False]
    with pytest.raises(CsuloraError, match="needs a model"):
        build_judge("classifier")


def test_classifier_verdicts():
    assert is_unsafe_verdict("unsafe\nS1") and is_unsafe_verdict("  Unsafe")
    assert not is_unsafe_verdict("safe") and not is_unsafe_verdict("")


# -- prompt files --------------------------------------------------------------------------------
def test_prompts_from_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n\n{"text": "b"}\n{"instruction": "c", "id": 3}\n')
    assert load_prompts(jsonl) == ["a", "b", "c"]
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('id,prompt\n1,"x, y"\n2,z\n')
    assert load_prompts(csv_file) == ["x, y", "z"]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("bad.jsonl", '{"prompt": "a"}\n{oops\n', "line 2 is not valid JSON"),
        ("field.jsonl", '{"prompt": "a"}\n{"question": "b"}\n', "line 2 has no non-empty 'prompt'"),
        ("list.jsonl", '["a"]\n', "line 1 is not a JSON object"),
        ("empty.jsonl", "\n", "no prompts"),
        ("cols.csv", "id,question\n1,a\n", "no 'prompt' column"),
        ("p.txt", "a\n", "unsupported prompt file"),
    ],
)
def test_bad_prompt_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CsuloraError, match=message) as info:
        load_prompts(path)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(CsuloraError, match="no such file"):
        load_prompts(tmp_path / "nope.jsonl")


def test_prompt_files_are_read_by_their_format_rules(tmp_path):
    """JSONL ends records at "\n" only, CSV keeps quoted newlines: U+2028 and form feeds stay in the prompt."""
    jsonl = tmp_path / "p.jsonl"
    rows = [{"prompt": "one\u2028two"}, {"prompt": "three\x0cfour\x85five"}, {"prompt": "six\r\nseven"}]
    jsonl.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\r\n", encoding="utf-8")
    assert load_prompts(jsonl) == ["one\u2028two", "three\x0cfour\x85five", "six\r\nseven"]
    csv_file = tmp_path / "p.csv"
    csv_file.write_bytes('prompt\r\n"what is\ntwo plus two"\r\none\u2028two\r\nthree\x0cfour\r\n'.encode())
    assert load_prompts(csv_file) == ["what is\ntwo plus two", "one\u2028two", "three\x0cfour"]
    tasks = tmp_path / "t.csv"
    tasks.write_bytes('prompt,answer\n"a\nb",c\u2028d\n'.encode())
    from csulora.evaluate.prompts import load_tasks

    assert load_tasks(tasks) == [("a\nb", "c\u2028d")]


def _fifo(tmp_path):
    path = tmp_path / "fifo.jsonl"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d: d / "deep.jsonl", "line 1 is nested too deeply"),
        (lambda d: d / "array.json", "one JSON document (an array) over several lines, not JSONL"),
        (lambda d: d / "huge.csv", "invalid CSV near line 1 (field larger than field limit"),
        (lambda d: d / "surrogate.jsonl", "line 2: 'prompt' holds a lone surrogate (U+D800)"),
        (_fifo, "is a pipe, not a regular file"),
        (lambda d: d, "is a directory, not a regular file"),
    ],
    ids=["deep", "array", "huge_csv_header", "surrogate", "fifo", "directory"],
)
def test_hostile_prompt_files_are_one_line_before_any_model_loads(tmp_path, capsys, make, message):
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (tmp_path / "array.json").write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}], indent=2))
    (tmp_path / "huge.csv").write_text("prompt," + "x" * 200_000 + "\na,b\n")
    (tmp_path / "surrogate.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "bad \\ud800"}\n')
    path = make(tmp_path)
    if path == tmp_path:
        path = tmp_path / "dir.jsonl"
        path.mkdir()
    with pytest.raises(CsuloraError, match=re.escape(message)):
        load_prompts(path)
    # through the command: the file is refused before the model (that does not exist) is looked at
    assert main(["eval", str(tmp_path / "no-model"), "--prompts", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("csulora: error: ") and err.count("\n") == 1 and message.split(" (")[0] in err, err
    tasks = tmp_path / "ok.jsonl"
    tasks.write_text('{"prompt": "p"}\n')
    assert main(["eval", str(tmp_path / "no-model"), "--prompts", str(tasks), "--tasks", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "no-model" not in err, err


# -- the command ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama with the lab's tokenizer and chat template, plus a LoRA on it."""
    from conftest import make_adapter

    from csulora_lab.train import ModelShape, format_prompt, new_model, train_tokenizer

    root = tmp_path_factory.mktemp("chat")
    texts = [format_prompt(f"How do I do thing {i}?") + "I'm sorry, I cannot." for i in range(20)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    model = new_model(tokenizer, ModelShape(hidden=32, layers=1, heads=2, intermediate=64), seed=0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    adapter = make_adapter(model, root / "lora", r=2, lora_alpha=4)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(root / "model")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    prompts = root / "harmful.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"How do I do thing {i}?"}) + "\n" for i in range(5)))
    return root / "model", adapter, prompts


def _tiny_model(kind: str):
    from conftest import tiny_llama_config
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(tiny_llama_config()).eval()
    # hybrids whose cache holds recurrent (convolution / linear-attention) states beside keys and values;
    # before transformers 5 they had caches of their own that a DynamicCache does not stand in for
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"{kind}: a DynamicCache holds its states from transformers 5 on")
    layer_types = {"lfm2": ["conv", "full_attention"], "qwen3_next": ["linear_attention", "full_attention"]}[kind]
    config = AutoConfig.for_model(
        kind, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, layer_types=layer_types,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def _greedy_reference(model, ids, mask, steps, stop):
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=steps, eos_token_id=stop, pad_token_id=0
    )[:, ids.shape[1] :].tolist()
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in out]


# the hybrid architectures build slow models (qwen3_next's linear attention most): the full run checks them
@pytest.mark.parametrize(
    "kind", ["llama", pytest.param("lfm2", marks=pytest.mark.slow), pytest.param("qwen3_next", marks=pytest.mark.slow)]
)
def test_greedy_decoding_drops_stopped_rows_and_matches_generate(kind):
    """Row by row the tokens of ``model.generate`` (greedy, left padding, several stop tokens), cut
    after each row's first stop token, though finished rows leave the batch (and every layer's cache,
    recurrent states included) early."""
    from csulora.evaluate.generate import greedy_tokens

    model = _tiny_model(kind)
    lengths = [9, 4, 7, 2, 9, 5]
    ids = torch.randint(3, model.config.vocab_size, (len(lengths), max(lengths)))
    mask = torch.tensor([[0] * (max(lengths) - n) + [1] * n for n in lengths])
    ids = ids.masked_fill(mask == 0, 0)  # left padding
    steps = 10
    free = _greedy_reference(model, ids, mask, steps, [])
    # stop at tokens that some rows reach early and others late or never: rows end at different steps
    stop = sorted({row[2] for row in free[:2]} | {free[0][steps // 2]})
    expected = _greedy_reference(model, ids, mask, steps, stop)
    assert len({len(row) for row in expected}) > 1 and max(map(len, expected)) == steps
    assert greedy_tokens(model, ids, mask, max_new_tokens=steps, stop=stop) == expected
    assert greedy_tokens(model, ids, mask, max_new_tokens=steps, stop=[]) == free
    if kind != "llama":
        return
    # a generation config that changes the logits (a repetition penalty) is honoured, as generate does
    model.generation_config.repetition_penalty = 1.5
    penalised = _greedy_reference(model, ids, mask, steps, stop)
    assert penalised != expected  # the penalty changes this model's answers
    assert greedy_tokens(model, ids, mask, max_new_tokens=steps, stop=stop) == penalised


def test_an_adapter_is_merged_before_generating_and_answers_as_the_unmerged_one(chat_model):
    """Generation runs on the merged weights (one matmul per projection, not PEFT's three)."""
    from peft import PeftModel

    from csulora.evaluate.generate import format_prompts, generate, load_model, uses_chat_template

    model_dir, adapter, _ = chat_model
    merged, tokenizer = load_model(model_dir, adapter, device="cpu")
    separate, _ = load_model(model_dir, adapter, merge=False, device="cpu")
    base, _ = load_model(model_dir, device="cpu")
    assert isinstance(separate, PeftModel) and not isinstance(merged, PeftModel)
    texts = format_prompts(tokenizer, [f"How do I do thing {i}?" for i in range(5)])
    special = not uses_chat_template(tokenizer)
    ids = tokenizer(texts[0], return_tensors="pt", add_special_tokens=special)
    with torch.no_grad():
        logits = {name: m(**ids).logits for name, m in (("merged", merged), ("separate", separate), ("base", base))}
    torch.testing.assert_close(logits["merged"], logits["separate"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits["merged"], logits["base"], atol=1e-3)  # the adapter does change the model
    settings = {"max_new_tokens": 8, "batch_size": 2, "add_special_tokens": special}
    assert generate(merged, tokenizer, texts, **settings) == generate(separate, tokenizer, texts, **settings)


def test_eval_writes_responses_and_asr(chat_model, tmp_path, capsys):
    model, adapter, prompts = chat_model
    out = tmp_path / "eval.json"
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"Say {w}.", "answer": w}) + "\n" for w in ("a", "b", "c")))
    code = main(["eval", str(model), "--adapter", str(adapter), "--prompts", str(prompts), "--out", str(out),
                 "--tasks", str(tasks), "--max-new-tokens", "4", "--batch-size", "2", "-q"])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["n"] == 5 and len(result["responses"]) == 5
    assert result["chat_template"] is True and result["judge"] == "keyword"
    for name in ("keyword", "strict"):
        flags = [r["attack_success"][name] for r in result["responses"]]
        judge = build_judge(name)
        assert flags == judge.attack_succeeded(["p"] * 5, [r["response"] for r in result["responses"]])
        assert result[f"asr_{name}"] == pytest.approx(sum(flags) / 5)
    assert result["asr"] == result["asr_keyword"]
    utility = result["task_responses"]["utility"]
    assert utility["scoring"] == "contains" and utility["n"] == 3
    for record in utility["records"]:
        assert record["correct"] == metrics.contains_answer(record["response"], record["answer"])
    assert result["utility"] == pytest.approx(sum(r["correct"] for r in utility["records"]) / 3)
    out_text = capsys.readouterr().out
    assert "ASR" in out_text and "utility" in out_text
    # the output is never overwritten without --force
    assert main(["eval", str(model), "--prompts", str(prompts), "--out", str(out), "-q"]) == 2


def test_eval_with_classifier_judge(chat_model, tmp_path):
    model, _, prompts = chat_model
    out = tmp_path / "judged.json"
    assert main(["eval", str(model), "--prompts", str(prompts), "--out", str(out), "--classifier", str(model),
                 "--max-new-tokens", "3", "-q"]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["judge"] == "classifier" and result["classifier"] == str(model)
    unsafe = [r["attack_success"]["classifier"] for r in result["responses"]]
    assert result["asr"] == pytest.approx(sum(unsafe) / 5) == pytest.approx(result["asr_classifier"])
    assert {"asr_keyword", "asr_strict"} <= set(result)
    # --judge picks the headline among the judges that ran
    out2 = tmp_path / "strict.json"
    assert main(["eval", str(model), "--prompts", str(prompts), "--out", str(out2), "--judge", "strict",
                 "--max-new-tokens", "3", "-q"]) == 0  # fmt: skip
    strict = json.loads(out2.read_text())
    assert strict["judge"] == "strict" and strict["asr"] == strict["asr_strict"] and "asr_classifier" not in strict
    assert main(["eval", str(model), "--prompts", str(prompts), "--judge", "classifier"]) == 2


def test_a_new_judge_is_one_class(chat_model):
    """The Judge interface: any object with ``name`` and ``attack_succeeded`` plugs into the pipeline."""
    from csulora.evaluate.pipeline import Generation, generate_and_judge

    class LongAnswers:
        name = "long"

        def attack_succeeded(self, prompts, responses, *, progress=False):
            return [len(r) > 5 for r in responses]

    model, _, _ = chat_model
    prompts = ["How do I do thing 1?", "How do I do thing 2?"]
    result = generate_and_judge(model, harmful=prompts, judges=[LongAnswers()], generation=Generation(3, 2))
    lengths = [len(r["response"]) > 5 for r in result["responses"]]
    assert result["judge"] == "long" and result["asr"] == result["asr_long"] == sum(lengths) / 2


def test_eval_bad_input_is_one_line(chat_model, tmp_path, capsys):
    model, _, prompts = chat_model
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert main(["eval", str(model), "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("csulora: error:") and "bad.jsonl" in err and "\n" not in err
    assert main(["eval", str(tmp_path / "no-model"), "--prompts", str(prompts)]) == 2
    assert "no-model" in capsys.readouterr().err
    assert main(["eval", str(model), "--prompts", str(prompts), "--max-new-tokens", "0"]) == 2


def test_tasks_need_an_answer(tmp_path):
    from csulora.evaluate.prompts import load_tasks

    good = tmp_path / "t.jsonl"
    good.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    assert load_tasks(good) == [("1+1?", "2")]
    bad = tmp_path / "b.csv"
    bad.write_text("prompt,answer\n1+1?,\n")
    with pytest.raises(CsuloraError, match="line 2 has no non-empty 'answer'"):
        load_tasks(bad)
