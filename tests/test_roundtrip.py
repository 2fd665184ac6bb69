"""Round trips through real transformers models and PEFT: the written adapter loads unchanged and its
merged weights equal ``W_aligned + dW*`` from the dense reference, for every method and architecture."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import LLAMA_TARGETS, TINY_LLAMA_SHAPES, make_adapter, perturbed, save_model
from dense_reference import csulora_dense, csulora_dir_dense, csulora_signed_dense, parts, safelora_dense
from safetensors.torch import load_file

from csulora import BasisSource, MethodParams, compute_subspace, correct_adapter, load_subspace
from csulora.methods import random_basis
from csulora.svd import SubspaceSettings


def read_state(directory):
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state |= load_file(str(file))
    return state


def lora_deltas(adapter_dir):
    """Each module's ``dW`` (output x input), from the saved tensors and the config, independently."""
    from peft.utils.other import get_pattern_key

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    deltas = {}
    for key in state:
        if ".lora_A." not in key:
            continue
        module = key[len("base_model.model.") : -len(".lora_A.weight")]
        A = state[key].double()
        B = state[key.replace("lora_A", "lora_B")].double()
        r = config["rank_pattern"].get(get_pattern_key(config["rank_pattern"], module), config["r"])
        alpha = config["alpha_pattern"].get(get_pattern_key(config["alpha_pattern"], module), config["lora_alpha"])
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        deltas[module] = scale * B @ A
    return deltas


def merged_deltas(model_cls, aligned_dir, adapter_dir, modules):
    """``W_merged - W_aligned`` per module after ``PeftModel.from_pretrained`` + merge, output x input."""
    from peft import PeftModel

    original = model_cls.from_pretrained(aligned_dir)
    before = {m: original.get_submodule(m).weight.detach().double().clone() for m in modules}
    merged = PeftModel.from_pretrained(model_cls.from_pretrained(aligned_dir), adapter_dir).merge_and_unload()
    out = {}
    for m in modules:
        diff = merged.get_submodule(m).weight.detach().double() - before[m]
        out[m] = diff.T if type(merged.get_submodule(m)).__name__ == "Conv1D" else diff
    return out


def oriented(U, R, fan_in_fan_out):
    return (R.double(), U.double()) if fan_in_fan_out else (U.double(), R.double())


def reference(method, deltas, sub, V, params, fan_in_fan_out, ckpt_name):
    """The dense docs/method.md result for every module of the adapter."""
    out = {}
    for module, dW in deltas.items():
        name = ckpt_name(module)
        U, R = oriented(sub[name].U, sub[name].R, fan_in_fan_out) if sub is not None else (None, None)
        if method == "csulora":
            out[module] = csulora_dense(dW, U, R, params.lam)
        elif method == "csulora-dir":
            out[module] = csulora_dir_dense(dW, U, params.lam)
        elif method == "csulora-signed":
            sigma = sub[name].sigma.double()
            out[module] = csulora_signed_dense(dW, U, R, sigma, params.lam, params.opposing_weight)
        elif method == "project":
            out[module] = parts(dW, U, R)[0]
        elif method == "random":
            U_r, R_r = random_basis(module, U.shape[0], R.shape[0], U.shape[1], params.seed)
            out[module] = csulora_dense(dW, U_r, R_r, params.lam)
        elif method == "scale":
            out[module] = dW
        elif method == "safelora":
            Vm = V[name].double()
            Vm = Vm.T if fan_in_fan_out else Vm
            # B A = dW / 1 is enough: C (s B) A = C dW
            projected, cosine = safelora_dense(dW, torch.eye(dW.shape[1], dtype=dW.dtype), 1.0, Vm)
            out[module] = projected if cosine < params.threshold else dW
    if method == "scale":
        lam = params.match_lam if params.match_lam is not None else params.lam
        target = sum(
            float(
                torch.sum(
                    csulora_dense(dW, *oriented(sub[ckpt_name(m)].U, sub[ckpt_name(m)].R, fan_in_fan_out), lam) ** 2
                )
            )
            for m, dW in deltas.items()
        )
        factor = math.sqrt(target / sum(float(torch.sum(dW**2)) for dW in deltas.values()))
        out = {m: factor * dW for m, dW in deltas.items()}
    return out


