"""Unit tests for bitmar.memory: exact Larimar least-squares memory, sequential writes, forgetting and the store."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

import bitmar.memory.larimar as larimar_module
from bitmar.memory import EpisodicMemory, EpisodicStore, MemoryState

TOL = 1e-4  # the exactness bound promised for float32 reads with N <= min(K, C)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """The solves here are small: one thread is as fast unloaded and avoids OpenMP spin-waits on a busy CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def projection(Q: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of the rows of Q onto span(rows of Z), float64 reference via QR."""
    basis, _ = torch.linalg.qr(Z.double().mT)  # (C, N) orthonormal columns spanning the rows of Z (Z full row rank)
    return Q.double() @ basis @ basis.mT


def proj_err(read: torch.Tensor, Q: torch.Tensor, Z: torch.Tensor) -> float:
    """Distance of a read from the exact projection of Q onto span(Z), relative to the queries' norm."""
    return float((read.detach().double() - projection(Q, Z)).norm() / Q.double().norm())


def make(K: int, C: int, seed: int = 0, **kw: float) -> EpisodicMemory:
    """A memory in eval mode with a frozen prior (tests that need its gradient switch it back on)."""
    torch.manual_seed(seed)
    return EpisodicMemory(K, C, **kw).eval().requires_grad_(False)


def states_equal(a: MemoryState, b: MemoryState) -> bool:
    da, db = a.state_dict(), b.state_dict()
    return da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)


# ---------------------------------------------------------------------------------------------------------------------
# exactness of write / read
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("K", "C", "N"), [(64, 32, 1), (64, 32, 16), (64, 32, 32), (32, 64, 32), (512, 768, 16), (512, 768, 512)]
)
def test_write_then_read_recalls_episodes_and_projects_queries(K: int, C: int, N: int) -> None:
    """Key property: read(Z) == Z and read(q) == orthogonal projection of q onto span(Z) for N <= min(K, C)."""
    mem = make(K, C)
    Z = torch.randn(N, C)
    Q = torch.randn(8, C)
    state = mem.write(Z)
    Z_read, W = mem.read(torch.cat([Z, Q]), state)
    assert Z_read.shape == (N + 8, C) and W.shape == (N + 8, K)
    assert Z_read.dtype == torch.float32 and state.memory.dtype == torch.float32
    assert rel(Z_read[:N], Z) <= TOL
    assert proj_err(Z_read[N:], Q, Z) <= TOL
    if N < C:  # a generic query is not in the span: the read really projected, it did not echo the query
        assert rel(Z_read[N:], Q) > 0.1


def test_read_projection_holds_with_a_learned_non_orthogonal_prior() -> None:
    mem = make(64, 32, seed=2)
    with torch.no_grad():
        mem.prior.mul_(torch.rand(64, 1) * 3 + 0.1).add_(0.3 * torch.randn(64, 32))  # skewed, still full rank
    Z, Q = torch.randn(24, 32), torch.randn(10, 32)
    state = mem.write(Z)
    assert rel(mem.read(Z, state)[0], Z) <= TOL
    assert proj_err(mem.read(Q, state)[0], Q, Z) <= TOL


@pytest.mark.parametrize(("K", "C", "N"), [(64, 32, 32), (512, 768, 512)])
def test_write_kv_then_read_kv_returns_values(K: int, C: int, N: int) -> None:
    mem = make(K, C, seed=3)
    keys, values = torch.randn(N, C), torch.randn(N, C)
    state = mem.write_kv(keys, values)
    values_read, W = mem.read_kv(keys, state)
    assert W.shape == (N, K)
    assert rel(values_read, values) <= TOL


