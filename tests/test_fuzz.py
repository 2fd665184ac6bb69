"""Seeded fuzzing: corrupted safetensors headers, adapter configs and subspace files never produce a
traceback, and never a written output unless the run succeeds with a valid, finite adapter."""

from __future__ import annotations

import json
import random
import shutil
import struct
import time

import pytest
import torch
from safetensors.torch import load_file

from csulora.cli import main

CASES = 300
SEED = 20260530


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def small_pair(llama_pair, tmp_path_factory):
    """A two-module adapter (q_proj of both layers) and its subspace: cheap to correct many times."""
    from conftest import make_adapter
    from transformers import LlamaForCausalLM

    base, aligned = llama_pair
    root = tmp_path_factory.mktemp("fuzz")
    adapter = make_adapter(LlamaForCausalLM.from_pretrained(aligned), root / "lora", target_modules=["q_proj"])
    sub = root / "sub.safetensors"
    assert run("subspace", "--base", base, "--aligned", aligned, "--adapter", adapter, "-o", sub, "-q") == 0
    return adapter, sub


def corrupt_safetensors(data: bytes, rng: random.Random) -> bytes:
    """Damage the 8-byte length or the JSON header of a safetensors file."""
    (length,) = struct.unpack("<Q", data[:8])
    header = bytearray(data[8 : 8 + length])
    kind = rng.randrange(6)
    if kind == 0:  # flip bytes in the header
        for _ in range(rng.randint(1, 4)):
            header[rng.randrange(len(header))] = rng.randrange(256)
    elif kind == 1:  # a plausible but wrong length
        length = rng.choice([0, 1, length - 1, length + 1, length * 2, 2**63, rng.randrange(2**32)])
    elif kind == 2:  # truncate the file
        return data[: rng.randrange(len(data))]
    elif kind == 3:  # change a digit (shapes, offsets)
        digits = [i for i, b in enumerate(header) if chr(b).isdigit()]
        header[rng.choice(digits)] = ord(str(rng.randrange(10)))
    elif kind == 4:  # change a dtype
        text = header.decode("latin-1")
        for old in ("F32", "BF16", "F16"):
            text = text.replace(old, rng.choice(["F64", "I8", "U8", "BOOL", "F8_E4M3", "F16", "XX"]), 1)
        header = bytearray(text.encode("latin-1"))
        length = len(header)
    else:  # delete a span of the header
        i = rng.randrange(len(header))
        del header[i : i + rng.randint(1, 20)]
        length = len(header)
    return struct.pack("<Q", length % 2**64) + bytes(header) + data[8 + len(header) :]


FIELDS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "use_rslora", "peft_type",
          "target_modules", "base_model_name_or_path", "use_dora", "lora_bias"]  # fmt: skip
JUNK = [None, -1, 0, 1, 2.5, 1e308, "x", "", [], {}, True, [1, "a"], {"a": 1}, "NaN", 10**30]


def corrupt_config(text: str, rng: random.Random) -> str:
    """Break ``adapter_config.json``: junk values, dropped keys, or damaged text."""
    kind = rng.randrange(4)
    config = json.loads(text)
    if kind == 0:
        config[rng.choice(sorted(config))] = rng.choice(JUNK)
    elif kind == 1:
        config.pop(rng.choice(sorted(config)))
    elif kind == 2:
        field = rng.choice(FIELDS)
        config[field] = rng.choice(JUNK)
    else:
        chars = list(text)
        for _ in range(rng.randint(1, 3)):
            chars[rng.randrange(len(chars))] = rng.choice('{}[]",:0a\\ \x00')
        return "".join(chars)
    return json.dumps(config)


@pytest.mark.slow
def test_fuzzed_inputs_never_crash_and_never_leave_a_bad_output(tmp_path, small_pair, capsys):
    adapter, sub = small_pair
    rng = random.Random(SEED)
    work = tmp_path / "work"
    files = {
        "weights": (adapter / "adapter_model.safetensors").read_bytes(),
        "config": (adapter / "adapter_config.json").read_text(),
        "subspace": sub.read_bytes(),
    }
    outcomes = {0: 0, 2: 0}
    start = time.monotonic()
    shutil.copytree(adapter, work / "lora")
    bad_sub = work / "sub.safetensors"
    out = work / "out"
    for case in range(CASES):
        shutil.rmtree(out, ignore_errors=True)
        (work / "lora" / "adapter_model.safetensors").write_bytes(files["weights"])
        (work / "lora" / "adapter_config.json").write_text(files["config"])
        bad_sub.write_bytes(files["subspace"])
        target = rng.choice(["weights", "config", "subspace"])
        if target == "weights":
            (work / "lora" / "adapter_model.safetensors").write_bytes(corrupt_safetensors(files["weights"], rng))
        elif target == "config":
            (work / "lora" / "adapter_config.json").write_text(corrupt_config(files["config"], rng))
        else:
            bad_sub.write_bytes(corrupt_safetensors(files["subspace"], rng))
        code = run("correct", work / "lora", "-o", out, "--subspace", bad_sub, "-q")  # a traceback fails the test
        err = capsys.readouterr().err.strip()
        assert code in outcomes, (case, target, err)
        leftovers = [p.name for p in work.iterdir() if p.name.startswith(".")]
        assert leftovers == [], (case, target, leftovers)
        if code == 2:
            assert not out.exists() and err.startswith("csulora: error:") and "\n" not in err, (case, target, err)
        else:  # a harmless corruption (e.g. an unused metadata byte): the output must be a valid adapter
            state = load_file(out / "adapter_model.safetensors")
            assert state and all(torch.isfinite(t).all() for t in state.values()), (case, target)
            json.loads((out / "adapter_config.json").read_text())
        outcomes[code] += 1
    elapsed = time.monotonic() - start
    assert outcomes[2] > CASES // 2, outcomes  # the corruptions mostly break something, and are caught
    assert elapsed < 120, f"{CASES} cases took {elapsed:.0f}s"
