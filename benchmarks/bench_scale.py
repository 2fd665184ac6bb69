"""Speed and memory of `csulora subspace` / `csulora correct` at real model sizes (run by hand, not in CI).

Writes a synthetic (base, aligned) checkpoint pair with the tensor shapes, dtype and sharding of a real
Hugging Face model, plus a PEFT LoRA (r=16, all linear modules), then measures the `csulora` CLI as
subprocesses (wall time, CPU time, peak RSS from wait4) and the naive way (transformers
``from_pretrained`` of both models + full SVD + Safe LoRA's dense ``V V^T``) on a sample of layers.
It also checks the randomized SVD against an exact SVD on the sampled modules and prints one
Markdown report.

    python benchmarks/bench_scale.py                      # Llama-3.2-1B shapes, everything
    python benchmarks/bench_scale.py --shape llama2-7b --layers 4   # 7B shapes, first 4 layers only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TIME = "/usr/bin/time"  # GNU time (apt-get install time)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SHAPES = {
    "tiny": dict(  # for trying the scripts, not for timing
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=1000,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        max_position_embeddings=512,
    ),
    "llama3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=131072,
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        vocab_size=32000,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
}


# -- synthetic checkpoints --------------------------------------------------------------------------
def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, is_target_linear) in HF Llama order."""
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h), False)]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,), False),
            (p + "self_attn.q_proj.weight", (q, h), True),
            (p + "self_attn.k_proj.weight", (kv, h), True),
            (p + "self_attn.v_proj.weight", (kv, h), True),
            (p + "self_attn.o_proj.weight", (h, q), True),
            (p + "post_attention_layernorm.weight", (h,), False),
            (p + "mlp.gate_proj.weight", (i, h), True),
            (p + "mlp.up_proj.weight", (i, h), True),
            (p + "mlp.down_proj.weight", (h, i), True),
        ]
    out.append(("model.norm.weight", (h,), False))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (cfg["vocab_size"], h), False))
    return out


def displacement(shape, generator, rms: float, low_rank: int = 64, noise_share: float = 0.1) -> torch.Tensor:
    """Alignment displacement: low-rank part with a decaying spectrum (1 - noise_share of the energy) + noise."""
    sigma = torch.exp(-torch.arange(min(low_rank, *shape), dtype=torch.float32) / 12.0)
    return shaped_displacement(shape, generator, rms, sigma, noise_share)


def law_displacement(shape, generator, rms: float, alpha: float, head: int = 256) -> torch.Tensor:
    """Displacement whose spectrum follows ``sigma_i ~ i ** -alpha`` (a law fitted on a real pair).

    The top ``head`` values are exact (orthonormal factors); the rest of the law's energy over
    ``min(m, n)`` values is Gaussian noise, whose spectrum is flat enough to stand for that tail.
    """
    rank = min(head, *shape)
    law = torch.arange(1, min(shape) + 1, dtype=torch.float64) ** -alpha
    noise_share = float(torch.sum(law[rank:] ** 2) / torch.sum(law**2))
    return shaped_displacement(shape, generator, rms, law[:rank].float(), noise_share)


def shaped_displacement(shape, generator, rms: float, sigma: torch.Tensor, noise_share: float) -> torch.Tensor:
    """``L diag(sigma) R^T`` (holding 1 - noise_share of ``rms^2 m n``) plus Gaussian noise (the rest)."""
    m, n = shape
    r = len(sigma)
    left = torch.linalg.qr(torch.randn(m, r, generator=generator))[0]
    right = torch.linalg.qr(torch.randn(n, r, generator=generator))[0]
    total = rms**2 * m * n
    sigma = sigma * math.sqrt((1 - noise_share) * total / float(torch.sum(sigma**2)))
    V = (left * sigma) @ right.T
    V += torch.randn(m, n, generator=generator) * math.sqrt(noise_share * total / (m * n))
    return V


