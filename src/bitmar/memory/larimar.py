"""Larimar episodic memory (Das et al., ICML 2024): K slots x C dims, one-shot least-squares writes.

Notation: K = memory_size slots, C = episode_dim, Z (N, C) episodes, M0 (K, C) learned prior, M (K, C) memory.

    write        W0 = Z M0^+ ;  M = W0^+ Z
    read         W  = Zq M^+ ;  Z_read = W M          (addressing noise on W in training mode only)
    write_kv     W  = keys M0^+ ;  M = W^+ values      (Larimar editing: addressing from the key, fixed reference)
    read_kv      W  = keys M0^+ ;  values_read = W M
    update       C_i = C_{i-1} + a W^T W ;  M_i = M_{i-1} + a C_i^+ W^T (Z - W M_{i-1})   (a = +1 write, -1 forget)

What is exact (up to rounding: worst measured relative error 7e-6 in float32, K in {32, 64, 512}, N <= min(K, C)):
    * N <= min(K, C) and Z of full row rank:  read(Z, write(Z)) == Z, and read(q) is the orthogonal projection of q
      onto span(rows of Z) for every query q (independent of M0).  The bound is min(K, C) because W0 = Z M0^+ has rank
      <= min(K, C); beyond it the write is the least-squares solution and recall is approximate.
    * key-value: read_kv(keys, write_kv(keys, values)) == values for N <= min(K, C) keys of full row rank.
    * update: the memory after any sequence of update(+-a) equals the batch least-squares solution over the episodes
      currently held (with each episode weighted by its a), i.e. write then update(Z2, +1) == write([Z1; Z2]) and a
      following update(Z2, -1) == write(Z1).

Numerics.  Every data-dependent pseudo-inverse (W0^+, M^+, C^+) is a *truncated* Moore-Penrose inverse with a
relative cutoff (singular values below `ridge * sigma_max` count as zero), computed with torch.linalg in float64 on the
smaller of the two Gram matrices (float32 SVD on MPS, which has no float64), with autocast disabled.  A relative cutoff
is scale invariant (norms 1e-3..1e3 behave the same), never iterates, and unlike a Tikhonov shift it neither leaves
rounding garbage in the addressing weights of a rank-deficient memory (N < K) nor biases recall when N = K.  The
prior's M0^+ is a float64 Cholesky solve with a relative ridge (ridge^2 * trace): the prior has full rank, and
exactness does not depend on it.  Sequential updates keep the sufficient statistics C = sum a W^T W and
B = sum a W^T Z (float64) and re-solve M = C^+ B: algebraically identical to Larimar's recursion
(C_i M_i = C_{i-1} M_{i-1} + a W^T Z), but without the 0 * inf cancellation that makes the recursion forget inexactly.

Forgetting across scales.  Subtracting an episode leaves the float64 rounding residue of everything C and B held while
it was there: about eps * ||C_before||_F (measured <= 0.4 eps ||C_before||_F).  When the forgotten episode is >= 1000x
larger (in norm) than the ones held, that residue lies above the relative cutoff of the remaining statistics and the
truncated inverse would read it back as data (readout several times off).  So:
    * EpisodicStore keeps every held episode and rebuilds C and B from them before solving after a forget: exact at
      any scale (equal, to float64 rounding, to a store where the episode was never written).
    * update(alpha < 0) solves with an absolute noise floor of 64 eps ||C_before||_F besides the relative cutoff and
      returns statistics with the directions below it removed.  Exact (to TOL) while the held episodes' statistics stay
      above that floor, e.g. a forgotten episode up to ~1e6x the norm of the others (tested 1e-3..1e3 with ratios up
      to 1e4); beyond, the weakest held directions are dropped (read as not stored), never garbage.
    * accumulate(alpha < 0) alone cannot tell the residue from data: after it, solve() is exact only while the
      forgotten episodes are < ~100x the norm of the others.  Use update() or EpisodicStore to forget at any scale.

Gradients flow through write / write_kv / read / read_kv to the episodes, the queries and the prior.  Note that with
N <= min(K, C) the deterministic read is a projection onto span(Z), which does not depend on M0: the prior learns
through the addressing noise and the KL term (as in Larimar).  update() is an editing operation, not differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from bitmar.memory.numerics import (
    FORGET_NOISE,
    clean_solve,
    gram_pinv,
    no_autocast,
    pinv_left,
    pinv_right,
    ridge_right,
    work_dtype,
)

_TENSOR_FIELDS = ("memory", "precision", "moment", "usage", "age")


# ---------------------------------------------------------------------------------------------------------------------
# state
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class MemoryState:
    """Explicit memory state: reading never changes it and every write returns a new one, so evaluation cannot touch
    the training memory.  All fields are tensors or ints, so `state_dict()` loads with torch.load(weights_only=True)."""

    memory: Tensor  # (K, C) the memory matrix M; float32 (float64 if written from float64 episodes)
    precision: Tensor  # (K, K) C = sum_i a_i W_i^T W_i (no ridge: the cutoff is applied when solving); float64
    moment: Tensor  # (K, C) B = sum_i a_i W_i^T Z_i, so that M = C^+ B exactly; float64
    usage: Tensor  # (K,) float32 cumulative addressing mass sum |W| of the episodes held
    age: Tensor  # (K,) int64 number of writes since the slot last received a noticeable share of a write
    num_episodes: int = 0  # episodes currently held (written minus forgotten)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> MemoryState:
        return MemoryState(**{name: fn(getattr(self, name)) for name in _TENSOR_FIELDS}, num_episodes=self.num_episodes)

    def detach(self) -> MemoryState:
        return self._map(lambda t: t.detach())

    def clone(self) -> MemoryState:
        return self._map(lambda t: t.clone())

    def to(self, device: torch.device | str) -> MemoryState:
        return self._map(lambda t: t.to(device))

    @property
    def memory_size(self) -> int:
        return int(self.memory.shape[0])

    def state_dict(self) -> dict[str, Tensor]:
        d = {name: getattr(self, name).detach().clone() for name in _TENSOR_FIELDS}
        d["num_episodes"] = torch.tensor(self.num_episodes, dtype=torch.int64)
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, Tensor]) -> MemoryState:
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise KeyError(f"MemoryState.from_state_dict: missing keys {missing}; got {sorted(d)}")
        return cls(**{name: d[name] for name in _TENSOR_FIELDS}, num_episodes=int(d["num_episodes"]))


# ---------------------------------------------------------------------------------------------------------------------
# memory module
# ---------------------------------------------------------------------------------------------------------------------


class EpisodicMemory(nn.Module):
    """Larimar episodic memory with a learned prior M0 (`self.prior`, (K, C)); see the module docstring for the maths.

    Args:
        memory_size: K, number of slots.
        episode_dim: C, latent size of an episode.
        ridge: relative regularisation, scale invariant.  The data-dependent pseudo-inverses treat singular values
            below ridge * sigma_max as zero (truncation); the prior's inverse adds ridge^2 * trace to its Gram matrix.
            Keep it tiny: it bounds the condition number of episode sets that are still recalled exactly (1e-6 -> up
            to ~1e6).
        addressing_noise_std: std of the Gaussian noise added to the addressing weights W in training mode; also the
            std of q(W) in kl_divergence.
        key_dim: width of the keys of write_kv / read_kv (default episode_dim). The prior M0 is (K, key_dim): it
            addresses, while the memory M (K, C) stores values. With key_dim != episode_dim only the key-value
            operations (and update() with an explicit W) apply; the autoassociative write/read need equal widths.
    """

    def __init__(
        self,
        memory_size: int,
        episode_dim: int,
        ridge: float = 1e-6,
        addressing_noise_std: float = 0.1,
        key_dim: int | None = None,
    ) -> None:
        super().__init__()
        key_dim = episode_dim if key_dim is None else key_dim
        if memory_size < 1 or episode_dim < 1 or key_dim < 1:
            raise ValueError(
                f"memory_size, episode_dim and key_dim must be >= 1, got {memory_size}, {episode_dim}, {key_dim}"
            )
        if not 0.0 < ridge < 1.0:
            raise ValueError(f"ridge is a relative cutoff and must lie in (0, 1), got {ridge}")
        if addressing_noise_std < 0.0:
            raise ValueError(f"addressing_noise_std must be >= 0, got {addressing_noise_std}")
        self.memory_size = memory_size
        self.episode_dim = episode_dim
        self.key_dim = key_dim
        self.ridge = ridge
        self.addressing_noise_std = addressing_noise_std
        self.prior = nn.Parameter(torch.empty(memory_size, key_dim))  # (K, key_dim) M0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Orthogonal rows/columns: condition number 1, so W0 = Z M0^+ is as well conditioned as Z.  The gain makes
        # unit-variance latents give unit-variance addressing weights, matching the N(0, I) prior of the KL term.
        gain = math.sqrt(min(1.0, self.key_dim / self.memory_size))
        with torch.no_grad():
            nn.init.orthogonal_(self.prior, gain=gain)

    def extra_repr(self) -> str:
        return (
            f"memory_size={self.memory_size}, episode_dim={self.episode_dim}, key_dim={self.key_dim}, "
            f"ridge={self.ridge}, addressing_noise_std={self.addressing_noise_std}"
        )

    # ----------------------------------------------------------------------------------------------------- helpers

    def _flatten(self, x: Tensor, name: str, width: int | None = None) -> Tensor:
        width = self.episode_dim if width is None else width
        if x.dim() < 1 or x.shape[-1] != width:
            raise ValueError(f"{name} must have shape (..., {width}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        return x.reshape(-1, width)  # (N, width)

    def _require_autoassociative(self, what: str) -> None:
        if self.key_dim != self.episode_dim:
            raise ValueError(
                f"{what} addresses with the episode itself, which needs key_dim == episode_dim (got {self.key_dim} "
                f"and {self.episode_dim}); use the key-value operations (write_kv / read_kv, update with W=...)"
            )

    def _check_state(self, state: MemoryState) -> None:
        if tuple(state.memory.shape) != (self.memory_size, self.episode_dim):
            raise ValueError(
                f"state.memory has shape {tuple(state.memory.shape)}, expected ({self.memory_size}, {self.episode_dim})"
            )

    def _prior_work(self, device: torch.device) -> Tensor:
        return self.prior.to(device=device, dtype=work_dtype(device))  # (K, C)

    def _address_work(self, keys: Tensor) -> Tensor:
        """W = keys M0^+ in the work dtype; keys (N, C) already in the work dtype."""
        return ridge_right(keys, self._prior_work(keys.device), self.ridge)  # (N, K)

    def _noisy(self, W: Tensor, noise: bool) -> Tensor:
        if noise and self.addressing_noise_std > 0.0:
            return W + self.addressing_noise_std * torch.randn_like(W)  # sample of q(W) = N(W, std^2 I)
        return W

    @staticmethod
    def _memory_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32  # never store the memory in bf16/fp16

    def _touched(self, W: Tensor) -> Tensor:
        mass = W.detach().abs().sum(0)  # (K,)
        share = mass / mass.sum().clamp_min(torch.finfo(mass.dtype).tiny)  # no host sync in the training path
        return share >= 0.1 / self.memory_size  # (K,) bool: received at least 10% of a uniform share

    # ------------------------------------------------------------------------------------------------------ public

    def _empty_memory(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The memory holding no episode: the prior when it has the episodes' width, else zeros (reads give 0)."""
        if self.key_dim == self.episode_dim:
            return self.prior.detach().to(device=device, dtype=dtype).clone()  # (K, C)
        return torch.zeros(self.memory_size, self.episode_dim, device=device, dtype=dtype)

    def empty_state(self) -> MemoryState:
        """State holding just the (detached) prior and zero episodes; the first update() replaces it by C^+ B."""
        device = self.prior.device
        wd = work_dtype(device)
        K, C = self.memory_size, self.episode_dim
        return MemoryState(
            memory=self._empty_memory(device, torch.float32),  # (K, C)
            precision=torch.zeros(K, K, dtype=wd, device=device),
            moment=torch.zeros(K, C, dtype=wd, device=device),
            usage=torch.zeros(K, dtype=torch.float32, device=device),
            age=torch.zeros(K, dtype=torch.int64, device=device),
            num_episodes=0,
        )

    def address(self, keys: Tensor) -> Tensor:
        """Addressing against the fixed reference (the prior): W = keys M0^+, (..., C) -> (..., K).

        Returned in float32 (float64 for float64 keys), bit-identical to the addressing that write_kv / update add to
        the statistics, so update(state, values, -a, W=address(keys)) forgets key-value episodes exactly."""
        k = self._flatten(keys, "keys", self.key_dim)
        with no_autocast(k.device):
            W = self._address_work(k.to(work_dtype(k.device)))  # (N, K)
        return W.to(self._memory_dtype(keys.dtype)).reshape(*keys.shape[:-1], self.memory_size)

    def _stats_addressing(self, W: Tensor, dtype: torch.dtype) -> Tensor:
        # The statistics use W rounded as address() returns it: forgetting then subtracts bit-identical products, and
        # the rounding residue (float64 eps) stays far below the cutoff.  A residue at float32 level would not: the
        # truncated inverse would resurrect the forgotten episode from it.
        return W.detach().to(self._memory_dtype(dtype)).to(W.dtype)

    def write(self, Z: Tensor) -> MemoryState:
        """One-shot write starting from the prior: W0 = Z M0^+, M = W0^+ Z.  Z (N, C) (or (..., C), flattened).

        Exact recall for N <= min(K, C); least squares beyond.  Differentiable w.r.t. Z and the prior.  The returned
        state's precision/moment make update() continue exactly from it."""
        self._require_autoassociative("write")
        return self.write_kv(Z, Z)

    def write_kv(self, keys: Tensor, values: Tensor) -> MemoryState:
        """Key-value write (Larimar editing): W = keys M0^+ (fixed reference = prior), M = W^+ values.

        read_kv(keys) returns the values exactly for N <= min(K, C) keys whose addressing has full row rank."""
        k = self._flatten(keys, "keys", self.key_dim)  # (N, key_dim)
        v = self._flatten(values, "values")  # (N, C)
        if k.shape[0] != v.shape[0]:
            raise ValueError(
                f"keys and values must hold the same number of episodes, got {k.shape[0]} and {v.shape[0]}"
            )
        device = k.device
        wd = work_dtype(device)
        with no_autocast(device):
            vw = v.to(wd)
            W = self._address_work(k.to(wd))  # (N, K)
            M = pinv_left(W, vw, self.ridge)  # (K, C) minimum-norm least squares W M = values
            Wd = self._stats_addressing(W, keys.dtype)  # (N, K)
            precision = Wd.mT @ Wd  # (K, K) sufficient statistics for update()/forgetting; no gradient needed
            moment = Wd.mT @ vw.detach()  # (K, C)
        touched = self._touched(Wd)  # (K,)
        return MemoryState(
            memory=M.to(self._memory_dtype(values.dtype)),
            precision=precision,
            moment=moment,
            usage=Wd.abs().sum(0).to(torch.float32),
            age=(~touched).to(torch.int64),  # one write since the start: 0 where it landed, 1 elsewhere
            num_episodes=int(k.shape[0]),
        )

    def read(self, Zq: Tensor, state: MemoryState) -> tuple[Tensor, Tensor]:
        """Read: W = Zq M^+, Z_read = W M.  Zq (Nq, C) or (..., C) -> (Z_read (..., C), W (..., K)) in Zq's dtype.

        Training mode adds N(0, addressing_noise_std^2) noise to W before the product; eval mode is deterministic.
        The returned W is the noise-free mean of q(W) (the input of kl_divergence).  The state is never modified."""
        self._check_state(state)
        self._require_autoassociative("read")
        q = self._flatten(Zq, "Zq")  # (Nq, C)
        device = q.device
        wd = work_dtype(device)
        with no_autocast(device):
            M = state.memory.to(device=device, dtype=wd)  # (K, C) a copy: the state stays untouched
            W = pinv_right(q.to(wd), M, self.ridge)  # (Nq, K)
            Z_read = self._noisy(W, self.training) @ M  # (Nq, C)
        lead = Zq.shape[:-1]
        return Z_read.to(Zq.dtype).reshape(*lead, self.episode_dim), W.to(Zq.dtype).reshape(*lead, self.memory_size)

    def read_kv(self, keys: Tensor, state: MemoryState) -> tuple[Tensor, Tensor]:
        """Key-value read: W = keys M0^+ (same addressing as write_kv), values_read = W M.  Noise as in read()."""
        self._check_state(state)
        k = self._flatten(keys, "keys", self.key_dim)  # (Nq, key_dim)
        device = k.device
        with no_autocast(device):
            M = state.memory.to(device=device, dtype=work_dtype(device))  # (K, C)
            W = self._address_work(k.to(M.dtype))  # (Nq, K)
            values = self._noisy(W, self.training) @ M  # (Nq, C)
        lead = keys.shape[:-1]
        return values.to(keys.dtype).reshape(*lead, self.episode_dim), W.to(keys.dtype).reshape(*lead, self.memory_size)

    @torch.no_grad()
    def update(self, state: MemoryState, Z: Tensor, alpha: float = 1.0, W: Tensor | None = None) -> MemoryState:
        """Sequential write (alpha > 0) or exact forgetting (alpha < 0) of episodes Z (N, C): returns a new state.

        C_i = C_{i-1} + alpha W^T W ;  B_i = B_{i-1} + alpha W^T Z ;  M_i = C_i^+ B_i, which equals Larimar's
        M_i = M_{i-1} + alpha C_i^+ W^T (Z - W M_{i-1}) and is the batch least-squares solution over the episodes held,
        each weighted by its alpha.  W (N, K) defaults to Z M0^+ (addressing against the prior, as in write(); pass the
        W of write_kv for key-value episodes).  Forget an episode with the negative of the alpha and the same W it was
        written with.  When the last episode is forgotten the memory returns to the prior.  Not differentiable.

        Forgetting (alpha < 0) also drops the rounding residue of what was removed (module docstring), so it stays
        exact when the forgotten episode is orders of magnitude larger than the ones held."""
        new = self.accumulate(state, Z, alpha, W)
        if alpha >= 0.0 or new.num_episodes == 0:
            return self.solve(new)
        self._check_state(new)
        device = new.precision.device
        with no_autocast(device):
            before = torch.linalg.matrix_norm(state.precision.detach().to(new.precision.dtype))
            floor = FORGET_NOISE * torch.finfo(new.precision.dtype).eps * before
            memory, precision, moment = clean_solve(new.precision, new.moment, self.ridge, floor)
        return MemoryState(
            memory=memory.to(self._memory_dtype(new.memory.dtype)),
            precision=precision,
            moment=moment,
            usage=new.usage,
            age=new.age,
            num_episodes=new.num_episodes,
        )

    @torch.no_grad()
    def accumulate(self, state: MemoryState, Z: Tensor, alpha: float = 1.0, W: Tensor | None = None) -> MemoryState:
        """The statistics half of update(): C and B (and usage, age, count) change, `memory` is left stale.

        Lets a caller fold in many single episodes and pay for one solve() (an eigendecomposition of C) at the end."""
        self._check_state(state)
        z = self._flatten(Z, "Z")  # (N, C)
        n = int(z.shape[0])
        if alpha == 0.0:
            return state.detach().clone()
        device = state.precision.device
        wd = state.precision.dtype
        with no_autocast(device):
            zw = z.to(device=device, dtype=wd)
            if W is None:
                self._require_autoassociative("update without W")
                Ww = self._stats_addressing(self._address_work(zw), Z.dtype)  # (N, K) exactly as write() added it
            else:
                Ww = W.detach().reshape(-1, self.memory_size).to(device=device, dtype=wd)
                if Ww.shape[0] != n:
                    raise ValueError(f"W holds {Ww.shape[0]} rows but Z holds {n} episodes")
            held = state.num_episodes + (n if alpha > 0 else -n)
            if held < 0:
                raise ValueError(f"cannot forget {n} episodes from a state holding {state.num_episodes}")
            if held == 0:  # drop the rounding residue of C and B exactly
                return MemoryState(
                    memory=state.memory.detach().clone(),
                    precision=torch.zeros_like(state.precision),
                    moment=torch.zeros_like(state.moment),
                    usage=torch.zeros_like(state.usage),
                    age=state.age.detach().clone(),
                    num_episodes=0,
                )
            precision = state.precision.detach() + alpha * (Ww.mT @ Ww)  # (K, K)
            moment = state.moment.detach() + alpha * (Ww.mT @ zw)  # (K, C)
            usage = (state.usage.detach() + alpha * Ww.abs().sum(0).to(torch.float32)).clamp_min(0.0)
            age = state.age.detach().clone()
            if alpha > 0:
                age = torch.where(self._touched(Ww), torch.zeros_like(age), age + 1)
        return MemoryState(
            memory=state.memory.detach().clone(),
            precision=precision,
            moment=moment,
            usage=usage,
            age=age,
            num_episodes=held,
        )

    @torch.no_grad()
    def solve(self, state: MemoryState) -> MemoryState:
        """Recompute the memory from the statistics: M = C^+ B, or the prior when no episode is held."""
        self._check_state(state)
        mem_dtype = self._memory_dtype(state.memory.dtype)
        device = state.precision.device
        if state.num_episodes == 0:
            memory = self._empty_memory(device, mem_dtype)  # (K, C)
        else:
            with no_autocast(device):
                memory = (gram_pinv(state.precision, self.ridge) @ state.moment).to(mem_dtype)  # (K, C) = C^+ B
        return MemoryState(
            memory=memory,
            precision=state.precision.detach(),
            moment=state.moment.detach(),
            usage=state.usage.detach(),
            age=state.age.detach(),
            num_episodes=state.num_episodes,
        )

    def kl_divergence(self, W: Tensor, std: float | None = None) -> Tensor:
        """KL(q(W) || N(0, I)) with q(W) = N(W, s^2 I) per episode, s = std or addressing_noise_std; mean over episodes.

        Per episode: 0.5 * sum_k (s^2 + W_k^2 - 1 - log s^2) >= 0; 0 exactly when W = 0 and s = 1.  Note the
        constant 0.5 K (s^2 - 1 - log s^2) (about 924 at K = 512, s = 0.1): no gradient, but it shows in logs."""
        s = self.addressing_noise_std if std is None else std
        if s <= 0.0:
            raise ValueError(f"kl_divergence needs a positive std for q(W), got {s}")
        if W.shape[-1] != self.memory_size:
            raise ValueError(f"W must have shape (..., {self.memory_size}), got {tuple(W.shape)}")
        var = s * s
        Wf = W.reshape(-1, self.memory_size).float()  # (N, K)
        per_episode = 0.5 * (Wf.square() + (var - 1.0 - math.log(var))).sum(-1)  # (N,)
        return per_episode.mean()

    @torch.no_grad()
    def diagnostics(self, state: MemoryState, W: Tensor | None = None) -> dict[str, Tensor | float | list]:
        """Memory health: slot usage (share of addressing mass, (K,), from W if given else from the state's writes),
        age (K,), active-slot percentage (share >= 10% of uniform), mean pairwise cosine between slots (signed and
        absolute), top-5 slots by usage, number of episodes held and Frobenius norm of the memory."""
        self._check_state(state)
        K = self.memory_size
        mass = W.detach().reshape(-1, K).abs().sum(0).float() if W is not None else state.usage.detach().float()  # (K,)
        total = mass.sum()
        share = mass / total if bool(total > 0) else torch.zeros_like(mass)  # (K,)
        active_pct = 100.0 * float((share >= 0.1 / K).float().mean())
        M = state.memory.detach().float()  # (K, C)
        Mn = M / M.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        cos = Mn @ Mn.mT  # (K, K)
        off = cos.sum() - cos.diagonal().sum()
        off_abs = cos.abs().sum() - cos.diagonal().abs().sum()
        pairs = K * (K - 1)
        return {
            "usage": share,
            "age": state.age.detach().clone(),
            "active_pct": active_pct,
            "mean_slot_cosine": float(off / pairs) if pairs else 0.0,
            "mean_abs_slot_cosine": float(off_abs / pairs) if pairs else 0.0,
            "top5_slots": share.topk(min(5, K)).indices.tolist(),
            "num_episodes": float(state.num_episodes),
            "memory_norm": float(M.norm()),
        }