def check_round_trip(
    tmp_path, model_cls, base, aligned, adapter, method, params, fan_in_fan_out=False, settings=None, sub_path=None
):
    """Correct ``adapter`` into ``tmp_path`` (computing the subspace there unless ``sub_path`` is given)."""
    if sub_path is None:
        sub_path = tmp_path / "sub.safetensors"
        compute_subspace(base, aligned, adapter=adapter, settings=settings or SubspaceSettings()).save(sub_path)
    sub = load_subspace(sub_path)
    out = tmp_path / f"out-{method}"
    source = BasisSource(base=base, aligned=aligned) if method == "safelora" else BasisSource(sub_path)
    report = correct_adapter(adapter, out, source, method=method, method_settings=params)
    deltas = lora_deltas(adapter)
    aligned_state = read_state(aligned)
    base_state = read_state(base)
    V = {
        k[: -len(".weight")]: aligned_state[k].double() - base_state[k].double()
        for k in aligned_state
        if k.endswith(".weight")
    }

    def ckpt_name(module):
        return next(n for n in V if n == module or module.endswith("." + n) or n.endswith("." + module))

    expected = reference(method, deltas, sub, V, params, fan_in_fan_out, ckpt_name)
    got = merged_deltas(model_cls, aligned, out, list(deltas))
    for module in deltas:
        err = torch.linalg.matrix_norm(got[module] - expected[module]) / torch.linalg.matrix_norm(expected[module])
        assert err < 1e-4, (method, module, float(err))
    assert set(report["modules"]) == {ckpt_name(m) for m in deltas}
    return report, out


LLAMA_METHODS = [
    ("csulora", MethodParams(lam=2.0)),
    ("csulora-dir", MethodParams(lam=2.0)),
    ("csulora-signed", MethodParams(lam=2.0, opposing_weight=3.0)),
    ("project", MethodParams()),
    ("scale", MethodParams(match_lam=2.0)),
    ("random", MethodParams(lam=2.0, seed=3)),
    ("safelora", MethodParams(threshold=0.5)),
]


@pytest.fixture(scope="module")
def llama_subspace(tmp_path_factory, llama_pair, llama_adapter):
    """The Llama pair's subspace, computed once for every method's round trip."""
    path = tmp_path_factory.mktemp("llama-subspace") / "sub.safetensors"
    compute_subspace(*llama_pair, adapter=llama_adapter).save(path)
    return path


@pytest.mark.parametrize("method,params", LLAMA_METHODS, ids=[m for m, _ in LLAMA_METHODS])
def test_llama_every_method(tmp_path, llama_pair, llama_adapter, llama_subspace, method, params):
    from transformers import LlamaForCausalLM

    base, aligned = llama_pair
    report, out = check_round_trip(
        tmp_path, LlamaForCausalLM, base, aligned, llama_adapter, method, params, sub_path=llama_subspace
    )
    assert report["method"] == method
    module = "model.layers.0.self_attn.q_proj"
    row = report["modules"][module]
    assert set(row) >= {"k", "rho_f", "rho_h", "rho_o", "kappa_h", "kappa_o", "rank_in", "rank_out", "truncation_error"}
    if method in ("csulora", "random"):
        assert row["rank_out"] == 2 * row["rank_in"] == 8
        assert row["kappa_h"] == pytest.approx(1 / (1 + 2.0 * row["rho_h"]))
        assert row["kappa_o"] == pytest.approx(1 / (1 + 2.0 * row["rho_o"]))
        assert row["rho_f"] + row["rho_h"] + row["rho_o"] == pytest.approx(1.0)
    if method == "csulora-signed":
        assert row["rank_out"] == 2 * row["rank_in"] + row["opposing_directions"]
        assert row["kappa_opposing"] == pytest.approx(1 / (1 + 2.0 * 3.0))
    if method == "safelora":
        assert {"cosine", "projected"} <= set(row)
        assert row["projected"] == (row["cosine"] < 0.5)


