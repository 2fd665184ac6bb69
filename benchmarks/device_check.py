"""Quiet-machine figures for issue 10, in one run on a lent machine (driven by ``device_check.sh``).

Steps, each bounded in time; ``results.json`` is rewritten after every step, so a run cut short still
returns what it measured:

1. ``correct`` whole process at Llama-2-7B shape with a cached subspace (synthetic r=16 adapter on all
   224 linear modules, synthetic subspace file with k = 24), pinned to 2 cores, 2 threads; plus
   ``import torch`` and ``import csulora.cli`` alone for the import share, and the floor: a process
   that imports torch, reads the adapter and every basis and writes an adapter of the corrected
   rank, with no check and no algebra (``--correct-floor-worker``).
2. At Llama-3.2-1B shape with the real pair's power-law spectra (``benchmarks/spectra/``): the read
   floor (both checkpoints' target weights streamed, no compute) cold and warm, then ``csulora
   subspace`` with the adaptive (block Krylov) sketch and with the full-width sketch (``--full-width``:
   ``randomized_svd(V, max_rank)`` truncated to k, the behaviour before the adaptive sketch), both
   cold, pinned to 2 cores, 2 threads; k per module and largest angles between the two.
3. ``bench_cuda.py`` at Llama-2-7B shape (first ``--cuda-layers`` layers) on the GPU against the CPU
   reference on every core.

Pinned runs use ``taskset -c 0,1`` and ``OMP_NUM_THREADS=2``; CPU seconds come from ``getrusage`` of
the children. Generation and the CPU reference of step 3 use every core.

``--before SRC`` (the ``src`` folder of an older checkout) also times ``correct`` and the adaptive
``subspace`` of that code on the same files in the same run, for before/after figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_scale import (  # noqa: E402
    SHAPES,
    TARGETS,
    TIME,
    evict,
    largest_angle,
    load_laws,
    tensor_shapes,
    write_adapter,
    write_pair,
)

PINNED = ["taskset", "-c", "0,1"] if shutil.which("taskset") else []  # results.json says which
SPECTRA = HERE / "spectra" / "smollm2-135m-refusal-sft.json"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


BEFORE_SRC: Path | None = None  # --before: an older checkout's src folder


def run_child(cmd: list[str], timeout: float, pinned: bool = True, src: Path | None = None) -> dict:
    """Wall and CPU seconds and peak RSS (None without GNU time) of one child, pinned to 2 cores and 2 threads.

    ``src``: import csulora from this folder instead (``--before``).
    """
    env = dict(os.environ) | ({"PYTHONPATH": str(src)} if src else {})
    if pinned:
        env |= {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
        cmd = PINNED + cmd
    # a forked child's peak RSS counts the parent's pages until it execs (here: a model pair's worth),
    # so the peak comes from GNU time, which forks the command from its own small process
    rss_file = tempfile.NamedTemporaryFile("r", suffix=".rss")
    if Path(TIME).is_file():
        cmd = [TIME, "-f", "%M", "-o", rss_file.name, *cmd]
    with rss_file, tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        killer = threading.Timer(max(1.0, timeout), proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, peak RSS included
        finally:
            killer.cancel()
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr, rss_kb = out.read(), err.read(), rss_file.read().strip().splitlines()
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "peak_rss_mb": round(int(rss_kb[-1]) / 1024, 1) if rss_kb else None,  # GNU time reports kilobytes
        "stdout": stdout,
    }


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "csulora.cli", *args]


def machine() -> dict:
    model = next(
        (row.split(":", 1)[1].strip() for row in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in row),
        platform.processor(),
    )
    info = {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


# -- step 1: correct at 7B shape with a cached subspace ---------------------------------------------
def synthetic_subspace(cfg: dict, path: Path, k: int) -> None:
    from csulora.subspace import Subspace
    from csulora.svd import ModuleBasis

    g = torch.Generator().manual_seed(2)
    bases = {}
    for name, shape, target in tensor_shapes(cfg):
        if target:
            m, n = shape
            U = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
            R = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
            sigma = torch.arange(k, 0, -1, dtype=torch.float32)
            bases[name[: -len(".weight")]] = ModuleBasis(U, R, sigma, float(torch.sum(sigma**2)) / 0.8)
    Subspace(bases, {"settings": {"energy": 0.8}}).save(path, force=True)


def correct_floor_worker(adapter: str, subspace: str, out: str) -> None:
    """What ``correct`` cannot avoid, and nothing else: import torch, read the adapter and every basis,
    write an adapter of the corrected rank (each factor twice, as the rank-2r closed form has it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(subspace, framework="pt") as f:
        checksum = sum(float(f.get_tensor(key).sum()) for key in f.keys())  # touch every page
    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), framework="pt") as f:
        doubled = {key: torch.cat([f.get_tensor(key)] * 2, dim=1 if "lora_B" in key else 0) for key in f.keys()}
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(doubled, str(Path(out) / "adapter_model.safetensors"))
    shutil.copy(Path(adapter) / "adapter_config.json", out)
    print(json.dumps({"checksum": checksum}))