def write_pair(
    workdir: Path, cfg: dict, shard_bytes: int, seed: int = 0, laws: dict | None = None
) -> tuple[Path, Path]:
    """``laws``: module type -> alpha of ``sigma_i ~ i ** -alpha`` (``--spectra``), else ``displacement``."""
    from safetensors.torch import save_file

    base_dir, aligned_dir = workdir / "base", workdir / "aligned"
    for d in (base_dir, aligned_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[tuple[dict, dict]] = [({}, {})]
    sizes = [0]
    for name, shape, target in tensor_shapes(cfg):
        if len(shape) == 1:
            W_b = torch.ones(shape)
            W_a = W_b + 0.01 * torch.randn(shape, generator=gen)
        else:
            W_b = torch.randn(shape, generator=gen) * 0.02
            if not target:
                W_a = W_b + 0.0005 * torch.randn(shape, generator=gen)
            elif laws:
                W_a = W_b + law_displacement(shape, gen, rms=0.004, alpha=laws[name.split(".")[-2]])
            else:
                W_a = W_b + displacement(shape, gen, rms=0.004)
        nbytes = W_b.numel() * 2
        if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            _flush(shards, sizes, base_dir, aligned_dir, save_file)
        shards[-1][0][name] = W_b.to(torch.bfloat16)
        shards[-1][1][name] = W_a.to(torch.bfloat16)
        sizes[-1] += nbytes
        del W_b, W_a
    _flush(shards, sizes, base_dir, aligned_dir, save_file)
    # rename shards to HF's model-0000i-of-0000N pattern and write the indexes
    count = len(sizes) - 1
    for d in (base_dir, aligned_dir):
        weight_map = {}
        for idx in range(count):
            final = f"model-{idx + 1:05d}-of-{count:05d}.safetensors"
            (d / f"tmp-{idx}.safetensors").rename(d / final)
            from safetensors import safe_open

            with safe_open(str(d / final), framework="pt") as f:
                weight_map |= {k: final for k in f.keys()}
        total = sum(n * 2 for n in _numels(cfg))
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "torch_dtype": "bfloat16",
            "bos_token_id": 1,
            "eos_token_id": 2,
        } | cfg
        (d / "config.json").write_text(json.dumps(config, indent=2))
    return base_dir, aligned_dir


def _numels(cfg):
    return [math.prod(shape) for _, shape, _ in tensor_shapes(cfg)]


def _flush(shards, sizes, base_dir, aligned_dir, save_file):
    idx = len(sizes) - 1
    for d, tensors in ((base_dir, shards[-1][0]), (aligned_dir, shards[-1][1])):
        save_file(tensors, str(d / f"tmp-{idx}.safetensors"), metadata={"format": "pt"})
    shards[-1] = ({}, {})
    sizes.append(0)


def write_adapter(workdir: Path, cfg: dict, aligned_dir: Path, r: int = 16, seed: int = 1) -> Path:
    from safetensors.torch import save_file

    out = workdir / "adapter"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape, target in tensor_shapes(cfg):
        if not target:
            continue
        module = name[: -len(".weight")]
        m, n = shape
        state[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, n, generator=gen) / math.sqrt(n)
        state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(m, r, generator=gen) * 0.01
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "target_modules": TARGETS,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": str(aligned_dir),
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