def test_llama_lam_zero_returns_the_adapter(tmp_path, llama_pair, llama_adapter):
    base, aligned = llama_pair
    out = tmp_path / "out"
    correct_adapter(llama_adapter, out, BasisSource(base=base, aligned=aligned), method_settings=MethodParams(lam=0.0))
    before = load_file(str(llama_adapter / "adapter_model.safetensors"))
    after = load_file(str(out / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_llama_keep_mode_reports_truncation(tmp_path, llama_pair, llama_adapter):
    from dense_reference import best_rank

    base, aligned = llama_pair
    sub_path = tmp_path / "sub.safetensors"
    compute_subspace(base, aligned, adapter=llama_adapter).save(sub_path)
    sub = load_subspace(sub_path)
    report = correct_adapter(
        llama_adapter, tmp_path / "keep", BasisSource(sub_path), method_settings=MethodParams(lam=3.0, rank_mode="keep")
    )
    config = json.loads((tmp_path / "keep" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {} and config["r"] == 4
    got = lora_deltas(tmp_path / "keep")
    for module, dW in lora_deltas(llama_adapter).items():
        exact = csulora_dense(dW, sub[module].U.double(), sub[module].R.double(), 3.0)
        approx, error = best_rank(exact, 4)
        assert report["modules"][module]["truncation_error"] == pytest.approx(error, rel=1e-4, abs=1e-8)
        assert report["modules"][module]["rank_out"] == 4
        assert float(torch.linalg.matrix_norm(got[module] - exact) / torch.linalg.matrix_norm(exact)) == pytest.approx(
            error, rel=1e-3, abs=1e-6
        )


def test_safelora_number_mode_projects_the_lowest_cosines_once(tmp_path, llama_pair, llama_adapter):
    base, aligned = llama_pair
    report = correct_adapter(
        llama_adapter,
        tmp_path / "num",
        BasisSource(base=base, aligned=aligned),
        method="safelora",
        method_settings=MethodParams(select="number", num_proj_layers=3),
    )
    rows = report["modules"]
    projected = sorted((r["cosine"], m) for m, r in rows.items() if r["projected"])
    kept = [r["cosine"] for r in rows.values() if not r["projected"]]
    assert len(projected) == 3 and max(c for c, _ in projected) <= min(kept)
    before = lora_deltas(llama_adapter)
    after = lora_deltas(tmp_path / "num")
    aligned_state, base_state = read_state(aligned), read_state(base)
    for _, module in projected:  # projected exactly once: C dW, not C C dW
        V = aligned_state[module + ".weight"].double() - base_state[module + ".weight"].double()
        expected = V @ (V.T @ before[module]) / torch.linalg.matrix_norm(V)
        assert torch.allclose(after[module], expected, rtol=1e-4, atol=1e-6)


def test_rslora_with_rank_and_alpha_patterns(tmp_path, llama_pair):
    from transformers import LlamaForCausalLM

    base, aligned = llama_pair
    adapter = make_adapter(
        LlamaForCausalLM.from_pretrained(aligned),
        tmp_path / "rs",
        seed=5,
        r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3},
    )
    check_round_trip(tmp_path, LlamaForCausalLM, base, aligned, adapter, "csulora", MethodParams(lam=1.5))
    config = json.loads((tmp_path / "out-csulora" / "adapter_config.json").read_text())
    assert config["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 4
    assert config["rank_pattern"]["model.layers.1.mlp.down_proj"] == 12
    # our explicit entries come first, so PEFT's first-match rule picks them
    assert set(list(config["rank_pattern"])[-2:]) == {"q_proj", "layers.1.mlp.down_proj"}


def test_plain_lora_without_rslora_plain_alpha(tmp_path, llama_pair):
    from transformers import LlamaForCausalLM

    base, aligned = llama_pair
    adapter = make_adapter(
        LlamaForCausalLM.from_pretrained(aligned),
        tmp_path / "plain",
        seed=6,
        r=2,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
    )
    check_round_trip(
        tmp_path,
        LlamaForCausalLM,
        base,
        aligned,
        adapter,
        "csulora",
        MethodParams(lam=0.7),
        settings=SubspaceSettings(rank=2),
    )


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("gpt2")
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)).eval()
    save_model(base, root / "base")
    save_model(perturbed(base, seed=2), root / "aligned", max_shard_size="30KB")
    return root / "base", root / "aligned"


@pytest.mark.parametrize("method", ["csulora", "safelora", "csulora-dir", "csulora-signed"])
def test_gpt2_conv1d_fan_in_fan_out(tmp_path, gpt2_pair, method):
    from transformers import GPT2LMHeadModel

    base, aligned = gpt2_pair
    adapter = make_adapter(
        GPT2LMHeadModel.from_pretrained(aligned),
        tmp_path / "lora",
        seed=1,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
    )
    params = MethodParams(lam=2.0, threshold=0.9)
    check_round_trip(tmp_path, GPT2LMHeadModel, base, aligned, adapter, method, params, fan_in_fan_out=True)


@pytest.mark.parametrize("method", ["csulora", "safelora"])
@pytest.mark.parametrize("targets", [["q_proj", "o_proj"], LLAMA_TARGETS], ids=["square", "all"])
def test_fan_in_fan_out_on_linear_modules_is_ignored_as_peft_does(tmp_path, llama_pair, method, targets):
    """PEFT treats an nn.Linear as Linear whatever fan_in_fan_out says (and warns): so does csulora,
    on square modules (where the shapes cannot tell) as on the others."""
    from transformers import LlamaForCausalLM

    from csulora.errors import CsuloraWarning

    base, aligned = llama_pair
    adapter = make_adapter(LlamaForCausalLM.from_pretrained(aligned), tmp_path / "lora", seed=4, target_modules=targets)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"fan_in_fan_out": True}))
    params = MethodParams(lam=2.0, threshold=0.9)
    with pytest.warns(CsuloraWarning, match="fan_in_fan_out is true but module .* is a torch.nn.Linear"):
        check_round_trip(tmp_path, LlamaForCausalLM, base, aligned, adapter, method, params, fan_in_fan_out=False)