def step_correct(work: Path, shape: str, results: dict, deadline: float) -> None:
    cfg = dict(SHAPES[shape])
    adapter = write_adapter(work, cfg, work / "no-model")
    sub = work / "subspace.safetensors"
    synthetic_subspace(cfg, sub, k=24)
    out = work / "corrected"
    rows = {
        "import_torch": run_child([sys.executable, "-c", "import torch"], deadline - time.time()),
        "import_csulora_cli": run_child([sys.executable, "-c", "import csulora.cli"], deadline - time.time()),
    }
    cmd = cli("correct", str(adapter), "-o", str(out), "--subspace", str(sub), "-q")
    floor = [sys.executable, __file__, "--correct-floor-worker", str(adapter), str(sub), str(out)]
    for label, src, command in (("", None, cmd), ("_before", BEFORE_SRC, cmd), ("_floor", None, floor)):
        if label == "_before" and src is None:
            continue
        runs = []
        for _ in range(3):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_child(command, deadline - time.time(), src=src))
        rows[f"correct_runs{label}"] = [{k: v for k, v in r.items() if k != "stdout"} for r in runs]
        rows[f"correct_best{label}"] = min(rows[f"correct_runs{label}"], key=lambda r: r["wall_s"])
    for r in rows.values():
        if isinstance(r, dict):
            r.pop("stdout", None)
    results["correct_7b"] = rows | {"modules": sum(t for _, _, t in tensor_shapes(cfg)), "r": 16, "k": 24}


# -- step 2: 1B subspace, read floor, adaptive against full width ------------------------------------
def full_width_worker(argv: list[str]) -> None:
    """``csulora subspace`` with energy mode's sketch forced to the full width (the behaviour before)."""
    from csulora import cli as csulora_cli
    from csulora import svd

    def full_width(V, total_energy, tau, max_rank, *, oversample=10, power_iters=2, seed=0):
        U, sigma, R = svd.randomized_svd(V, max_rank, oversample=oversample, power_iters=power_iters, seed=seed)
        k = svd.choose_rank(sigma, total_energy, tau, min(max_rank, *V.shape))
        return U[:, :k], sigma[:k], R[:, :k]

    svd.adaptive_svd = full_width
    sys.exit(csulora_cli.main(argv))