# -- measuring a subprocess -------------------------------------------------------------------------
def evict(paths) -> None:
    """Drop the files from the page cache (posix_fadvise DONTNEED) so every run reads from disk."""
    for root in paths:
        for file in Path(root).rglob("*.safetensors"):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(cmd: list[str]) -> dict:
    """Wall, CPU (user + sys) and peak RSS of one child process, by GNU ``/usr/bin/time``.

    ``time`` is a small C program, so the child it forks starts small: a ``wait4`` straight from
    this (large) Python process would report this process's RSS, which survives fork and exec.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        start = time.perf_counter()
        proc = subprocess.run([TIME, "-q", "-f", "%e %U %S %M", "-o", stats.name, *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        elapsed, user, system, max_kb = stats.read().split()[-4:]
    return {"wall": wall, "cpu": float(user) + float(system), "rss_mb": int(max_kb) / 1024, "stdout": proc.stdout}


def csulora_cmd(*args) -> list[str]:
    exe = shutil.which("csulora") or str(Path(sys.executable).with_name("csulora"))
    return [exe, *args]


# -- the naive way (run as a subprocess of this script) ---------------------------------------------
def naive_worker(args) -> None:
    """transformers from_pretrained of both models, then per sampled module: V, full SVD, Safe LoRA's V V^T."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16)
    aligned = AutoModelForCausalLM.from_pretrained(args.aligned, dtype=torch.bfloat16)
    load = time.perf_counter() - t0
    weights_b = dict(base.named_parameters())
    weights_a = dict(aligned.named_parameters())
    timings, exact = {}, {}
    for module in args.modules.split(","):
        t = time.perf_counter()
        V = weights_a[module + ".weight"].detach().float() - weights_b[module + ".weight"].detach().float()
        U, S, Vh = torch.linalg.svd(V, full_matrices=False)
        t_svd = time.perf_counter() - t
        C = V @ V.T / torch.linalg.norm(V)  # Safe LoRA's dense m x m projection
        t_all = time.perf_counter() - t
        timings[module] = {"svd": t_svd, "total": t_all}
        keep = min(args.keep_exact, S.numel())
        exact[f"{module}.U"] = U[:, :keep].contiguous()
        exact[f"{module}.R"] = Vh[:keep].T.contiguous()
        exact[f"{module}.S"] = S.contiguous()
        del V, U, S, Vh, C
    save_file(exact, args.exact_out)
    print(json.dumps({"load": load, "modules": timings}))


# -- the read floor (run as a subprocess of this script) -------------------------------------------
def read_worker(args) -> None:
    """Stream both checkpoints' target weights tensor by tensor, as ``subspace`` reads them, and nothing else."""
    from csulora.checkpoint import Checkpoint

    base, aligned = Checkpoint(args.base), Checkpoint(args.aligned)
    nbytes = 0
    t = time.perf_counter()
    for module in aligned.linear_modules(args.modules.split(",")):
        for ckpt in (base, aligned):
            W = ckpt.read(ckpt.weight_key(module))
            nbytes += W.numel() * W.element_size()
            del W
    print(json.dumps({"bytes": nbytes, "seconds": time.perf_counter() - t}))


# -- accuracy of the randomized SVD -----------------------------------------------------------------
def accuracy(base_dir: Path, aligned_dir: Path, exact_file: Path, modules: list[str], settings_grid):
    from safetensors import safe_open

    from csulora.checkpoint import Checkpoint
    from csulora.pair import read_delta
    from csulora.svd import SubspaceSettings, choose_rank, module_basis

    base, aligned = Checkpoint(base_dir), Checkpoint(aligned_dir)
    rows = []
    with safe_open(str(exact_file), framework="pt") as f:
        for p, q in settings_grid:
            energy_ratios, angles_u, angles_r, times, k_match = [], [], [], [], 0
            for module in modules:
                V = read_delta(base, aligned, module).V
                U_e, R_e, S_e = (f.get_tensor(f"{module}.{s}") for s in "URS")
                total = float(torch.sum(V.double() ** 2))
                t = time.perf_counter()
                b = module_basis(V, SubspaceSettings(oversample=p, power_iters=q))
                times.append(time.perf_counter() - t)
                k = b.k
                k_exact = choose_rank(S_e, total, 0.8, 256)
                k_match += k == k_exact
                captured = float(torch.linalg.norm(b.U.T.double() @ V.double()) ** 2)
                best = float(torch.sum(S_e[:k].double() ** 2))
                energy_ratios.append(captured / best)
                angles_u.append(largest_angle(b.U, U_e[:, :k]))
                angles_r.append(largest_angle(b.R, R_e[:, :k]))
            rows.append(
                {
                    "p": p,
                    "q": q,
                    "energy_ratio_min": min(energy_ratios),
                    "angle_u_max": max(angles_u),
                    "angle_r_max": max(angles_r),
                    "k_match": f"{k_match}/{len(modules)}",
                    "time": sum(times),
                }
            )
    return rows


