"""PEFT LoRA adapters in and out: config, per-module scaling, fan_in_fan_out, weights.

Module names are those PEFT uses for ``rank_pattern`` (the module's path in the base model, e.g.
``model.layers.0.self_attn.q_proj``); saved keys are ``base_model.model.<module>.lora_A.weight``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import floating, load_pickled, natural_key, read_failure, resolve_local
from .correct import LoraFactors, all_finite
from .errors import CsuloraError, CsuloraWarning

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


# Modules that transformers builds as ``Conv1D`` (weight stored in x out), by model_type; PEFT treats
# every other target as ``torch.nn.Linear`` (out x in), whatever the adapter's fan_in_fan_out says.
_GPT2_CONV1D = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
CONV1D_MODULES = {
    "gpt2": _GPT2_CONV1D,
    "imagegpt": _GPT2_CONV1D,
    "decision_transformer": _GPT2_CONV1D,
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
}


def is_conv1d(model_type: str | None, module: str) -> bool | None:
    """Whether ``module`` of a ``model_type`` model is a ``Conv1D``; None when the model type is unknown."""
    if model_type is None:
        return None
    return module.rsplit(".", 1)[-1] in CONV1D_MODULES.get(model_type, frozenset())


def _pattern_value(pattern: dict, module: str, default: Any) -> Any:
    """PEFT's rule: the first pattern key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class Adapter:
    path: Path
    config: dict
    state: dict[str, torch.Tensor]
    modules: list[str]
    _layouts_warned: set = dataclasses.field(default_factory=set, repr=False, compare=False)

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def rank(self, module: str) -> int:
        return int(_pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"]))

    def alpha(self, module: str) -> float:
        return float(_pattern_value(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"]))

    def scale(self, module: str) -> float:
        """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA, honouring the patterns."""
        r = self.rank(module)
        return self.alpha(module) / (math.sqrt(r) if self.config.get("use_rslora") else r)

    def key(self, module: str, side: str) -> str:
        return f"{KEY_PREFIX}{module}.lora_{side}.weight"

    def update_shape(self, module: str) -> tuple[int, int]:
        """``(m, n)``: the update ``B @ A`` is ``out x in``, whatever the weight's stored layout."""
        return self.state[self.key(module, "B")].shape[0], self.state[self.key(module, "A")].shape[1]

    def check_fits(self, module: str, shape: tuple[int, ...], what: str) -> None:
        """``what`` (a weight, ``V`` or a subspace), of ``shape`` in the update's orientation, must fit the update."""
        m, n = self.update_shape(module)
        if tuple(shape) != (m, n):
            raise CsuloraError(
                f"{self.path}: module {module} updates a {m} x {n} weight but {what} is {' x '.join(map(str, shape))}; "
                "was the adapter trained on a different model?"
            )

    def stored_transposed(self, module: str, stored: tuple[int, ...], model_type: str | None, what: str) -> bool:
        """Whether ``what`` (a weight, ``V`` or a basis) of ``stored`` shape is ``in x out``, by PEFT's rule.

        PEFT goes by the module's class: a ``Conv1D`` is transposed and anything else is an
        ``nn.Linear``, whatever ``fan_in_fan_out`` says (it warns and overrides the flag). The class
        comes from the model type; without one, a weight that fits only one way says it, and only a
        square weight of an unknown model is taken as the flag says. Checks the fit.
        """
        m, n = self.update_shape(module)
        conv1d = is_conv1d(model_type, module)
        if conv1d is None:
            fits = [flip for flip in (False, True) if tuple(stored[::-1] if flip else stored) == (m, n)]
            conv1d = fits[0] if len(fits) == 1 else self.fan_in_fan_out
        self.check_fits(module, tuple(stored[::-1] if conv1d else stored), what)
        if conv1d != self.fan_in_fan_out and conv1d not in self._layouts_warned:
            self._layouts_warned.add(conv1d)  # once per adapter, as PEFT warns once per module class
            kind, flag = ("a Conv1D", "true") if conv1d else ("a torch.nn.Linear", "false")
            warnings.warn(
                f"{self.path}: fan_in_fan_out is {str(self.fan_in_fan_out).lower()} but module {module} is {kind}; "
                f"taken with fan_in_fan_out {flag}, as PEFT does",
                CsuloraWarning,
                stacklevel=2,
            )
        return conv1d

    def factors(self, module: str, dtype: torch.dtype = torch.float64) -> LoraFactors:
        """``dW = s B A`` with ``B: out x r``, ``A: r x in`` (PEFT keeps this order for Conv1D too)."""
        return LoraFactors(
            self.state[self.key(module, "B")].to(dtype),
            self.state[self.key(module, "A")].to(dtype),
            self.scale(module),
        )

    def dtype(self, module: str) -> torch.dtype:
        return self.state[self.key(module, "B")].dtype


def load_adapter(source: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Read and validate a PEFT LoRA adapter directory (or Hub id when online)."""
    path = resolve_local(source, allow_patterns=["*.json", "*.safetensors", "*.md"])
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise CsuloraError(f"{path}: no {CONFIG_NAME}; not a PEFT adapter directory")
    try:
        config = json.loads(config_file.read_text())
    except RecursionError:
        raise CsuloraError(f"{config_file}: invalid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CsuloraError(f"{config_file}: invalid JSON ({exc})") from None
    _check_config(config, config_file)
    state = _load_weights(path, allow_pickle)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CsuloraError(f"{path}: the adapter weights are not a dict of tensors")
    state = {key: floating(tensor, f"{path}: tensor {key}") for key, tensor in state.items()}
    modules = _lora_modules(state, path)
    _check_targets(config, modules, config_file)
    adapter = Adapter(path, config, {_canonical_key(k): v for k, v in state.items()}, modules)
    for module in modules:
        _check_module(adapter, module)
    return adapter


def _names_module(names: str | list[str], module: str) -> bool:
    """PEFT's rule for ``target_modules`` / ``exclude_modules``: a regex matching the whole name, or a list
    of names that the module's name is or ends with (after a dot)."""
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return module in names or any(module.endswith(f".{name}") for name in names)


def _check_targets(config: dict, modules: list[str], file: Path) -> None:
    """Every module the adapter holds weights for must be one PEFT puts a LoRA on when it loads the adapter.

    A module ``target_modules`` does not name (or ``exclude_modules`` does) gets no LoRA layer: PEFT
    would not load its weights (none named: it refuses to load), so correcting them means nothing.
    ``layers_to_transform`` is not checked. ``all-linear`` and no ``target_modules`` cannot be checked here.
    """
    targets, excluded = config.get("target_modules"), config.get("exclude_modules")
    if targets is None or targets == "all-linear":
        return
    for field, names in (("target_modules", targets), ("exclude_modules", excluded or [])):
        if not (isinstance(names, str) or isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise CsuloraError(f"{file}: '{field}' must be a list of names or a pattern, got {json.dumps(names)[:80]}")
        if isinstance(names, str):
            try:
                re.compile(names)
            except re.error as exc:
                raise CsuloraError(f"{file}: {field} {names!r} is not a valid pattern ({exc})") from None
    uncovered = [m for m in modules if not _names_module(targets, m) or excluded and _names_module(excluded, m)]
    if uncovered:
        which = "all" if len(uncovered) == len(modules) else f"{len(uncovered)} of {len(modules)}"
        raise CsuloraError(
            f"{file}: target_modules {json.dumps(targets)[:80]} leaves out {which} of the modules the adapter holds "
            f"weights for (e.g. {uncovered[0]}): PEFT would not load them"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_config(config: dict, file: Path) -> None:
    if not isinstance(config, dict):
        raise CsuloraError(f"{file}: expected a JSON object, got {type(config).__name__}")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CsuloraError(f"{file}: peft_type {peft_type} is not supported (only LORA)")
    if config.get("use_dora"):
        raise CsuloraError(f"{file}: DoRA adapters (use_dora) are not supported yet")
    if config.get("modules_to_save"):
        raise CsuloraError(
            f"{file}: modules_to_save {config['modules_to_save']} are fully trained copies the method does "
            "not cover; not supported yet"
        )
    if config.get("lora_bias"):
        raise CsuloraError(f"{file}: lora_bias adapters are not supported yet")
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise CsuloraError(f"{file}: missing '{field}'")
    if not (isinstance(config["r"], int) and not isinstance(config["r"], bool) and config["r"] >= 1):
        raise CsuloraError(f"{file}: 'r' must be a positive integer, got {config['r']!r}")
    if not _is_number(config["lora_alpha"]):
        raise CsuloraError(f"{file}: 'lora_alpha' must be a finite number, got {config['lora_alpha']!r}")
    for field, valid in (("rank_pattern", lambda v: isinstance(v, int) and v >= 1), ("alpha_pattern", _is_number)):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise CsuloraError(f"{file}: '{field}' must be an object, got {pattern!r}")
        for key, value in pattern.items():
            if not valid(value) or isinstance(value, bool):
                raise CsuloraError(f"{file}: {field}[{key!r}] = {value!r} is not valid")
            try:
                re.compile(key)
            except re.error as exc:
                raise CsuloraError(f"{file}: {field} key {key!r} is not a valid pattern ({exc})") from None
    for field in ("fan_in_fan_out", "use_rslora"):
        if not isinstance(config.get(field, False), bool | None):
            raise CsuloraError(f"{file}: '{field}' must be true or false, got {config[field]!r}")
    if not isinstance(config.get("base_model_name_or_path"), str | None):
        raise CsuloraError(f"{file}: 'base_model_name_or_path' must be a string")


def _load_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS_NAME
    if file.is_file():
        try:
            return load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise read_failure(file, exc) from None
    pickled = path / PICKLE_WEIGHTS_NAME
    if pickled.is_file():
        if not allow_pickle:
            raise CsuloraError(
                f"{pickled}: pickled adapter weights are refused (pickle can run code); allow them (allow_pickle=True) "
                "to load them with weights_only=True"
            )
        return load_pickled(pickled)
    raise CsuloraError(f"{path}: no {WEIGHTS_NAME}")


def _canonical_key(key: str) -> str:
    """Drop an adapter name (``lora_A.default.weight``) that older PEFT versions saved."""
    match = _LORA_KEY.match(key)
    if match and match.group("adapter"):
        return f"{match.group('module')}.lora_{match.group('side')}.weight"
    return key


def _lora_modules(state: dict[str, torch.Tensor], path: Path) -> list[str]:
    modules: dict[str, set] = {}
    for marker, what in (
        ("lora_embedding_", "embedding LoRA (an adapter on an embedding layer)"),
        ("lora_magnitude_vector", "DoRA adapters"),
        ("modules_to_save", "modules_to_save weights"),
        (".base_layer.", "saved base layers (save_embedding_layers: an embedding LoRA)"),
    ):
        found = [key for key in state if marker in key]
        if found:
            raise CsuloraError(f"{path}: {what} ({found[0]}) are not supported yet")
    for key in state:
        match = _LORA_KEY.match(key)
        if not match or not match.group("module").startswith(KEY_PREFIX):
            raise CsuloraError(f"{path}: unexpected adapter tensor {key}")
        modules.setdefault(match.group("module")[len(KEY_PREFIX) :], set()).add(match.group("side"))
    if not modules:
        raise CsuloraError(f"{path}: the adapter holds no LoRA weights")
    for module, sides in modules.items():
        if sides != {"A", "B"}:
            raise CsuloraError(f"{path}: module {module} has lora_{sides.pop()} but not its pair")
    return sorted(modules, key=natural_key)


def _check_module(adapter: Adapter, module: str) -> None:
    A = adapter.state[adapter.key(module, "A")]
    B = adapter.state[adapter.key(module, "B")]
    where = f"{adapter.path}: module {module}"
    if A.dim() != 2 or B.dim() != 2:
        raise CsuloraError(f"{where}: only linear LoRA is supported (got {A.dim()}-D weights)")
    if B.shape[1] != A.shape[0]:
        raise CsuloraError(f"{where}: lora_B is {tuple(B.shape)} but lora_A is {tuple(A.shape)}")
    if A.shape[0] != adapter.rank(module):
        raise CsuloraError(f"{where}: rank {A.shape[0]} but the config says r={adapter.rank(module)}")
    scale = adapter.scale(module)
    if not math.isfinite(scale * scale):
        raise CsuloraError(f"{where}: the scaling lora_alpha / r = {scale:.3g} is out of range")
    if not (all_finite(A) and all_finite(B)):
        raise CsuloraError(f"{where}: NaN or Inf in the LoRA weights")


def write_adapter(adapter: Adapter, out: Path, corrected: dict[str, LoraFactors]) -> None:
    """Write ``corrected`` (every module of ``adapter``) as a PEFT adapter into directory ``out``.

    A module whose rank changed gets explicit ``rank_pattern`` / ``alpha_pattern`` entries, placed
    before the existing ones because PEFT takes the first matching pattern; alpha is set so the
    scaling ``s`` is unchanged, as the factors assume.
    """
    config = json.loads(json.dumps(adapter.config))
    new_ranks, new_alphas = {}, {}
    state = {}
    for module in adapter.modules:
        lora = corrected[module]
        dtype = adapter.dtype(module)
        state[adapter.key(module, "A")] = lora.A.to(dtype).contiguous()
        state[adapter.key(module, "B")] = lora.B.to(dtype).contiguous()
        if lora.rank != adapter.rank(module):
            new_ranks[module] = lora.rank
            divisor = math.sqrt(lora.rank) if config.get("use_rslora") else lora.rank
            new_alphas[module] = adapter.scale(module) * divisor
    if new_ranks:
        config["rank_pattern"] = _prepend(new_ranks, config.get("rank_pattern") or {})
        config["alpha_pattern"] = _prepend(new_alphas, config.get("alpha_pattern") or {})
    for key, tensor in state.items():
        if not all_finite(tensor):  # e.g. a float32 result past the range of a float16 adapter
            raise CsuloraError(f"{adapter.path}: the corrected {key} is not finite in {tensor.dtype}")
    for item in adapter.path.iterdir():
        if item.is_file() and item.name not in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
            shutil.copy2(item, out / item.name)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})


def _prepend(first: dict, rest: dict) -> dict:
    """``first``'s entries, then ``rest``'s other keys: PEFT's first match is then ours."""
    return first | {key: value for key, value in rest.items() if key not in first}