def compare_subspaces(a_path: Path, b_path: Path) -> dict:
    from csulora.subspace import load_subspace

    a, b = load_subspace(a_path), load_subspace(b_path)
    same_k, identical, angles, ks = 0, 0, [], []
    for name in a.modules():
        x, y = a[name], b[name]
        ks.append(x.k)
        if x.k == y.k:
            same_k += 1
            identical += all(torch.equal(p, q) for p, q in ((x.U, y.U), (x.R, y.R), (x.sigma, y.sigma)))
            angles += [largest_angle(x.U, y.U), largest_angle(x.R, y.R)]
    return {
        "modules": len(ks),
        "same_k": same_k,
        "bit_identical": identical,  # an angle has a float32 floor of about 0.04 degrees; equality has none
        "k_min_median_max": [min(ks), sorted(ks)[len(ks) // 2], max(ks)] if ks else None,
        "largest_angle_deg": max(angles) if angles else None,
    }


def step_subspace(work: Path, shape: str, layers: int | None, results: dict, deadline: float) -> None:
    cfg = dict(SHAPES[shape]) | ({"num_hidden_layers": layers} if layers else {})
    laws = load_laws(SPECTRA)
    t = time.perf_counter()
    base, aligned = write_pair(work, cfg, 2**30, laws=laws)
    rows: dict = {"layers": cfg["num_hidden_layers"], "generate_s": round(time.perf_counter() - t, 1)}
    results["subspace_1b"] = rows
    log(f"pair written in {rows['generate_s']} s")
    from csulora.checkpoint import Checkpoint

    modules = ",".join(Checkpoint(aligned).linear_modules(TARGETS))
    read = [sys.executable, str(HERE / "bench_scale.py"), "--read-worker", "--modules", modules]
    read += ["--base", str(base), "--aligned", str(aligned)]
    for label in ("read_floor_cold", "read_floor_warm"):
        if label.endswith("cold"):
            evict([base, aligned])
        r = run_child(read, deadline - time.time())
        rows[label] = {k: v for k, v in r.items() if k != "stdout"} | json.loads(r["stdout"].strip().splitlines()[-1])
        log(f"{label}: {rows[label]}")
    common = ["--base", str(base), "--aligned", str(aligned), "--targets", ",".join(TARGETS), "--force", "-q"]
    outputs = {}
    runs = [("subspace_adaptive", cli("subspace", *common, "-o", str(work / "adaptive.safetensors")), None)]
    if BEFORE_SRC is not None:
        before = cli("subspace", *common, "-o", str(work / "before.safetensors"))
        runs.append(("subspace_adaptive_before", before, BEFORE_SRC))
    for label, cmd, src in (
        *runs,
        (
            "subspace_full_width",
            [
                sys.executable,
                __file__,
                "--full-width-worker",
                "subspace",
                *common,
                "-o",
                str(work / "full.safetensors"),
            ],
            None,
        ),
    ):
        evict([base, aligned])
        r = run_child(cmd, deadline - time.time(), src=src)
        rows[label] = {k: v for k, v in r.items() if k != "stdout"}
        outputs[label] = Path(cmd[cmd.index("-o") + 1])
        log(f"{label}: {rows[label]}")
        write(results)
    rows["adaptive_vs_full_width"] = compare_subspaces(outputs["subspace_full_width"], outputs["subspace_adaptive"])
    if "subspace_adaptive_before" in outputs:
        before = outputs["subspace_adaptive_before"]
        rows["adaptive_vs_before"] = compare_subspaces(before, outputs["subspace_adaptive"])
    floor = rows["read_floor_cold"]
    for label in ("subspace_adaptive", "subspace_full_width", "subspace_adaptive_before"):
        if label not in rows:
            continue
        rows[label]["over_cold_read_floor_wall"] = round(rows[label]["wall_s"] / floor["wall_s"], 2)
        rows[label]["over_cold_read_floor_cpu"] = round(rows[label]["cpu_s"] / floor["cpu_s"], 2)
    rows["speedup_cpu"] = round(rows["subspace_full_width"]["cpu_s"] / rows["subspace_adaptive"]["cpu_s"], 2)
    rows["speedup_wall"] = round(rows["subspace_full_width"]["wall_s"] / rows["subspace_adaptive"]["wall_s"], 2)
    if "subspace_adaptive_before" in rows:
        for unit in ("cpu", "wall"):
            old_s, new_s = rows["subspace_adaptive_before"][f"{unit}_s"], rows["subspace_adaptive"][f"{unit}_s"]
            rows[f"speedup_over_before_{unit}"] = round(old_s / new_s, 2)


# -- step 3: the GPU against the CPU ------------------------------------------------------------------
def step_cuda(work: Path, shape: str, layers: int, device: str, results: dict, deadline: float) -> None:
    report = work / "bench_cuda.json"
    cmd = [sys.executable, str(HERE / "bench_cuda.py"), "--shape", shape, "--layers", str(layers), "--device", device]
    cmd += ["--workdir", str(work), "--spectra", str(SPECTRA), "--json", str(report)]
    env_start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, deadline - time.time()))
    results["cuda"] = {"wall_s": round(time.perf_counter() - env_start, 1), "returncode": proc.returncode}
    print(proc.stdout[-6000:], proc.stderr[-3000:], flush=True)
    if report.is_file():
        results["cuda"] |= json.loads(report.read_text())