def overlap(base_dir: Path, aligned_dir: Path, modules: list[str]) -> dict:
    """Read only, compute only (one module at a time, torch's threads), and stream_bases (two modules at a
    time, one thread each on 2 cores): the last gains from the overlap and from the split together."""
    from csulora.checkpoint import Checkpoint
    from csulora.pair import read_delta
    from csulora.subspace_stream import stream_bases
    from csulora.svd import SubspaceSettings, module_basis

    base, aligned = Checkpoint(base_dir), Checkpoint(aligned_dir)
    settings = SubspaceSettings()
    evict([base_dir, aligned_dir])
    t = time.perf_counter()
    deltas = [read_delta(base, aligned, m) for m in modules]
    read = time.perf_counter() - t
    t = time.perf_counter()
    for delta in deltas:
        module_basis(delta.V, settings, delta.energy)
    compute = time.perf_counter() - t
    del deltas
    evict([base_dir, aligned_dir])
    t = time.perf_counter()
    for _ in stream_bases(base, aligned, modules, settings):
        pass
    pipelined = time.perf_counter() - t
    return {"read": read, "compute": compute, "pipelined": pipelined}


def largest_angle(A: torch.Tensor, B: torch.Tensor) -> float:
    """Largest principal angle (degrees) between the column spaces of orthonormal A and B."""
    s = torch.linalg.svdvals(A.double().T @ B.double())
    return math.degrees(math.acos(min(1.0, float(s.min()))))


def load_laws(path: Path) -> dict[str, float]:
    """Module type -> alpha of ``sigma_i ~ i ** -alpha`` from a spectra file of ``real_spectra.py``."""
    return {kind: row["alpha"] for kind, row in json.loads(path.read_text())["types"].items()}


