"""The performance-tuned paths give the same results as the straightforward ones."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from csulora.checkpoint import Checkpoint
from csulora.errors import CsuloraError
from csulora.pair import float32_difference, iter_deltas, read_delta
from csulora.sources import BasisSource
from csulora.svd import SubspaceSettings, displacement_energy, module_basis


def _checkpoint(path, tensors):
    path.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return Checkpoint(path)


def _pair(tmp_path, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base, aligned = {}, {}
    for i, shape in enumerate([(40, 24), (24, 40), (16, 16)]):
        W = torch.randn(shape, generator=g) * 0.02
        base[f"layers.{i}.proj.weight"] = W.to(dtype)
        aligned[f"layers.{i}.proj.weight"] = (W + 0.005 * torch.randn(shape, generator=g)).to(dtype)
    return _checkpoint(tmp_path / "base", base), _checkpoint(tmp_path / "aligned", aligned), base, aligned


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (1500, 33), (2049, 5), (512, 700)])
def test_displacement_energy_matches_float64_sum(shape):
    g = torch.Generator().manual_seed(1)
    # entries spread over six orders of magnitude, as in a displacement with a few large directions
    V = torch.randn(shape, generator=g) * 10 ** (6 * torch.rand(shape, generator=g) - 3)
    straightforward = math.fsum(V.double().flatten().pow(2).tolist())
    assert displacement_energy(V) == pytest.approx(straightforward, rel=1e-7)
    assert displacement_energy(V, run=7) == pytest.approx(straightforward, rel=1e-7)
    if V.numel() < 256:  # no full run: the tail is squared in float64, exactly
        assert displacement_energy(V) == pytest.approx(straightforward, rel=1e-14)


def test_float32_difference_overflows_silently_as_torch_does(recwarn):
    """bfloat16 reaches beyond float32's range in a difference: inf, left to read_delta's check, no warning."""
    a = torch.tensor([[3e38, float("inf"), 1.0]], dtype=torch.bfloat16)
    b = torch.tensor([[-3e38, float("inf"), 1.0]], dtype=torch.bfloat16)
    V = float32_difference(a, b)
    assert V[0, 0] == float("inf") and V[0, 1].isnan() and V[0, 2] == 0
    assert not recwarn.list


def test_displacement_energy_falls_back_to_float64_beyond_float32_squares():
    huge = torch.full((600, 3), 3e19)  # finite, but its float32 squares overflow
    tiny = torch.full((600, 3), 1e-24)  # its float32 squares underflow to zero or denormals
    lone = torch.zeros(600, 3)
    lone[599, 0] = 1e-24  # one underflowing entry among zeros: not a zero displacement
    for V in (huge, tiny, lone):
        assert displacement_energy(V) == pytest.approx(float(torch.sum(V.double() ** 2)), rel=1e-12)


def test_a_zero_displacement_needs_no_float64_pass(monkeypatch):
    import csulora.svd as svd

    def refuse(V):
        raise AssertionError("float64 pass on a zero V")

    monkeypatch.setattr(svd, "_float64_energy", refuse)
    assert displacement_energy(torch.zeros(600, 3)) == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_displacement_energy_is_not_finite_when_V_is_not(bad):
    V = torch.randn(600, 5)
    V[599, 4] = bad  # in the tail past the last full run
    assert not math.isfinite(displacement_energy(V))
    V[0, 0] = bad
    assert not math.isfinite(displacement_energy(V))


@pytest.mark.parametrize("shape", [(), (1, 1), (5, 3), (257, 4), (600, 9), (3, 2, 7)])
@pytest.mark.parametrize(
    "dtypes",
    [(torch.bfloat16,) * 2, (torch.float16,) * 2, (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
)
def test_float32_difference_is_torchs_float32_subtraction(shape, dtypes):
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randn(shape, generator=g) * 10 ** (8 * torch.rand(shape, generator=g) - 4) for _ in range(2))
    a, b = a.to(dtypes[0]), b.to(dtypes[1])
    # values a shift must carry exactly: signed zeros, infinities, NaN, the smallest subnormal bfloat16
    special = torch.tensor([-0.0, float("inf"), -float("inf"), float("nan"), 9.2e-41]).to(dtypes[0])
    flat = a.view(-1)
    flat[: min(flat.numel(), 5)] = special[: flat.numel()]
    expected = a.float() - b.float()
    before = a.clone()
    for rows in (1, 2, 256):
        V = float32_difference(a, b, rows=rows)
        assert V.dtype == torch.float32 and V.shape == a.shape
        assert torch.equal(V.view(torch.int32), expected.view(torch.int32))  # same bits, a lone NaN's included
    # non-contiguous weights (a transposed view from a pickled checkpoint) give the same numbers
    if a.dim() == 2:
        assert torch.equal(float32_difference(a.T, b.T).view(torch.int32), expected.T.contiguous().view(torch.int32))
    # the weights are left as they were (a float32 minuend is copied, not subtracted from in place)
    assert torch.equal(a.float().view(torch.int32), before.float().view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def testread_delta_matches_straightforward(tmp_path, dtype):
    base, aligned, W_b, W_a = _pair(tmp_path, dtype)
    modules = [f"layers.{i}.proj" for i in range(3)]
    for module in modules:
        V = read_delta(base, aligned, module).V
        key = module + ".weight"
        assert V.dtype == torch.float32
        assert torch.equal(V, W_a[key].float() - W_b[key].float())
    # the prefetching iterator yields the same, in order
    streamed = list(iter_deltas(base, aligned, modules))
    assert [m for m, *_ in streamed] == modules
    for delta, expected in zip(streamed, modules, strict=True):
        again = read_delta(base, aligned, expected)
        assert delta.module == expected and torch.equal(delta.V, again.V)
        assert (delta.digest_base, delta.digest_aligned) == (again.digest_base, again.digest_aligned)
        assert delta.energy == pytest.approx(float(torch.sum(again.V.double() ** 2)), rel=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("side", ["base", "aligned"])
def testread_delta_names_the_checkpoint_with_nonfinite_weights(tmp_path, bad, side):
    W = torch.randn(8, 4).to(torch.bfloat16)
    broken = W.clone()
    broken[3, 1] = bad
    base = _checkpoint(tmp_path / "base", {"m.weight": broken if side == "base" else W})
    aligned = _checkpoint(tmp_path / "aligned", {"m.weight": broken if side == "aligned" else W})
    with pytest.raises(CsuloraError, match=f"{side}: module m has NaN or Inf"):
        read_delta(base, aligned, "m")


def testread_delta_refuses_float32_overflow(tmp_path):
    big = torch.full((4, 4), 3e38)
    base = _checkpoint(tmp_path / "base", {"m.weight": -big})
    aligned = _checkpoint(tmp_path / "aligned", {"m.weight": big})
    with pytest.raises(CsuloraError, match="overflows float32"):
        read_delta(base, aligned, "m")


def test_module_basis_matches_exact_svd_on_low_rank_plus_noise():
    g = torch.Generator().manual_seed(3)
    m, n, r = 300, 200, 12
    left = torch.linalg.qr(torch.randn(m, r, generator=g))[0]
    right = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
    V = (left * torch.exp(-torch.arange(r) / 3.0)) @ right.T + 1e-3 * torch.randn(m, n, generator=g)
    basis = module_basis(V, SubspaceSettings(max_rank=64))
    U, S, Vh = torch.linalg.svd(V.double(), full_matrices=False)
    total = float(torch.sum(V.double() ** 2))
    assert basis.total_energy == pytest.approx(total, rel=1e-7)
    k = basis.k
    assert k == int(torch.nonzero(torch.cumsum(S**2, 0) >= 0.8 * total)[0]) + 1
    cosines = torch.linalg.svdvals(basis.U.double().T @ U[:, :k])
    assert float(cosines.min()) > 1 - 1e-6
    assert torch.allclose(basis.sigma.double(), S[:k], rtol=1e-5)


def test_torch_threads_restores_the_count_even_on_error():
    from csulora.threads import torch_threads

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_small_corrections_run_on_one_thread_large_ones_on_all(monkeypatch, llama_adapter, llama_pair, tmp_path):
    """Each module's correction runs on the threads its size calls for; the results do not change."""
    from dataclasses import replace

    from csulora import correct_adapter
    from csulora.methods import METHODS
    from csulora.threads import PARALLEL_MIN_FLOPS, correction_flops, threads_for, torch_threads

    outside = torch.get_num_threads()
    assert threads_for(PARALLEL_MIN_FLOPS / 2) == 1
    assert threads_for(PARALLEL_MIN_FLOPS) == outside
    with torch_threads(1):  # big work inside a one-thread block still gets every thread
        assert threads_for(PARALLEL_MIN_FLOPS) == outside
    assert correction_flops(4096, 4096, 16, 32, False) < PARALLEL_MIN_FLOPS  # 7B attention, csulora
    assert correction_flops(11008, 4096, 16, 32, True) > PARALLEL_MIN_FLOPS  # 7B mlp, Safe LoRA's V

    seen = []
    method = METHODS["csulora"]

    def spy(lora, inputs, params):
        seen.append(torch.get_num_threads())
        return method.correct(lora, inputs, params)

    monkeypatch.setitem(METHODS, "csulora", replace(method, correct=spy))
    base, aligned = llama_pair
    correct_adapter(llama_adapter, tmp_path / "out", BasisSource(base=base, aligned=aligned))
    assert seen and set(seen) == {1}