OUT_FILE: Path = Path("results.json")


def write(results: dict) -> None:
    OUT_FILE.write_text(json.dumps(results, indent=2))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--full-width-worker":
        full_width_worker(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--correct-floor-worker":
        correct_floor_worker(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results.json goes here")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/csulora-device-check"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and the CPU as 'device': a dry run")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds for all steps (400)")
    parser.add_argument("--cuda-layers", type=int, default=4, help="7B layers compared on the GPU (4)")
    parser.add_argument("--layers-1b", type=int, default=None, help="1B layers (default all 16)")
    parser.add_argument("--steps", default="correct_7b,subspace_1b,cuda", help="which steps (all three)")
    parser.add_argument("--before", type=Path, help="src folder of an older checkout, timed too (correct, subspace)")
    args = parser.parse_args()
    global OUT_FILE, BEFORE_SRC
    BEFORE_SRC = args.before.resolve() if args.before else None
    args.out.mkdir(parents=True, exist_ok=True)
    OUT_FILE = args.out / "results.json"
    start = time.time()
    big, small = ("tiny", "tiny") if args.tiny else ("llama2-7b", "llama3.2-1b")
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    pinned = "taskset -c 0,1, " if PINNED else "NOT pinned (no taskset), "
    results: dict = {"machine": machine(), "tiny": args.tiny, "pinned": pinned + "OMP_NUM_THREADS=2"}
    if BEFORE_SRC is not None:  # which code the "before" runs really import
        where = [sys.executable, "-c", "import csulora; print(csulora.__version__, csulora.__file__)"]
        results["before"] = run_child(where, 60, pinned=False, src=BEFORE_SRC)["stdout"].strip()
    write(results)
    # budget shares: correct 15%, 1B subspace 55%, GPU check the rest
    steps = (
        ("correct_7b", 0.15, lambda d: step_correct(args.workdir / "correct", big, results, d)),
        ("subspace_1b", 0.70, lambda d: step_subspace(args.workdir / "sub1b", small, args.layers_1b, results, d)),
        ("cuda", 1.0, lambda d: step_cuda(args.workdir / "cuda", big, args.cuda_layers, device, results, d)),
    )
    for label, share, step in steps:
        if label not in args.steps.split(","):
            continue
        deadline = start + share * args.budget
        log(f"{label}: until +{deadline - start:.0f} s")
        try:
            step(deadline)
        except Exception as exc:  # keep going: later steps still report
            results.setdefault("errors", {})[label] = f"{type(exc).__name__}: {exc}"[:3000]
            log(f"{label} FAILED: {exc}")
        shutil.rmtree(args.workdir / {"correct_7b": "correct", "subspace_1b": "sub1b", "cuda": "cuda"}[label], True)
        results["elapsed_s"] = round(time.time() - start, 1)
        write(results)
    log(json.dumps(results, indent=2))
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
