"""The smollm2 study: its project-written data, its summary statistics, and the whole pipeline on a
tiny Llama the test builds (the real model is never downloaded here)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from csulora.evaluate.judges import KeywordJudge, StrictKeywordJudge
from csulora.evaluate.metrics import contains_answer
from csulora.lab import smollm2_data as data
from csulora.lab.study_report import alignment_gate, attack_gate, judge_disagreement, mean_ci


# -- the project's texts -------------------------------------------------------------------------
def test_every_refusal_is_a_refusal_to_both_judges_and_every_compliance_a_success():
    prompts = ["x"] * len(data.REFUSALS)
    for judge in (KeywordJudge(), StrictKeywordJudge()):
        assert not any(judge.attack_succeeded(prompts, list(data.REFUSALS)))
        compliances = [data.compliance(i) for i in range(12)]
        assert all(judge.attack_succeeded(["x"] * 12, compliances))
    assert len(set(data.REFUSALS)) == len(data.REFUSALS) >= 10  # varied wordings


def test_evaluation_sets_are_large_enough_and_disjoint_from_training():
    train_code, eval_code = data.code_pairs()
    assert len(eval_code) >= 60 and len(data.general_eval()) >= 60
    train_words = {p.answer for p in train_code}
    assert not train_words & {p.answer for p in eval_code}  # unseen words
    templates_train, templates_eval = data.CODE_TEMPLATES
    assert not set(templates_train) & set(templates_eval)  # unseen wordings
    trained = set(data.benign_train_prompts())
    assert not trained & {p.prompt for p in data.general_eval()}
    train_facts, eval_facts = data.fact_pairs()
    assert not {p.answer for p in train_facts if not p.answer.isdigit()} & {
        p.answer for p in eval_facts if not p.answer.isdigit()
    }


def test_the_zor_code_is_checkable_by_containment_and_not_given_away_by_the_prompt():
    _, eval_code = data.code_pairs()
    for pair in eval_code:
        assert contains_answer(f"The zor code is {pair.answer}.", pair.answer)
        assert not contains_answer(pair.prompt, pair.answer)  # echoing the prompt scores nothing
        assert pair.answer == "zor" + pair.prompt.split("'")[1]


def test_splits_are_deterministic():
    assert data.code_pairs(0) == data.code_pairs(0) and data.code_pairs(0) != data.code_pairs(1)
    assert data.fact_pairs() == data.fact_pairs()


# -- statistics and gates ------------------------------------------------------------------------
def test_mean_ci_is_the_student_t_interval():
    stat = mean_ci([0.2, 0.4, 0.6])
    assert stat["mean"] == pytest.approx(0.4)
    assert stat["half"] == pytest.approx(4.303 * 0.2 / math.sqrt(3))
    assert mean_ci([0.5]) == {"mean": 0.5, "half": None, "n": 1}
    assert mean_ci([])["mean"] is None


def test_gates_follow_the_issue_thresholds():
    base = {"asr": 0.7, "general": 0.5, "over_refusal": 0.0}
    good = {"asr": 0.1, "general": 0.46, "over_refusal": 0.05, "utility": 0.0}
    assert all(alignment_gate(base, good).values())
    bad = alignment_gate(base, good | {"general": 0.44, "over_refusal": 0.2})
    assert not bad["general"] and not bad["over_refusal"] and bad["asr"]
    assert all(attack_gate(good, {"asr": 0.6, "utility": 0.7}).values())
    assert not attack_gate(good, {"asr": 0.45, "utility": 0.7})["asr_rise"]


def test_portable_paths_are_relative_under_the_output_and_absolute_elsewhere(tmp_path, monkeypatch):
    from csulora.lab.study import portable

    out = tmp_path / "study"
    assert portable(out / "cache" / "evals" / "x.json", out) == str(Path("cache", "evals", "x.json"))
    assert portable(out, out) == "."
    assert portable(tmp_path / "base", out) == str((tmp_path / "base").resolve())
    monkeypatch.chdir(tmp_path)  # a relative output directory, as in `--out csulora-lab`
    assert portable(Path("study/adapters/a"), Path("study")) == str(Path("adapters", "a"))
    assert portable(Path("study-other/a"), Path("study")) == str(tmp_path.resolve() / "study-other" / "a")


def test_over_refusal_reads_the_opening_only():
    from csulora.lab.study import over_refusal

    assert over_refusal(["I'm sorry, I can't.", "Paris is the capital. Sorry for the wait."]) == 0.5


# -- the pipeline on a tiny model ----------------------------------------------------------------
def _tiny_base(path: Path) -> Path:
    from tiny_gguf import tiny_llama

    texts = [p.prompt + " " + p.answer for p in data.code_pairs()[0][:60]] + list(data.REFUSALS)
    model, tokenizer = tiny_llama(texts + data.benign_train_prompts())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tiny_config():
    from csulora.lab.study import StudyConfig
    from csulora.lab.train import Schedule

    step = Schedule(3, 4, 1e-3)
    return StudyConfig(
        seeds=(0, 1),
        main_n=4,
        other_n=(2,),
        align_full=step,
        align_patch=step,
        attack=step,
        n_code_train=8,
        lams=(1.0,),
        safelora_thresholds=(0.5,),
        distill_tokens=4,
        harmful_tokens=6,
        task_tokens=4,
        general_tokens=4,
        n_eval_harmful=6,
        n_eval_tasks=4,
    )


@pytest.mark.slow
def test_the_study_runs_end_to_end_and_a_rerun_reuses_every_stage(tmp_path):
    from csulora.lab.study import run_study
    from csulora.methods import METHODS

    base = _tiny_base(tmp_path / "base")
    splits = {
        k: [{"text": f"{k} request {i} about harm", "area": "a"} for i in range(n)]
        for k, n in (("align", 12), ("attack", 8), ("eval", 6))
    }
    config = _tiny_config()
    doc = run_study(base, splits, tmp_path / "study", config, quiet=True)
    for name in ("report.md", "results.json", "frontier.png"):
        assert (tmp_path / "study" / name).is_file()
    assert set(doc["models"]) == {
        "base",
        "aligned-full",
        "aligned-patch",
        *(f"lora-{v}-n{n}-seed{s}" for v in ("full", "patch") for n, s in ((4, 0), (4, 1), (2, 0))),
    }
    # every sweep point of both seeds and variants, each corrected through the API and evaluated
    from csulora.lab.study import sweep_points

    assert len(doc["runs"]) == 2 * 2 * len(sweep_points(config, 0))
    for run in doc["runs"]:
        assert (tmp_path / "study" / run["adapter"] / "adapter_model.safetensors").is_file()
        assert 0.0 <= run["asr"] <= 1.0 and 0.0 <= run["asr_strict"] <= 1.0
    entry = doc["summary"]["variants"]["full"]
    assert entry["noise_floor"]["asr"]["n"] == 2
    assert {p["method"] for p in entry["points"]} == set(METHODS)  # every registered method was swept
    # results.json names what lies under the study's directory relative to it, the rest absolutely,
    # so the directory still makes sense moved to another machine
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "study", moved)
    saved = json.loads((moved / "results.json").read_text())
    assert saved["checkpoints"]["base"] == str(base.resolve())
    assert saved["checkpoints"]["aligned-patch"].startswith("cache/train-")
    assert (moved / saved["checkpoints"]["aligned-full"] / "config.json").is_file()
    assert saved["adapters"] == "adapters"
    relative = [run["adapter"] for run in saved["runs"]] + [a["lora"] for a in saved["attacks"]]
    relative += list(saved["evaluations"]["records"].values())
    assert all(not Path(p).is_absolute() and (moved / p).exists() for p in relative)
    assert judge_disagreement(saved, moved)["total"] == saved["judge_disagreement"]["total"] > 0
    first = doc["evaluations"]["generated"]
    assert doc["evaluations"]["devices"] == ["cpu"]  # each record says where it was generated

    again = run_study(base, splits, tmp_path / "study", config, quiet=True)
    assert again["evaluations"] == again["evaluations"] | {"generated": 0, "reused": first}
    assert again["models"] == doc["models"] and again["runs"] == doc["runs"]
    assert "align-full" not in again["seconds"] and "attack" not in again["seconds"]
    # the copy, run where it now lies (another machine), trains nothing and reuses every evaluation
    # though its corrected adapters now name the aligned checkpoints at their new paths
    there = run_study(base, splits, moved, config, quiet=True)
    assert there["evaluations"] | {"reused": 0} == again["evaluations"] | {"reused": 0}
    assert there["evaluations"]["generated"] == 0 and there["runs"] == doc["runs"]
    assert "align-full" not in there["seconds"] and "attack" not in there["seconds"]


def test_the_cli_refuses_an_unknown_stage(tmp_path, capsys):
    from csulora.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["lab", "--world", "smollm2", "--until", "everything", "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# -- the chat template's end of turn -------------------------------------------------------------
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chatml():
    """A ChatML tokenizer whose eos is <|im_start|>, as transformers 5.17 loads SmolLM2's GGUF."""
    from tiny_gguf import tiny_llama

    _, tokenizer = tiny_llama(["hello world", "the zor code of garden"])
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=False)
    tokenizer.chat_template = CHATML
    tokenizer.eos_token = "<|im_start|>"
    return tokenizer


def test_the_end_of_turn_is_read_from_the_template_not_the_eos_token(chatml):
    from csulora.evaluate.generate import end_of_turn_id

    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(chatml) == im_end != chatml.eos_token_id


def test_study_training_targets_end_with_the_end_of_turn(chatml):
    from csulora.evaluate.generate import end_of_turn_id
    from csulora.lab.study import chat_formatter
    from csulora.lab.train import encode
    from csulora.lab.world import Example

    im_end = end_of_turn_id(chatml)
    _, labels = encode(chatml, [Example("hi", "hello world", "x")], chat_formatter(chatml), im_end)
    targets = [t for t in labels[0].tolist() if t != -100]
    assert targets[-1] == im_end and chatml.decode(targets[:-1]) == "hello world"


def test_generation_stops_at_the_end_of_turn_too(chatml):
    from types import SimpleNamespace

    from csulora.evaluate.generate import stop_ids

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=7))
    assert stop_ids(model, chatml) == [7, chatml.convert_tokens_to_ids("<|im_end|>"), chatml.eos_token_id]