def test_ordered_map_keeps_order_sets_threads_per_worker_and_bounds_the_work_in_flight():
    import threading
    import time

    from csulora.threads import ordered_map

    before = torch.get_num_threads()
    running, peak, lock = [0], [0], threading.Lock()
    consumed = []

    def work(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01 * (i % 3))  # later items often finish first
        with lock:
            running[0] -= 1
        return i, torch.get_num_threads(), len(consumed)

    results = []
    for result in ordered_map(work, range(12), workers=2, threads_each=1):
        results.append(result)
        consumed.append(result)
    assert [i for i, _, _ in results] == list(range(12))
    assert {threads for _, threads, _ in results} == {1}
    # an item starts only once all but `workers` of the items before it were handed out
    assert all(i - seen <= 3 for i, _, seen in results)
    assert peak[0] <= 2
    assert torch.get_num_threads() == before  # the caller's own count is untouched


def _count_in_a_new_thread() -> int:
    import threading

    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_ordered_map_worker_keeps_its_count_and_later_threads_get_the_callers():
    """A worker whose first product comes after the other worker reset the default keeps its count;
    afterwards a newly started thread gets the caller's count, not the one outside it."""
    import time

    from csulora.threads import ordered_map, torch_threads

    def work(i):
        if i == 1:
            time.sleep(0.3)  # item 0 finishes and resets the default first
        torch.ones(64, 64) @ torch.ones(64, 64)
        return torch.get_num_threads()

    with torch_threads(1):
        assert list(ordered_map(work, range(2), workers=2, threads_each=1)) == [1, 1]
        assert _count_in_a_new_thread() == 1
    if torch.get_num_threads() > 1:  # on a 1-core machine the two counts are the same
        with torch_threads(1):
            assert list(ordered_map(work, range(2), workers=2, threads_each=2)) == [2, 2]
            assert _count_in_a_new_thread() == 1


