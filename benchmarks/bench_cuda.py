"""`csulora subspace --device cuda` against the CPU at Llama-2-7B shapes (run by hand on a GPU machine).

Writes (or reuses, with ``--reuse``) the synthetic 7B-shaped pair of ``bench_scale.py``, computes the
subspace of every targeted module on the GPU and on the CPU, and checks that they agree: the same k
per module, the largest principal angle between the two top-k bases (U and R) at most ``--max-angle``
degrees, singular values within ``--rtol``. Prints timings and exits 1 on any disagreement.

    python benchmarks/bench_cuda.py --layers 4            # 28 modules, ~3.4 GB per checkpoint
    python benchmarks/bench_cuda.py --device cpu --shape tiny --layers 2   # dry run without a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_scale import SHAPES, TARGETS, largest_angle, load_laws, write_pair  # noqa: E402


def timed_subspace(base: Path, aligned: Path, device: str, settings):
    from csulora import compute_subspace

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    subspace = compute_subspace(base, aligned, targets=TARGETS, settings=settings, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return subspace, time.perf_counter() - start


def compare(reference, other, max_angle: float, rtol: float) -> list[dict]:
    """One row per module; ``ok`` is False where k differs or the bases or spectra disagree."""
    rows = []
    for name in reference.modules():
        a, b = reference[name], other[name]
        row = {"module": name, "k_cpu": a.k, "k_other": b.k}
        if a.k == b.k:
            row["angle_U"] = largest_angle(a.U, b.U)
            row["angle_R"] = largest_angle(a.R, b.R)
            row["sigma_rel"] = float(torch.max(torch.abs(a.sigma.double() - b.sigma.double()) / a.sigma.double()))
            row["ok"] = max(row["angle_U"], row["angle_R"]) <= max_angle and row["sigma_rel"] <= rtol
        else:
            row["ok"] = False
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama2-7b")
    parser.add_argument("--layers", type=int, default=4, help="first N layers (default 4)")
    parser.add_argument("--device", default="cuda", help="device checked against the CPU (default cuda)")
    parser.add_argument("--workdir", type=Path, default=HERE / "out")
    parser.add_argument("--spectra", type=Path, help="fitted laws from real_spectra.py")
    parser.add_argument("--reuse", action="store_true", help="reuse checkpoints already in --workdir")
    parser.add_argument("--max-angle", type=float, default=1.0, help="degrees (1.0)")
    parser.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance on sigma (1e-3)")
    parser.add_argument("--json", type=Path, help="also write the timings and per-module rows here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here; pass --device cpu for a dry run", file=sys.stderr)
        return 2

    from csulora.svd import SubspaceSettings

    cfg = dict(SHAPES[args.shape]) | {"num_hidden_layers": args.layers}
    laws = None
    if args.spectra:
        laws = load_laws(args.spectra)
    work = args.workdir / f"{args.shape}-L{args.layers}{'-law' if laws else ''}"
    base, aligned = work / "base", work / "aligned"
    if not (args.reuse and (aligned / "model.safetensors.index.json").is_file()):
        work.mkdir(parents=True, exist_ok=True)
        write_pair(work, cfg, 2**30, laws=laws)

    settings = SubspaceSettings()
    timed_subspace(base, aligned, args.device, settings)  # warm-up: CUDA context, kernels, page cache
    other, t_other = timed_subspace(base, aligned, args.device, settings)
    reference, t_cpu = timed_subspace(base, aligned, "cpu", settings)
    rows = compare(reference, other, args.max_angle, args.rtol)
    bad = [row for row in rows if not row["ok"]]
    for row in rows:
        detail = (
            f"angle U {row['angle_U']:.3f} R {row['angle_R']:.3f} deg, sigma rel {row['sigma_rel']:.1e}"
            if "angle_U" in row
            else "k differs"
        )
        print(f"{'ok ' if row['ok'] else 'BAD'} {row['module']}: k {row['k_cpu']} / {row['k_other']}, {detail}")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(
        f"{args.shape}, first {args.layers} layers, {len(rows)} modules: {args.device} ({name}) {t_other:.1f} s, "
        f"cpu ({torch.get_num_threads()} threads) {t_cpu:.1f} s; {len(rows) - len(bad)}/{len(rows)} modules agree"
    )
    if args.json:
        summary = {"shape": args.shape, "layers": args.layers, "device": args.device, "device_name": name}
        summary |= {"device_s": t_other, "cpu_s": t_cpu, "cpu_threads": torch.get_num_threads()}
        summary |= {"modules": len(rows), "agree": len(rows) - len(bad), "rows": rows}
        angles = [max(row["angle_U"], row["angle_R"]) for row in rows if "angle_U" in row]
        summary["largest_angle_deg"] = max(angles, default=None)
        args.json.write_text(json.dumps(summary, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
