"""Persistent episodic store for inference: one episode at a time, exact least-recently-used forgetting."""

from __future__ import annotations

import torch
from torch import Tensor

from bitmar.memory.larimar import EpisodicMemory, MemoryState
from bitmar.memory.numerics import no_autocast


class EpisodicStore:
    """A persistent episodic store for inference around a (frozen) EpisodicMemory and its own MemoryState.

    Episodes are written one at a time with key-value addressing W = key M0^+ (value defaults to the key), so that
    read(query) returns the stored value of a stored key exactly while len(self) <= min(K, C).  When a write would
    exceed `capacity`, the least-recently-used episode (last read, or written if never read) is forgotten first with
    the exact alpha = -1 update, so the memory is always the least-squares solution over the episodes held.  The store
    keeps each episode's key, value and addressing so that forgetting subtracts exactly what was added.  If the prior
    changes (more training), rebuild the store: the addressing of the held episodes refers to the old prior.

    `alpha` in (0, 1] is the write strength (Larimar's alpha in M_i = M_{i-1} + alpha C^+ W^T (Z - W M_{i-1})): a write
    moves the recall of its key `alpha` of the way from what the store recalled for that key before (r) to the new
    value v.  The store holds v' = r + alpha (v - r) as the episode's value and solves the least squares over the held
    episodes as always, so for a key independent of the held ones read(key) == v' exactly and the other episodes are
    recalled as before; forgetting removes v'.  alpha = 1 (default) stores v itself (one-shot, exact); 0.1 moves the
    recall 10% of the way (a new key of an empty key-value store with key_dim != C, which recalls 0, reads 0.1 v).
    """

    def __init__(
        self,
        memory: EpisodicMemory,
        capacity: int | None = None,
        device: torch.device | str | None = None,
        alpha: float = 1.0,
    ):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha (the write strength) must lie in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.memory = memory
        # default min(K, key_dim): the largest number of episodes that is still recalled exactly
        self.capacity = min(memory.memory_size, memory.key_dim) if capacity is None else int(capacity)
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        self.device = torch.device(device) if device is not None else memory.prior.device
        self._state = memory.empty_state().to(self.device)
        self._stale = False  # statistics changed since the memory matrix was last solved
        self._forgot = False  # an episode was forgotten since: rebuild C and B from the held episodes before solving
        self._keys: dict[int, Tensor] = {}  # id -> (key_dim,)
        self._values: dict[int, Tensor] = {}  # id -> (C,)
        self._addresses: dict[int, Tensor] = {}  # id -> (K,) work dtype, exactly what was added to the statistics
        self._last_used: dict[int, int] = {}  # id -> clock of the last read (or of the write)
        self._written_at: dict[int, int] = {}
        self._clock = 0
        self._next_id = 0

    # ---------------------------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def episode_ids(self) -> list[int]:
        return list(self._keys)

    @property
    def state(self) -> MemoryState:
        """The MemoryState over the held episodes (solved lazily: writes and evictions only add statistics)."""
        if self._stale:
            if self._forgot:
                self._state = self._rebuilt_statistics()
                self._forgot = False
            self._state = self.memory.solve(self._state)
            self._stale = False
        return self._state

    def _rebuilt_statistics(self) -> MemoryState:
        """C, B and usage summed afresh over the held episodes: subtracting a forgotten episode leaves the rounding
        residue of its own size, which an episode 1000x larger than the rest makes larger than the others' data."""
        state = self._state
        if not self._keys:
            return state  # accumulate() already zeroed everything when the last episode went
        ids = self.episode_ids
        W = torch.stack([self._addresses[i] for i in ids]).to(state.precision.dtype)  # (E, K) as added
        V = torch.stack([self._values[i] for i in ids]).to(state.precision.dtype)  # (E, C)
        return MemoryState(
            memory=state.memory,
            precision=W.mT @ W,  # (K, K)
            moment=W.mT @ V,  # (K, C)
            usage=W.abs().sum(0).to(torch.float32),  # (K,)
            age=state.age,
            num_episodes=state.num_episodes,
        )

    def _vector(self, x: Tensor, name: str) -> Tensor:
        C = self.memory.key_dim if name == "key" else self.memory.episode_dim
        if x.dim() != 1 or x.shape[0] != C:
            raise ValueError(f"{name} must have shape ({C},), got {tuple(x.shape)}")
        out = x.detach().to(device=self.device, dtype=torch.float32)
        if not bool(torch.isfinite(out).all()):  # one NaN would turn every slot of the memory into NaN
            bad = int((~torch.isfinite(out)).sum())
            raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN or inf); the store is unchanged")
        return out

    def _address(self, keys: Tensor) -> Tensor:
        wd = self._state.precision.dtype
        with torch.no_grad(), no_autocast(self.device):
            W = self.memory._address_work(keys.to(device=self.device, dtype=wd))  # (N, K)
            return self.memory._stats_addressing(W, torch.float32)

    # ---------------------------------------------------------------------------------------------------- editing

    def write(self, key: Tensor, value: Tensor | None = None) -> int:
        """Store one episode: key (C,), value (C,) or None (= key).  Returns its id.  Evicts the LRU episode if full.

        With `alpha` < 1 the held value is v' = r + alpha (v - r), r the recall of the key just before (after any
        eviction), see the class docstring.  A key or value holding NaN or inf raises ValueError before anything
        changes (it would poison every slot)."""
        k = self._vector(key, "key")
        if value is None:
            self.memory._require_autoassociative("a store write without a value")
        v = k.clone() if value is None else self._vector(value, "value")
        while len(self) >= self.capacity:
            lru = min(self._keys, key=lambda i: (self._last_used[i], self._written_at[i]))
            self.forget(lru)
        w = self._address(k[None])  # (1, K)
        if self.alpha != 1.0:  # partial write: move the key's recall alpha of the way to the value
            state = self.state
            before = (w.to(state.precision.dtype) @ state.memory.to(state.precision.dtype))[0]  # (C,) recall of key
            v = (before + self.alpha * (v.to(before.dtype) - before)).to(torch.float32)
        self._state = self.memory.accumulate(self._state, v[None], alpha=1.0, W=w)
        self._stale = True
        self._clock += 1
        eid = self._next_id
        self._next_id += 1
        self._keys[eid], self._values[eid], self._addresses[eid] = k, v, w[0]
        self._last_used[eid] = self._written_at[eid] = self._clock
        return eid

    def forget(self, episode_id: int) -> None:
        """Exact forgetting (alpha = -1 with the episode's own addressing): the others are recalled as before."""
        if episode_id not in self._keys:
            raise KeyError(f"no episode {episode_id} in the store (held: {self.episode_ids})")
        w = self._addresses[episode_id][None]  # (1, K)
        self._state = self.memory.accumulate(self._state, self._values[episode_id][None], alpha=-1.0, W=w)
        self._stale = self._forgot = True
        for table in (self._keys, self._values, self._addresses, self._last_used, self._written_at):
            del table[episode_id]

    def nearest(self, query: Tensor) -> list[int]:
        """Id of the held episode whose addressing best matches (cosine) each query; does not count as a read."""
        if len(self) == 0:
            return []
        q = query.reshape(-1, self.memory.key_dim)
        wq = self._address(q)  # (Nq, K)
        ids = self.episode_ids
        stored = torch.stack([self._addresses[i] for i in ids])  # (E, K)
        sim = torch.nn.functional.normalize(wq, dim=-1) @ torch.nn.functional.normalize(stored, dim=-1).mT  # (Nq, E)
        return [ids[j] for j in sim.argmax(dim=-1).tolist()]

    @torch.no_grad()
    def read(self, query: Tensor) -> Tensor:
        """Deterministic key-value read of query (Nq, C) or (C,), same shape/dtype out; marks the best-matching
        held episode of each query as used (LRU).  An empty store reads from the prior (query M0^+ M0)."""
        q = query.reshape(-1, self.memory.key_dim)  # (Nq, key_dim)
        state = self.state
        M = state.memory.to(device=self.device, dtype=state.precision.dtype)  # (K, C)
        out = self._address(q) @ M  # (Nq, C) noise-free whatever the module's mode
        self._clock += 1
        for eid in self.nearest(q):
            self._last_used[eid] = self._clock
        return out.to(query.dtype).reshape(*query.shape[:-1], self.memory.episode_dim)

    # ---------------------------------------------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Tensor]:
        ids = self.episode_ids
        C, K, Ck = self.memory.episode_dim, self.memory.memory_size, self.memory.key_dim
        wd = self._state.precision.dtype

        def stack(table: dict[int, Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            return torch.stack([table[i] for i in ids]) if ids else torch.zeros(shape, dtype=dtype, device=self.device)

        d = {f"state.{k}": v for k, v in self.state.state_dict().items()}
        d.update(
            episode_ids=torch.tensor(ids, dtype=torch.int64),
            keys=stack(self._keys, (0, Ck), torch.float32),
            values=stack(self._values, (0, C), torch.float32),
            addresses=stack(self._addresses, (0, K), wd),
            last_used=torch.tensor([self._last_used[i] for i in ids], dtype=torch.int64),
            written_at=torch.tensor([self._written_at[i] for i in ids], dtype=torch.int64),
            clock=torch.tensor(self._clock, dtype=torch.int64),
            next_id=torch.tensor(self._next_id, dtype=torch.int64),
            capacity=torch.tensor(self.capacity, dtype=torch.int64),
        )
        return d

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        state = MemoryState.from_state_dict({k[len("state.") :]: v for k, v in d.items() if k.startswith("state.")})
        self.memory._check_state(state)
        self._state = state.to(self.device)
        self._stale = self._forgot = False
        ids = [int(i) for i in d["episode_ids"].tolist()]
        self._keys = {i: d["keys"][j].to(self.device) for j, i in enumerate(ids)}
        self._values = {i: d["values"][j].to(self.device) for j, i in enumerate(ids)}
        self._addresses = {i: d["addresses"][j].to(self.device) for j, i in enumerate(ids)}
        self._last_used = {i: int(d["last_used"][j]) for j, i in enumerate(ids)}
        self._written_at = {i: int(d["written_at"][j]) for j, i in enumerate(ids)}
        self._clock = int(d["clock"])
        self._next_id = int(d["next_id"])
        self.capacity = int(d["capacity"])