def test_a_subspace_that_does_not_fit_says_what_it_is(tmp_path, llama_pair, gpt2_pair, capsys):
    """A basis of another shape (GPT-2's c_fc relabelled as q_proj): the error names both shapes."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from csulora.cli import main

    model = LlamaForCausalLM.from_pretrained(llama_pair[1])
    adapter = make_adapter(model, tmp_path / "lora", target_modules=["q_proj"])
    base, aligned = gpt2_pair
    sub = tmp_path / "gpt2.safetensors"
    assert main(["subspace", "--base", str(base), "--aligned", str(aligned), "--targets", "c_fc", "-o", str(sub)]) == 0
    with safe_open(str(sub), framework="pt") as f:
        meta = json.loads(f.metadata()["csulora"])
    state = load_file(sub)
    bad = tmp_path / "bad.safetensors"
    tensors, modules = {}, {}
    for layer, name in enumerate(meta["modules"]):
        q_proj = f"model.layers.{layer}.self_attn.q_proj"
        tensors |= {f"{q_proj}.{part}": state[f"{name}.{part}"] for part in ("U", "R", "sigma")}
        modules[q_proj] = meta["modules"][name]
    save_file(tensors, str(bad), metadata={"csulora": json.dumps(meta | {"modules": modules, "model_type": None})})
    capsys.readouterr()
    assert main(["inspect", str(adapter), "--subspace", str(bad), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is for is" not in err, err
    assert f"updates a 32 x 32 weight but the subspace in {bad} is 32 x 128;" in err, err


def test_gpt_neox_fused_query_key_value(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=32,
    )
    base_model = GPTNeoXForCausalLM(config).eval()
    base = save_model(base_model, tmp_path / "base")
    aligned = save_model(perturbed(base_model, seed=3), tmp_path / "aligned")
    adapter = make_adapter(
        GPTNeoXForCausalLM.from_pretrained(aligned),
        tmp_path / "lora",
        seed=2,
        target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    )
    report, _ = check_round_trip(tmp_path, GPTNeoXForCausalLM, base, aligned, adapter, "csulora", MethodParams(lam=4.0))
    assert "gpt_neox.layers.0.attention.query_key_value" in report["modules"]


def test_adapter_modules_are_found_from_the_saved_keys(llama_adapter):
    """load_adapter finds every (layer, projection) the PEFT adapter holds, named as in the checkpoint."""
    from csulora.adapter import load_adapter

    adapter = load_adapter(llama_adapter)
    prefixes = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    expected = {
        f"model.layers.{layer}.{prefixes.get(target, 'mlp')}.{target}" for layer in range(2) for target in LLAMA_TARGETS
    }
    assert set(adapter.modules) == expected
    assert all(adapter.factors(m).rank == 4 and adapter.scale(m) == 2.0 for m in adapter.modules)


def tiny_causal_lm(arch: str):
    """A tiny Mistral (sliding-window attention) or Qwen2 (biases on q/k/v) with Llama-like shapes."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch == "mistral":
        return MistralForCausalLM, MistralConfig(**TINY_LLAMA_SHAPES, sliding_window=16)
    return Qwen2ForCausalLM, Qwen2Config(**TINY_LLAMA_SHAPES)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["csulora", "safelora"])
@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_mistral_and_qwen2(tmp_path, arch, method):
    model_cls, config = tiny_causal_lm(arch)
    torch.manual_seed(0)
    base_model = model_cls(config).eval()
    aligned_model = perturbed(base_model, seed=4)
    if arch == "qwen2":  # the biases the architecture adds; alignment moves them too, the LoRA does not
        assert aligned_model.model.layers[0].self_attn.q_proj.bias is not None
        with torch.no_grad():
            for layer in aligned_model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias += 0.1
    base = save_model(base_model, tmp_path / "base")
    aligned = save_model(aligned_model, tmp_path / "aligned", max_shard_size="20KB")
    adapter = make_adapter(model_cls.from_pretrained(aligned), tmp_path / "lora", seed=7)
    report, out = check_round_trip(
        tmp_path, model_cls, base, aligned, adapter, method, MethodParams(lam=2.0, threshold=0.9)
    )
    assert len(report["modules"]) == 7 * 2
    assert not any("bias" in key for key in load_file(str(out / "adapter_model.safetensors")))