def test_read_kv_of_nearby_key_returns_approximately_the_value() -> None:
    mem = make(512, 768, seed=4)
    keys, values = torch.randn(16, 768), torch.randn(16, 768)
    state = mem.write_kv(keys, values)
    noisy = keys + 0.01 * keys.norm(dim=-1, keepdim=True) / math.sqrt(768) * torch.randn_like(keys)  # 1% noise
    values_read, _ = mem.read_kv(noisy, state)
    err = rel(values_read, values)
    assert err < 0.05
    other, _ = mem.read_kv(torch.randn(16, 768), state)  # unrelated keys do not return the values
    assert rel(other, values) > 0.5


def test_kv_recall_fails_beyond_the_min_k_c_bound() -> None:
    """Documented bound: with C < K the addressing keys M0^+ has rank <= C, so N > C keys cannot all be recalled."""
    mem = make(64, 32, seed=5)
    keys, values = torch.randn(48, 32), torch.randn(48, 32)
    values_read, _ = mem.read_kv(keys, mem.write_kv(keys, values))
    assert rel(values_read, values) > 0.1


# ---------------------------------------------------------------------------------------------------------------------
# numerical robustness
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("K", "C"), [(64, 32), (32, 64)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_no_nan_and_scale_invariant_recall(K: int, C: int, scale: float) -> None:
    mem = make(K, C, seed=6)
    for N in (1, K, 2 * K):
        Z = scale * torch.randn(N, C)
        state = mem.write(Z)
        Z_read, W = mem.read(Z, state)
        for t in (state.memory, state.precision, state.moment, Z_read, W):
            assert torch.isfinite(t).all()
        if N <= min(K, C):
            assert rel(Z_read, Z) <= TOL
        else:  # least squares: the read can not be further from Z than Z itself (it is a projection)
            assert rel(Z_read, Z) <= 1.0 + 1e-5
        Q_read, W_q = mem.read(scale * torch.randn(5, C), state)
        assert torch.isfinite(Q_read).all() and torch.isfinite(W_q).all()


def test_zero_episodes_and_zero_queries_stay_finite() -> None:
    mem = make(32, 16)
    state = mem.write(torch.zeros(4, 16))
    Z_read, W = mem.read(torch.randn(3, 16), state)
    assert torch.isfinite(Z_read).all() and torch.isfinite(W).all()
    assert float(Z_read.abs().max()) == 0.0  # an all-zero memory holds nothing to read
    Z_read, W = mem.read(torch.zeros(3, 16), mem.write(torch.randn(4, 16)))
    assert float(Z_read.abs().max()) == 0.0 and float(W.abs().max()) == 0.0


def test_nearly_collinear_episodes_stay_finite() -> None:
    mem = make(64, 32, seed=7)
    base = torch.randn(1, 32)
    Z = base + 1e-7 * torch.randn(16, 32)  # numerically rank one
    state = mem.write(Z)
    Z_read, W = mem.read(Z, state)
    assert torch.isfinite(Z_read).all() and torch.isfinite(W).all()
    assert rel(Z_read, Z) <= 1e-3  # the shared direction is recalled; differences below the cutoff are dropped


def test_float32_fallback_path_is_accurate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Devices without float64 (MPS) solve in float32 with SVD: still exact to 1e-4 for well-conditioned episodes."""
    monkeypatch.setattr(larimar_module, "work_dtype", lambda device: torch.float32)
    mem = make(64, 48, seed=8)
    Z, Q = torch.randn(16, 48), torch.randn(6, 48)
    state = mem.write(Z)
    assert state.precision.dtype == torch.float32
    assert rel(mem.read(Z, state)[0], Z) <= TOL
    assert proj_err(mem.read(Q, state)[0], Q, Z) <= TOL
    Z2 = torch.randn(8, 48)
    both = mem.update(state, Z2, alpha=1.0)
    assert rel(mem.read(torch.cat([Z, Z2]), both)[0], torch.cat([Z, Z2])) <= 1e-3


def test_bfloat16_autocast_gives_finite_float_outputs() -> None:
    mem = make(64, 32, seed=9)
    proj = torch.nn.Linear(32, 32)
    x = torch.randn(16, 32)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        Z = proj(x)
        assert Z.dtype == torch.bfloat16  # the episodes really come in as bf16
        state = mem.write(Z)
        Z_read, W = mem.read(Z, state)
        kl = mem.kl_divergence(W)
    assert state.memory.dtype == torch.float32 and state.precision.dtype == torch.float64
    assert Z_read.dtype == torch.bfloat16 and W.dtype == torch.bfloat16  # outputs in the input dtype
    assert torch.isfinite(Z_read.float()).all() and torch.isfinite(W.float()).all() and torch.isfinite(kl)
    assert rel(Z_read.float(), Z.float()) <= 1e-2  # exact up to the final bf16 rounding (~4e-3)


# ---------------------------------------------------------------------------------------------------------------------
# sequential writes and forgetting
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("K", "C", "N1", "N2"), [(64, 48, 12, 8), (32, 64, 20, 12)])
def test_update_matches_batch_write_and_forgetting_is_exact(K: int, C: int, N1: int, N2: int) -> None:
    mem = make(K, C, seed=10)
    Z1, Z2, Q = torch.randn(N1, C), torch.randn(N2, C), torch.randn(10, C)
    Z12 = torch.cat([Z1, Z2])
    s1 = mem.write(Z1)
    s12 = mem.update(s1, Z2, alpha=1.0)
    batch = mem.write(Z12)
    assert s12.num_episodes == N1 + N2
    assert rel(s12.memory, batch.memory) <= TOL
    assert rel(mem.read(Z12, s12)[0], Z12) <= TOL
    assert rel(mem.read(Q, s12)[0], mem.read(Q, batch)[0]) <= TOL

    lazy = mem.accumulate(mem.accumulate(s1, Z2[:3]), Z2[3:])  # statistics only, one solve at the end
    assert torch.equal(lazy.memory, s1.memory)  # accumulate leaves the memory matrix stale by design
    assert rel(mem.solve(lazy).memory, batch.memory) <= TOL

    forgot = mem.update(s12, Z2, alpha=-1.0)
    assert forgot.num_episodes == N1
    assert rel(forgot.memory, s1.memory) <= TOL
    assert rel(mem.read(Z1, forgot)[0], Z1) <= TOL  # the others are still recalled
    assert rel(mem.read(Q, forgot)[0], mem.read(Q, s1)[0]) <= TOL  # same read behaviour as Z1 alone
    assert rel(mem.read(Z2, forgot)[0], Z2) > 0.3  # forgotten episodes are no longer recalled
    assert rel(mem.read(Z2, s12)[0], Z2) <= TOL  # ... although they were before


def test_update_from_empty_state_equals_write_and_forgetting_everything_returns_the_prior() -> None:
    mem = make(48, 32, seed=11)
    Z = torch.randn(10, 32)
    empty = mem.empty_state()
    assert empty.num_episodes == 0 and torch.equal(empty.memory, mem.prior.detach())
    s = mem.update(empty, Z)
    assert rel(s.memory, mem.write(Z).memory) <= TOL
    back = mem.update(s, Z, alpha=-1.0)
    assert back.num_episodes == 0 and torch.equal(back.memory, mem.prior.detach())
    assert float(back.precision.abs().max()) == 0.0
    with pytest.raises(ValueError, match="cannot forget"):
        mem.update(back, Z, alpha=-1.0)


def test_update_with_explicit_kv_addressing_supports_key_value_editing() -> None:
    mem = make(64, 32, seed=12)
    k1, v1, k2, v2 = (torch.randn(8, 32) for _ in range(4))
    s = mem.write_kv(k1, v1)
    s = mem.update(s, v2, alpha=1.0, W=mem.address(k2))
    assert rel(mem.read_kv(torch.cat([k1, k2]), s)[0], torch.cat([v1, v2])) <= TOL
    s = mem.update(s, v1, alpha=-1.0, W=mem.address(k1))
    assert rel(mem.read_kv(k2, s)[0], v2) <= TOL
    assert rel(mem.read_kv(k1, s)[0], v1) > 0.3


# ---------------------------------------------------------------------------------------------------------------------
# training behaviour
# ---------------------------------------------------------------------------------------------------------------------


def test_gradients_reach_episodes_queries_and_prior() -> None:
    mem = make(64, 32, seed=13).train().requires_grad_(True)
    Z = torch.randn(8, 32, requires_grad=True)
    Zq = torch.randn(5, 32, requires_grad=True)
    state = mem.write(Z)
    Z_read, W = mem.read(Zq, state)
    loss = (Z_read - torch.randn(5, 32)).square().mean() + 0.1 * mem.kl_divergence(W)
    loss.backward()
    for g in (Z.grad, Zq.grad, mem.prior.grad):
        assert g is not None and torch.isfinite(g).all() and float(g.abs().max()) > 0.0


@pytest.mark.parametrize(("K", "C"), [(7, 5), (5, 7)])
def test_write_read_gradients_match_finite_differences(K: int, C: int) -> None:
    """float64 episodes keep the whole path in float64, so autograd can be checked against finite differences."""
    torch.manual_seed(14)
    Z = torch.randn(3, C, dtype=torch.float64, requires_grad=True)
    Zq = torch.randn(2, C, dtype=torch.float64, requires_grad=True)
    prior = EpisodicMemory(K, C).prior.detach().double().requires_grad_(True)

    def write_read(z: torch.Tensor, zq: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = EpisodicMemory(K, C).eval()
        del m.prior
        m.prior = p  # functional prior so that gradcheck differentiates w.r.t. it
        z_read, w = m.read(zq, m.write(z))
        return z_read, w

    assert torch.autograd.gradcheck(write_read, (Z, Zq, prior), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_eval_read_is_deterministic_and_train_read_is_noisy() -> None:
    mem = make(64, 32, seed=15)
    Z = torch.randn(8, 32)
    state = mem.write(Z)
    a, Wa = mem.read(Z, state)
    b, Wb = mem.read(Z, state)
    assert torch.equal(a, b) and torch.equal(Wa, Wb)
    mem.train()
    c, Wc = mem.read(Z, state)
    d, _ = mem.read(Z, state)
    assert not torch.equal(c, d)
    assert rel(c, a) > 1e-3  # the addressing noise changes the readout
    assert rel(Wc, Wa) <= TOL  # the returned W is the noise-free mean of q(W)
    kc, _ = mem.read_kv(Z, state)
    mem.eval()
    ke, _ = mem.read_kv(Z, state)
    assert rel(kc, ke) > 1e-3


@pytest.mark.parametrize("training", [False, True])
def test_read_never_modifies_the_state(training: bool) -> None:
    mem = make(64, 32, seed=16).train(training)
    Z = torch.randn(8, 32, requires_grad=True)
    state = mem.write(Z)
    before = state.detach().clone()
    mem.read(torch.randn(6, 32), state)
    mem.read_kv(torch.randn(6, 32), state)
    mem.diagnostics(state)
    assert states_equal(state, before)
    mem.update(state, torch.randn(4, 32))  # update returns a new state, the old one is untouched too
    assert states_equal(state, before)


def test_kl_divergence() -> None:
    mem = make(32, 16, seed=17, addressing_noise_std=0.1)
    W = torch.randn(10, 32)
    kl = mem.kl_divergence(W)
    expected = 0.5 * (0.01 + W.square() - 1.0 - math.log(0.01)).sum(-1).mean()
    assert kl.ndim == 0 and float(kl) >= 0.0
    assert math.isclose(float(kl), float(expected), rel_tol=1e-5)
    assert float(mem.kl_divergence(torch.zeros(4, 32), std=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(mem.kl_divergence(torch.full((4, 32), 1e-3), std=1.0)) == pytest.approx(0.5 * 32 * 1e-6, rel=1e-3)
    assert float(mem.kl_divergence(W, std=1.0)) > float(mem.kl_divergence(0.5 * W, std=1.0))
    with pytest.raises(ValueError):
        mem.kl_divergence(W, std=0.0)


def test_diagnostics_shapes_and_ranges() -> None:
    K = 64
    mem = make(K, 32, seed=18)
    state = mem.write(torch.randn(16, 32))
    _, W = mem.read(torch.randn(7, 32), state)
    for d in (mem.diagnostics(state), mem.diagnostics(state, W)):
        assert d["usage"].shape == (K,) and float(d["usage"].sum()) == pytest.approx(1.0, abs=1e-5)
        assert float(d["usage"].min()) >= 0.0
        assert d["age"].shape == (K,) and int(d["age"].min()) >= 0
        assert 0.0 <= d["active_pct"] <= 100.0
        assert -1.0 <= d["mean_slot_cosine"] <= 1.0 and 0.0 <= d["mean_abs_slot_cosine"] <= 1.0
        top = d["top5_slots"]
        assert len(top) == 5 and len(set(top)) == 5 and all(0 <= i < K for i in top)
        assert float(d["usage"][top[0]]) == pytest.approx(float(d["usage"].max()))
    # a single slot addressed -> 1 active slot out of K, and it is the top one
    W1 = torch.zeros(1, K)
    W1[0, 7] = 1.0
    d1 = mem.diagnostics(state, W1)
    assert d1["active_pct"] == pytest.approx(100.0 / K) and d1["top5_slots"][0] == 7
    assert mem.diagnostics(mem.empty_state())["num_episodes"] == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# state serialisation
# ---------------------------------------------------------------------------------------------------------------------


def test_memory_state_round_trip(tmp_path) -> None:
    mem = make(32, 16, seed=19)
    state = mem.write(torch.randn(6, 16))
    path = tmp_path / "state.pt"
    torch.save(state.state_dict(), path)
    loaded = MemoryState.from_state_dict(torch.load(path, weights_only=True))
    assert states_equal(state, loaded) and loaded.num_episodes == 6
    q = torch.randn(3, 16)
    assert torch.equal(mem.read(q, loaded)[0], mem.read(q, state)[0])
    with pytest.raises(KeyError):
        MemoryState.from_state_dict({"memory": state.memory})


def test_input_validation() -> None:
    mem = make(32, 16)
    with pytest.raises(ValueError):
        mem.write(torch.randn(4, 15))
    with pytest.raises(ValueError):
        mem.read(torch.randn(4, 16), make(16, 16).empty_state())
    with pytest.raises(ValueError):
        EpisodicMemory(32, 16, ridge=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# EpisodicStore
# ---------------------------------------------------------------------------------------------------------------------


def test_store_evicts_least_recently_read_and_keeps_recall() -> None:
    mem = make(64, 32, seed=20)
    store = EpisodicStore(mem, capacity=4)
    keys = torch.randn(10, 32)
    ids: list[int] = []
    reads = {4: [0], 5: [1], 7: [0, 4], 9: [0, 4]}  # before writing episode i, read these earlier episodes
    last_used: dict[int, int] = {}
    clock = 0
    expected_evicted: list[int] = []
    for i in range(10):
        for j in reads.get(i, []):
            if ids[j] in store.episode_ids:
                out = store.read(keys[j])
                clock += 1
                last_used[ids[j]] = clock
                assert rel(out, keys[j]) <= TOL
        if len(store) == 4:
            expected_evicted.append(min(store.episode_ids, key=lambda e: last_used[e]))
        eid = store.write(keys[i])
        clock += 1
        last_used[eid] = clock
        ids.append(eid)
        assert len(store) == min(i + 1, 4)
    held = store.episode_ids
    assert store.state.num_episodes == len(store) == 4
    assert len(held) == 4 and not set(held) & set(expected_evicted)
    assert ids[0] in held and ids[4] in held  # read recently, so they survived although written early
    assert ids[7] in expected_evicted  # ... while a later but unread episode went: LRU, not FIFO
    for eid in held:
        j = ids.index(eid)
        assert rel(store.read(keys[j]), keys[j]) <= TOL  # the remaining episodes are recalled
    for eid in expected_evicted:
        j = ids.index(eid)
        assert rel(store.read(keys[j]), keys[j]) > 0.3  # the evicted ones are not


def test_store_key_value_forget_and_nearest() -> None:
    mem = make(64, 32, seed=21)
    store = EpisodicStore(mem)
    assert store.capacity == 32  # default min(K, C): the exact-recall bound
    keys, values = torch.randn(6, 32), torch.randn(6, 32)
    ids = [store.write(k, v) for k, v in zip(keys, values, strict=True)]
    out = store.read(keys)
    assert out.shape == (6, 32) and rel(out, values) <= TOL
    assert store.nearest(keys[2] + 0.01 * torch.randn(32)) == [ids[2]]
    store.forget(ids[2])
    assert len(store) == 5 and ids[2] not in store.episode_ids
    assert rel(store.read(keys[2]), values[2]) > 0.3  # forgotten
    rest = [0, 1, 3, 4, 5]
    assert rel(store.read(keys[rest]), values[rest]) <= TOL  # the others are untouched
    with pytest.raises(KeyError):
        store.forget(ids[2])
    with pytest.raises(ValueError):
        store.write(torch.randn(2, 32))


def test_store_state_dict_round_trip(tmp_path) -> None:
    mem = make(64, 32, seed=22)
    store = EpisodicStore(mem, capacity=3)
    keys = torch.randn(5, 32)
    for k in keys:
        store.write(k)
    store.read(keys[3])
    path = tmp_path / "store.pt"
    torch.save(store.state_dict(), path)
    fresh = EpisodicStore(mem)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.episode_ids == store.episode_ids and fresh.capacity == 3
    assert torch.equal(fresh.read(keys), store.read(keys))
    # the LRU bookkeeping survives too: both stores evict the same episode next
    new = torch.randn(32)
    store.write(new)
    fresh.write(new)
    assert fresh.episode_ids == store.episode_ids


# ---------------------------------------------------------------------------------------------------------------------
# forgetting across scales, non-finite input
# ---------------------------------------------------------------------------------------------------------------------


def _scaled_episodes(base: float, ratio: float, seed: int = 30) -> tuple[torch.Tensor, ...]:
    """Six key-value episodes of norm ~base, one (big) of norm ~base * ratio, and queries of norm ~base."""
    g = torch.Generator().manual_seed(seed)
    keys, values = base * torch.randn(6, 32, generator=g), base * torch.randn(6, 32, generator=g)
    big_key, big_value = base * ratio * torch.randn(32, generator=g), base * ratio * torch.randn(32, generator=g)
    queries = base * torch.randn(8, 32, generator=g)  # mostly outside the span of the held keys
    return keys, values, big_key, big_value, queries


@pytest.mark.parametrize("base", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("ratio", [1e2, 1e3, 1e4])
def test_store_forgets_a_much_larger_episode_exactly(base: float, ratio: float) -> None:
    mem = make(64, 32, seed=30)
    keys, values, big_key, big_value, queries = _scaled_episodes(base, ratio)
    never = EpisodicStore(mem)  # the same episodes without the big one
    for k, v in zip(keys, values, strict=True):
        never.write(k, v)
    store = EpisodicStore(mem)
    for k, v in zip(keys[:3], values[:3], strict=True):
        store.write(k, v)
    big = store.write(big_key, big_value)
    for k, v in zip(keys[3:], values[3:], strict=True):
        store.write(k, v)
    store.forget(big)
    assert rel(store.read(keys), values) <= TOL
    assert rel(store.read(keys), never.read(keys)) <= TOL
    assert rel(store.read(queries), never.read(queries)) <= TOL  # was 2-50x off for ratios >= 1e3
    assert rel(store.state.precision, never.state.precision) <= TOL
    # the rebuilt statistics carry on exactly: write another episode into both
    extra_key, extra_value = base * torch.randn(32), base * torch.randn(32)
    store.write(extra_key, extra_value)
    never.write(extra_key, extra_value)
    assert rel(store.read(queries), never.read(queries)) <= TOL


@pytest.mark.parametrize("base", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("ratio", [1e2, 1e3, 1e4])
def test_update_forgets_a_much_larger_episode_exactly(base: float, ratio: float) -> None:
    mem = make(64, 32, seed=31)
    keys, values, big_key, big_value, queries = _scaled_episodes(base, ratio, seed=31)
    W_big = mem.address(big_key[None])
    never = mem.update(mem.write_kv(keys[:3], values[:3]), values[3:], W=mem.address(keys[3:]))
    state = mem.update(mem.write_kv(keys[:3], values[:3]), big_value[None], W=W_big)
    state = mem.update(state, values[3:], W=mem.address(keys[3:]))
    state = mem.update(state, big_value[None], alpha=-1.0, W=W_big)
    assert state.num_episodes == 6
    assert rel(mem.read_kv(keys, state)[0], values) <= TOL
    assert rel(mem.read_kv(queries, state)[0], mem.read_kv(queries, never)[0]) <= TOL
    # the cleaned statistics carry on exactly too
    extra_key, extra_value = base * torch.randn(2, 32), base * torch.randn(2, 32)
    after = mem.update(state, extra_value, W=mem.address(extra_key))
    never_after = mem.update(never, extra_value, W=mem.address(extra_key))
    assert rel(mem.read_kv(queries, after)[0], mem.read_kv(queries, never_after)[0]) <= TOL


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["key", "value"])
def test_store_refuses_non_finite_episodes_and_stays_unchanged(bad: float, where: str) -> None:
    mem = make(64, 32, seed=32)
    store = EpisodicStore(mem, capacity=3)
    keys = torch.randn(4, 32)
    for k in keys[:3]:
        store.write(k)  # full: a write would evict first
    before = store.state_dict()
    poisoned = torch.randn(32)
    poisoned[5] = bad
    key, value = (poisoned, None) if where == "key" else (keys[3], poisoned)
    with pytest.raises(ValueError, match="non-finite"):
        store.write(key, value)
    after = store.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert bool(torch.isfinite(store.read(keys[:3])).all()) and rel(store.read(keys[:3]), keys[:3]) <= TOL


def test_keys_narrower_than_values_recall_exactly_and_forget_exactly() -> None:
    torch.manual_seed(0)
    memory = EpisodicMemory(memory_size=32, episode_dim=48, key_dim=16).eval()
    assert memory.prior.shape == (32, 16)
    keys, values = torch.randn(10, 16), torch.randn(10, 48)
    state = memory.write_kv(keys, values)
    read, W = memory.read_kv(keys, state)
    assert read.shape == (10, 48) and W.shape == (10, 32)
    torch.testing.assert_close(read, values, rtol=1e-4, atol=1e-4)
    empty, _ = memory.read_kv(keys, memory.empty_state())
    assert torch.all(empty == 0)  # no episode held: nothing comes back (the prior has the keys' width)
    store = EpisodicStore(memory)
    assert store.capacity == 16  # exact recall up to min(K, key_dim) episodes
    ids = [store.write(k, v) for k, v in zip(keys, values, strict=True)]
    torch.testing.assert_close(store.read(keys), values, rtol=1e-4, atol=1e-4)
    for i in ids[:5]:
        store.forget(i)
    fresh, _ = memory.read_kv(keys[5:], memory.write_kv(keys[5:], values[5:]))
    torch.testing.assert_close(store.read(keys[5:]), fresh, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="key_dim == episode_dim"):
        memory.write(values)
    with pytest.raises(ValueError, match="key_dim == episode_dim"):
        store.write(keys[0])
