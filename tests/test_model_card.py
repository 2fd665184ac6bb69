"""The corrected adapter's README.md: PEFT's front matter, how it was corrected, then the input's card."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from csulora import BasisSource, MethodParams, correct_adapter
from csulora.cli import main
from csulora.errors import CsuloraWarning
from csulora.model_card import corrected_card

ORIGINAL = """---
license: apache-2.0
language: en
tags:
- my-task
---

# My adapter

Trained on the zor code for three epochs.
"""


def front_matter(card: str) -> tuple[dict, str]:
    match = REGEX_YAML_BLOCK.search(card)
    assert match is not None and match.start() == 0, card[:200]
    return yaml.safe_load(match.group(2)), card[match.end() :]


@pytest.fixture
def adapter_with_card(tmp_path, llama_adapter):
    adapter = tmp_path / "lora"
    shutil.copytree(llama_adapter, adapter)
    (adapter / "README.md").write_text(ORIGINAL)
    return adapter


def test_correct_writes_a_card_that_says_how_and_keeps_the_original(
    tmp_path, adapter_with_card, llama_pair, subspace_file
):
    _, aligned = llama_pair
    out = tmp_path / "safe"
    argv = ["correct", adapter_with_card, "-o", out, "--subspace", subspace_file, "--lam", "2", "-q"]
    assert main([str(a) for a in argv]) == 0
    card = (out / "README.md").read_text()
    report = json.loads((out / "csulora_report.json").read_text())

    meta, body = front_matter(card)
    assert meta["base_model"] == str(aligned) and meta["library_name"] == "peft"
    assert {"csulora", "lora", "my-task", f"base_model:adapter:{aligned}"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0" and meta["language"] == "en"  # the input's metadata is kept
    assert "pipeline_tag" not in meta  # the fixture's LoraConfig has no task_type
    hub = ModelCard.load(out / "README.md")  # the Hub's own parser reads the same
    assert hub.data.library_name == "peft" and hub.data.base_model == str(aligned)

    assert "`csulora`" in body and "`lam=2.0`" in body and "`rank_mode=exact`" in body
    assert f"`{subspace_file}`" in body
    for side in ("base", "aligned"):
        assert f"`{report['subspace'][side]['source']}`" in body
        assert report["subspace"][side]["sha256"] in body
    kept = report["energy_after"] / report["energy_before"]
    assert f"**Energy kept**: {kept:.1%}" in body
    assert f"{len(report['modules'])} corrected" in body
    ours, _, original = body.partition("\n## Original model card\n\n")
    assert "# Corrected LoRA adapter" in ours
    assert original == ORIGINAL.split("---\n\n", 1)[1]  # the input's text, unchanged, below ours


def test_the_card_changes_nothing_else(tmp_path, adapter_with_card, subspace_file):
    """Adapter weights, config and report are byte for byte what they are without an input card."""
    with_card = tmp_path / "with"
    correct_adapter(adapter_with_card, with_card, BasisSource(subspace_file), method_settings=MethodParams(lam=2.0))
    (adapter_with_card / "README.md").unlink()
    without = tmp_path / "without"
    correct_adapter(adapter_with_card, without, BasisSource(subspace_file), method_settings=MethodParams(lam=2.0))
    assert sorted(p.name for p in with_card.iterdir()) == sorted(p.name for p in without.iterdir())
    for name in ("adapter_model.safetensors", "adapter_config.json", "csulora_report.json"):
        assert (with_card / name).read_bytes() == (without / name).read_bytes()
    assert (without / "README.md").read_text().endswith("The input adapter had no model card.\n")


def test_the_corrected_adapter_with_its_card_loads_in_peft(tmp_path, adapter_with_card, llama_pair, subspace_file):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    _, aligned = llama_pair
    out = tmp_path / "safe"
    correct_adapter(adapter_with_card, out, BasisSource(subspace_file))
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(aligned), out)
    assert "lora_A" in "".join(name for name, _ in model.named_parameters())


def test_a_method_reading_the_full_displacement_names_the_pair(tmp_path, llama_adapter, llama_pair):
    base, aligned = llama_pair
    out = tmp_path / "safe"
    correct_adapter(llama_adapter, out, BasisSource(base=base), method="safelora")
    meta, body = front_matter((out / "README.md").read_text())
    assert "csulora" in meta["tags"]
    assert f"read from base `{base}` and aligned `{aligned}`" in body
    assert "`safelora`" in body and "`threshold=" in body

    streamed = tmp_path / "streamed"
    correct_adapter(llama_adapter, streamed, BasisSource(base=base))  # csulora, its subspace computed from the pair
    _, body = front_matter((streamed / "README.md").read_text())
    assert "a subspace computed on the fly" in body and f"  - aligned: `{aligned}`" in body


REPORT = {
    "method": "csulora",
    "params": {"lam": float("inf"), "rank_mode": "keep"},
    "csulora_version": "0.1.0",
    "subspace": None,
    "energy_before": 4.0,
    "energy_after": 1.0,
    "unchanged_modules": ["m.v"],
    "modules": {"m.q": {}, "m.v": {}},
}


def test_front_matter_that_is_not_yaml_is_kept_as_text_with_a_warning():
    original = "---\ntags: [unclosed\n---\nbody text\n"
    with pytest.warns(CsuloraWarning, match="not valid YAML"):
        card = corrected_card(REPORT, base_model="org/model", original=original, task_type="CAUSAL_LM")
    meta, body = front_matter(card)
    tags = ["base_model:adapter:org/model", "csulora", "lora"]
    assert meta == {"base_model": "org/model", "library_name": "peft", "tags": tags, "pipeline_tag": "text-generation"}
    assert body.endswith("## Original model card\n\n" + original)
    assert "`lam=inf`" in body and "25.0%" in body and "1 left unchanged" in body


def test_a_card_without_front_matter_or_base_model():
    card = corrected_card(REPORT, base_model=None, original="Just text.\n", task_type="SEQ_CLS")
    meta, body = front_matter(card)
    assert meta == {"library_name": "peft", "tags": ["csulora", "lora"]}
    assert body.endswith("## Original model card\n\nJust text.\n")
    assert "- **Subspace**: none" in body
    given = REPORT | {"subspace": {"aligned": {"source": "org/chat", "sha256": "ab12"}, "settings": {"energy": 0.8}}}
    _, body = front_matter(corrected_card(given, base_model=None))
    assert "a subspace given in memory" in body and "`org/chat` (sha256 of the weights used `ab12`)" in body
    assert "`energy=0.8`" in body and "The input adapter had no model card." in body