def test_ordered_map_closed_early_starts_no_more_work():
    from csulora.threads import ordered_map

    started = []

    def work(i):
        started.append(i)
        return i

    results = ordered_map(work, range(100), workers=2, threads_each=1)
    assert next(results) == 0
    results.close()  # the consumer stops: the pool shuts down, pending items are cancelled
    assert max(started) <= 3


def test_ordered_map_raises_the_first_error_and_cancels_the_rest():
    from csulora.threads import ordered_map

    started = []

    def work(i):
        started.append(i)
        if i == 2:
            raise CsuloraError("module 2 is broken")
        return i

    got = []
    with pytest.raises(CsuloraError, match="module 2 is broken"):
        for value in ordered_map(work, range(50), workers=2, threads_each=1):
            got.append(value)
    assert got == [0, 1]
    assert max(started) <= 5  # the 50 items were not all started


def test_streamed_bases_equal_one_module_at_a_time(tmp_path):
    """Two modules at a time on their own threads gives each module the basis it gets alone."""
    from csulora.subspace_stream import compute_subspace
    from csulora.threads import available_threads, torch_threads

    base, aligned, _, _ = _pair(tmp_path, torch.float32)
    settings = SubspaceSettings(energy=0.9)
    streamed = compute_subspace(base, aligned, targets=["proj"], settings=settings)
    assert streamed.modules() == [f"layers.{i}.proj" for i in range(3)]
    with torch_threads(max(1, available_threads() // 2)):
        for name in streamed.modules():
            alone = module_basis(read_delta(base, aligned, name).V, settings)
            got = streamed[name]
            assert got.k == alone.k and got.total_energy == alone.total_energy
            assert torch.allclose(got.U, alone.U, atol=1e-6) and torch.allclose(got.R, alone.R, atol=1e-6)