# -- the report -------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama3.2-1b")
    parser.add_argument("--layers", type=int, default=None, help="only the first N layers (default: all)")
    parser.add_argument("--workdir", type=Path, default=HERE / "out")
    parser.add_argument("--sample-layers", default="0,7", help="layers timed against the naive way (0,7)")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="shard size of the synthetic checkpoints")
    parser.add_argument("--reuse", action="store_true", help="reuse checkpoints already in --workdir")
    parser.add_argument("--skip-naive", action="store_true", help="no naive run (and no accuracy check)")
    parser.add_argument("--warm", action="store_true", help="do not evict the checkpoints from the page cache")
    parser.add_argument("--cleanup", action="store_true", help="delete the generated checkpoints at the end")
    parser.add_argument("--spectra", type=Path, help="fitted laws from real_spectra.py (default: decay + noise)")
    parser.add_argument("--naive-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--read-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--aligned", help=argparse.SUPPRESS)
    parser.add_argument("--modules", help=argparse.SUPPRESS)
    parser.add_argument("--exact-out", help=argparse.SUPPRESS)
    parser.add_argument("--keep-exact", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_worker:
        naive_worker(args)
        return
    if args.read_worker:
        read_worker(args)
        return

    cfg = dict(SHAPES[args.shape])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    laws = None
    if args.spectra:
        laws = load_laws(args.spectra)
    work = args.workdir / (args.shape + (f"-L{args.layers}" if args.layers else "") + ("-law" if laws else ""))
    work.mkdir(parents=True, exist_ok=True)
    base_dir, aligned_dir, adapter_dir = work / "base", work / "aligned", work / "adapter"
    t = time.perf_counter()
    if not (args.reuse and (aligned_dir / "model.safetensors.index.json").is_file()):
        write_pair(work, cfg, int(args.shard_gb * 2**30), laws=laws)
    if not (args.reuse and (adapter_dir / "adapter_config.json").is_file()):
        write_adapter(work, cfg, aligned_dir)
    gen_time = time.perf_counter() - t
    ckpt_gb = sum(f.stat().st_size for f in base_dir.glob("*.safetensors")) / 1e9
    print(f"checkpoints ready in {gen_time:.0f} s ({ckpt_gb:.2f} GB each) under {work}", file=sys.stderr)

    layers = cfg["num_hidden_layers"]
    sample = [int(x) for x in args.sample_layers.split(",") if int(x) < layers]
    sample_modules = [
        f"model.layers.{i}.{part}.{name}"
        for i in sample
        for part, names in (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:]))
        for name in names
    ]
    prep = (lambda: None) if args.warm else (lambda: evict([base_dir, aligned_dir]))
    rows = []

    def run(label, cmd, scope, note=""):
        prep()
        result = measure(cmd)
        rows.append({"step": label, "scope": scope, **result, "note": note})
        print(
            f"{label} [{scope}]: {result['wall']:.2f} s wall, {result['cpu']:.2f} s cpu, "
            f"{result['rss_mb']:.0f} MB peak RSS",
            file=sys.stderr,
        )
        return result

    baseline = run(
        "baseline: python -c 'import csulora.cli; import csulora.pipeline'",
        [sys.executable, "-c", "import csulora.cli, csulora.pipeline"],
        "-",
    )
    read_cmd = [sys.executable, __file__, "--read-worker", "--base", str(base_dir), "--aligned", str(aligned_dir),
                "--modules", ",".join(TARGETS)]  # fmt: skip
    floor = run("read floor: stream both checkpoints' target weights, no compute", read_cmd, "all layers")
    warm_floor = measure(read_cmd)  # right after the cold run: the page cache holds what fits
    rows.append({"step": "read floor, warm page cache", "scope": "all layers", **warm_floor, "note": ""})
    sub_full = work / "subspace.safetensors"
    sub_sample = work / "subspace-sample.safetensors"
    full = run(
        "csulora subspace",
        csulora_cmd(
            "subspace",
            "--base",
            str(base_dir),
            "--aligned",
            str(aligned_dir),
            "--targets",
            ",".join(TARGETS),
            "-o",
            str(sub_full),
            "--force",
            "-q",
        ),
        f"all {layers} layers, {7 * layers} modules",
    )
    ours_sample = run(
        "csulora subspace",
        csulora_cmd(
            "subspace",
            "--base",
            str(base_dir),
            "--aligned",
            str(aligned_dir),
            "--targets",
            ",".join(m[len("model.") :] for m in sample_modules),
            "-o",
            str(sub_sample),
            "--force",
            "-q",
        ),
        f"layers {args.sample_layers} ({len(sample_modules)} modules)",
    )
    corrected = work / "corrected"
    run(
        "csulora correct --subspace",
        csulora_cmd("correct", str(adapter_dir), "-o", str(corrected), "--subspace", str(sub_full), "--force", "-q"),
        f"adapter r=16 on {7 * layers} modules",
    )
    run(
        "csulora correct --method safelora",
        csulora_cmd(
            "correct",
            str(adapter_dir),
            "-o",
            str(work / "corrected-safelora"),
            "--method",
            "safelora",
            "--base",
            str(base_dir),
            "--aligned",
            str(aligned_dir),
            "--force",
            "-q",
        ),
        f"adapter r=16 on {7 * layers} modules",
        "streams V per module (no subspace)",
    )

    naive, acc, ov = None, [], None
    exact_file = work / "exact-sample.safetensors"
    if not args.skip_naive:
        naive = run(
            "naive (transformers + full SVD + V V^T)",
            [
                sys.executable,
                __file__,
                "--naive-worker",
                "--base",
                str(base_dir),
                "--aligned",
                str(aligned_dir),
                "--modules",
                ",".join(sample_modules),
                "--exact-out",
                str(exact_file),
            ],
            f"layers {args.sample_layers} ({len(sample_modules)} modules)",
            "loads both full models",
        )
        detail = json.loads(naive["stdout"].strip().splitlines()[-1])
        naive["load"] = detail["load"]
        naive["compute"] = sum(v["total"] for v in detail["modules"].values())
        naive["svd"] = sum(v["svd"] for v in detail["modules"].values())
        acc = accuracy(base_dir, aligned_dir, exact_file, sample_modules, [(10, 0), (10, 1), (10, 2), (20, 2), (10, 3)])
        ov = overlap(base_dir, aligned_dir, sample_modules)

    # -- the report --
    sizes = [math.prod(shape) for _, shape, target in tensor_shapes(cfg) if target]
    pair_mb = 2 * max(sizes) * 2 / 2**20
    out = [
        f"## csulora at {args.shape} shapes" + (f" (first {layers} layers only)" if args.layers else ""),
        "",
        f"Date {date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), load average at the end "
        f"{os.getloadavg()[0]:.1f} (other jobs share the cores: wall times are noisy, CPU times less so). "
        f"Checkpoints: bf16, "
        f"{ckpt_gb:.2f} GB each, sharded with an index; page cache "
        + ("warm" if args.warm else "evicted (posix_fadvise DONTNEED) before every run")
        + ".",
        "",
        "| step | scope | wall s | CPU s | peak RSS MB | RSS - baseline MB | (RSS - baseline) / largest pair |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        extra = row["rss_mb"] - baseline["rss_mb"]
        out.append(
            f"| {row['step']} | {row['scope']} | {row['wall']:.2f} | {row['cpu']:.2f} | {row['rss_mb']:.0f} | "
            f"{extra:.0f} | {extra / pair_mb:.1f} |"
        )
    read = json.loads(floor["stdout"].strip().splitlines()[-1])
    out += [
        "",
        f"Read floor: {read['bytes'] / 1e9:.2f} GB of target weights read in {read['seconds']:.1f} s in-process "
        f"({read['bytes'] / 1e9 / read['seconds']:.2f} GB/s); `subspace` / read floor (whole processes, "
        + ("warm" if args.warm else "cold")
        + f" cache): **{full['wall'] / floor['wall']:.2f}** wall, {full['cpu'] / max(floor['cpu'], 1e-9):.2f} CPU.",
        "",
        f"Largest module pair (base + aligned, bf16): {pair_mb:.0f} MB. Subspace file: "
        f"{sub_full.stat().st_size / 2**20:.0f} MB ({_k_summary(sub_full)}).",
    ]
    if naive:
        frac = len(sample) / layers
        naive_full = naive["load"] + naive["compute"] / frac
        out += [
            "",
            f"Naive way on layers {args.sample_layers}: {naive['wall']:.1f} s wall = "
            f"{naive['load']:.1f} s loading both models with `from_pretrained` + {naive['svd']:.1f} s full SVD + "
            f"{naive['compute'] - naive['svd']:.1f} s Safe LoRA `V V^T`; peak RSS {naive['rss_mb']:.0f} MB.",
            f"- same sample, ours: {ours_sample['wall']:.1f} s wall, {ours_sample['rss_mb']:.0f} MB -> "
            f"**{naive['wall'] / ours_sample['wall']:.1f}x faster**, "
            f"{naive['rss_mb'] / ours_sample['rss_mb']:.1f}x less memory (measured);",
            f"- whole model: naive extrapolated (load + compute x {1 / frac:.0f}) {naive_full:.0f} s vs ours "
            f"measured {full['wall']:.1f} s -> **{naive_full / full['wall']:.1f}x faster** (extrapolated).",
            "",
            "Randomized vs exact SVD on the sampled modules (k by energy 0.8, cap 256):",
            "",
            "| oversample p | power iters q | min captured-energy ratio | max angle U (deg) | "
            "max angle R (deg) | k equal to exact | time s |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in acc:
            out.append(
                f"| {r['p']} | {r['q']} | {r['energy_ratio_min']:.6f} | {r['angle_u_max']:.3f} | "
                f"{r['angle_r_max']:.3f} | {r['k_match']} | {r['time']:.2f} |"
            )
        out += [
            "",
            f"Overlap and two-module split on the sampled modules (in-process, cold): read only {ov['read']:.1f} s, "
            f"compute only {ov['compute']:.1f} s, sum {ov['read'] + ov['compute']:.1f} s; "
            f"stream_bases pipelined {ov['pipelined']:.1f} s.",
        ]
    print("\n".join(out))
    (work / "report.md").write_text("\n".join(out) + "\n")
    if args.cleanup:
        for d in (base_dir, aligned_dir):
            shutil.rmtree(d, ignore_errors=True)


def _k_summary(path: Path) -> str:
    from csulora.subspace import load_subspace

    ks = [m["k"] for m in load_subspace(path).bases.meta.values()]
    return f"k from {min(ks)} to {max(ks)}, mean {sum(ks) / len(ks):.1f}"


if __name__ == "__main__":
    main()
