"""One-shot episodic recall: what no text-only or vision-language baseline can do.

The held-out episodes (`eval/novel_episodes.jsonl` + features) describe scenes with nonce object names (`wug`, `dax`,
...) that never occur in training. N of them are written into a memory ONCE, with no gradient step:
key = `model.memory_key(study view)`, value = `model.episode_latent(caption, study view)`. Each episode is then
queried with the picture alone (the TEST view: same scene, independent noise), the readout becomes the decoder
prefix, and the caption is decoded greedily.

Metrics per N (`evaluation.recall_sizes`, -1 = memory_size, capped to the episodes available and to min(K, C), the
bound below which key-value recall is exact): exact match of the decoded caption, nonce-word recall (the nonce word
appears in the decoded caption), teacher-forced token accuracy, and choice accuracy (the true caption outscores its 3
foils that change the nonce word, a colour or the other object; chance 1/4). The baseline is the SAME decoding path
with a memory holding no episodes (the readout of `memory.empty_state()`); a second reference decodes from the test
picture through the vision prefix without memory (the captioning path: it cannot know a nonce name).

Editing: an `EpisodicStore` holding N episodes forgets half of them (exact alpha = -1 updates): the rest must be
recalled as before (and as a fresh write of only them), the forgotten ones not. LRU: a store of capacity C receives
C episodes, C/4 of them are read, then C/2 more arrive: the C/2 least recently used are evicted, the read ones stay.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bitmar.data import layout
from bitmar.evaluation.context import (
    EvalContext,
    TaskSkipped,
    caption_token_ids,
    greedy_captions,
    normalize,
    pad_sequences,
    read_features,
    read_jsonl,
    score_sequences,
    teacher_forced_accuracy,
)
from bitmar.memory import EpisodicStore
from bitmar.training.losses import lm_loss

NUM_EXAMPLES = 3
MAX_GROUPS = 8  # disjoint groups of N episodes measured per memory size
SLOW_LEARNING_STEPS = (1, 10)  # the gradient-step baseline a reader asks for: fine-tune the decoder on the study set
SLOW_LEARNING_SIZES = (1, 16)  # episodes learned by gradient steps (the largest that fits is used too)


class _Episodes:
    """The eval episodes with their token ids, keys, values and query keys (computed once)."""

    def __init__(self, ctx: EvalContext) -> None:
        records = read_jsonl(
            ctx.eval_path(layout.NOVEL_EPISODES_FILE), ("caption", "nonce_words", "study_image", "test_image")
        )
        rows = max(max(int(r["study_image"]), int(r["test_image"])) for r in records) + 1
        features = read_features(ctx.eval_path(layout.NOVEL_EPISODES_FEATURES), ctx.cfg.model.vision_encoder_dim, rows)
        self.captions = [str(r["caption"]) for r in records]
        self.nonce = [[str(w) for w in r["nonce_words"]] for r in records]
        self.foils = [[str(f) for f in r.get("foils", [])] for r in records]
        self.seqs = caption_token_ids(ctx.tokenizer, self.captions, ctx.max_len)
        self.study = study = ctx.tensor(features[[int(r["study_image"]) for r in records]])  # (N, D)
        self.test = ctx.tensor(features[[int(r["test_image"]) for r in records]])  # (N, D)
        model, bs = ctx.model, ctx.ecfg.batch_size
        keys, values, queries = [], [], []
        if not ctx.has_memory:  # the ablation without memory: only the vision path and gradient steps can learn
            self.keys = self.values = self.queries = torch.empty(0)
            return
        with torch.no_grad():
            for s in range(0, len(records), bs):
                ids, mask = pad_sequences(self.seqs[s : s + bs], ctx.tokenizer.pad_token_id)
                ids, mask = ids.to(ctx.device), mask.to(ctx.device)
                keys.append(model.memory_key(study[s : s + bs]).float())
                values.append(model.episode_latent(ids, mask, study[s : s + bs]).float())
                queries.append(model.memory_key(self.test[s : s + bs]).float())
        self.keys, self.values, self.queries = torch.cat(keys), torch.cat(values), torch.cat(queries)  # (N, E) each

    def __len__(self) -> int:
        return len(self.captions)


def _choice_hits(ctx: EvalContext, ep: _Episodes, idx: list[int], readout: Tensor) -> list[bool] | None:
    """Per episode: its caption outscores all its foils given the readout (None when the set has no foils)."""
    widths = {len(ep.foils[i]) for i in idx}
    if len(widths) != 1 or 0 in widths:
        return None
    width = 1 + widths.pop()
    texts = [t for i in idx for t in (ep.captions[i], *ep.foils[i])]
    seqs = caption_token_ids(ctx.tokenizer, texts, ctx.max_len)
    readouts = readout.repeat_interleave(width, dim=0)  # (n * width, E)
    scores, _ = score_sequences(
        ctx.model, seqs, pad_id=ctx.tokenizer.pad_token_id, batch_size=ctx.ecfg.batch_size, device=ctx.device,
        memory_readout=readouts,
    )  # fmt: skip
    scores = scores.view(len(idx), width)
    return (scores[:, 0] > scores[:, 1:].max(dim=1).values).tolist()


def per_episode(
    ctx: EvalContext, ep: _Episodes, idx: list[int], readout: Tensor | None, via_vision: bool = False
) -> dict[str, list]:
    """Per-episode outcomes of episodes `idx` decoded from `readout` (n, E), or from their test view (via_vision)."""
    kw: dict[str, Any] = {"vision_features": ep.test[idx]} if via_vision else {"memory_readout": readout}
    generated = greedy_captions(ctx, len(idx), **kw)
    hits, counts = teacher_forced_accuracy(
        ctx.model, [ep.seqs[i] for i in idx], pad_id=ctx.tokenizer.pad_token_id, batch_size=ctx.ecfg.batch_size,
        device=ctx.device, **kw,
    )  # fmt: skip
    logp, _ = score_sequences(
        ctx.model, [ep.seqs[i] for i in idx], pad_id=ctx.tokenizer.pad_token_id, batch_size=ctx.ecfg.batch_size,
        device=ctx.device, **kw,
    )  # fmt: skip
    return {
        "generated": generated,
        "logp": logp.tolist(),
        "exact": [normalize(g) == normalize(ep.captions[i]) for g, i in zip(generated, idx, strict=True)],
        "nonce": [all(w in g.split() for w in ep.nonce[i]) for g, i in zip(generated, idx, strict=True)],
        "hits": hits.tolist(),
        "counts": counts.tolist(),
        "choice": None if via_vision else _choice_hits(ctx, ep, idx, readout),
        # how close the readout is to the episode's written value: memory fidelity, independent of the decoder
        "cosine": None if via_vision else F.cosine_similarity(readout.float(), ep.values[idx], dim=-1).tolist(),
    }


def _concat(parts: list[dict[str, list | None]]) -> dict[str, list | None]:
    """Per-episode outcome lists of several groups, concatenated in group order."""
    return {k: None if parts[0][k] is None else [x for p in parts for x in p[k]] for k in parts[0]}


def summarize(per: dict[str, list], positions: list[int] | None = None) -> dict[str, Any]:
    """Means over `positions` (indices into the per-episode lists; default all)."""
    pos = list(range(len(per["exact"]))) if positions is None else positions
    if not pos:
        return {"episodes": 0}
    out = {
        "episodes": len(pos),
        "exact_match": float(np.mean([per["exact"][p] for p in pos])),
        "nonce_word_recall": float(np.mean([per["nonce"][p] for p in pos])),
        "token_accuracy": sum(per["hits"][p] for p in pos) / max(1, sum(per["counts"][p] for p in pos)),
        "nll_per_token": -sum(per["logp"][p] for p in pos) / max(1, sum(per["counts"][p] for p in pos)),
    }
    if per["choice"] is not None:
        out["choice_accuracy"] = float(np.mean([per["choice"][p] for p in pos]))
    if per["cosine"] is not None:
        out["readout_cosine"] = float(np.mean([per["cosine"][p] for p in pos]))
    return out


def resolve_recall_sizes(requested: list[int], memory_size: int, episode_dim: int, available: int) -> list[dict]:
    """Each requested N (-1 = memory_size) with the N actually written: min(N, available, min(K, C))."""
    bound = min(memory_size, episode_dim)
    sizes = []
    for req in requested:
        n = memory_size if req == -1 else req
        written = min(n, available, bound)
        reason = None
        if written < n:
            reason = "episodes available" if available <= bound and available < n else "exact-recall bound min(K, C)"
        sizes.append({"requested": req, "resolved": n, "written": written, "capped_by": reason})
    return sizes


@torch.no_grad()
def evaluate_episodic_recall(ctx: EvalContext) -> dict[str, Any]:
    if not ctx.has_vision:
        raise TaskSkipped("model.use_vision=false: episodes are keyed by their picture, which this model cannot see")
    ep = _Episodes(ctx)
    if not ctx.has_memory:
        return _without_memory(ctx, ep)
    model, mcfg = ctx.model, ctx.cfg.model
    total = len(ep)
    sizes = resolve_recall_sizes(list(ctx.ecfg.recall_sizes), mcfg.memory_size, mcfg.memory_key_width, total)
    everything = list(range(total))

    empty_readout, _ = model.read_memory(model.memory.empty_state(), key=ep.queries)  # (N, E): no episode held
    empty = per_episode(ctx, ep, everything, empty_readout)
    vision_only = per_episode(ctx, ep, everything, None, via_vision=True)
    oracle = per_episode(ctx, ep, everything, ep.values)  # a perfect memory: decode the written value itself

    per_size: dict[int, dict[str, Any]] = {}
    groups_of: dict[int, list[list[int]]] = {}
    for n in sorted({s["written"] for s in sizes if s["written"] > 0}):
        # Disjoint groups of n episodes, each written into its own fresh memory: every size is measured on up to
        # MAX_GROUPS * n episodes, not on the first n alone (N = 1 would otherwise be a single coin flip).
        groups_of[n] = [list(range(g * n, (g + 1) * n)) for g in range(min(total // n, MAX_GROUPS))]
        parts = []
        for group in groups_of[n]:
            state = model.write_memory(ep.keys[group], ep.values[group])  # one shot, no gradient step
            readout, _ = model.read_memory(state, key=ep.queries[group])
            parts.append(per_episode(ctx, ep, group, readout))
        per_size[n] = _concat(parts)
    write_seconds = {n: _memory_write_seconds(ctx, ep, n) for n in per_size}
    results = []
    for s in sizes:
        n = s["written"]
        memory = summarize(per_size[n]) if n > 0 else {"episodes": 0}
        measured = [i for group in groups_of.get(n, []) for i in group]
        results.append(
            {
                **s,
                "groups": len(groups_of.get(n, [])),
                "memory": memory,
                "empty_memory": summarize(empty, measured),
                "write_seconds": write_seconds.get(n) if n > 0 else None,
            }
        )

    largest = max(per_size) if per_size else 0
    slow = [
        _slow_learning(ctx, ep, n, steps)
        for n in sorted({min(n, largest) for n in SLOW_LEARNING_SIZES if largest})
        for steps in SLOW_LEARNING_STEPS
    ]
    # Forgetting is measured where one write still recalls (a quarter of the exact-recall bound): "kept episodes
    # unchanged" then means recalled as before forgetting, and as by a fresh write of only them.
    forget_n = max((n for n in per_size if n <= max(2, mcfg.exact_recall_bound // 4)), default=0)
    forgetting = _forgetting(ctx, ep, forget_n) if forget_n >= 2 else None
    lru = _lru(ctx, ep, min(total, mcfg.exact_recall_bound))

    examples = [
        {
            "caption": ep.captions[i],
            "memory": per_size[largest]["generated"][i],
            "empty_memory": empty["generated"][i],
            "vision_only": vision_only["generated"][i],
        }
        for i in range(min(NUM_EXAMPLES, largest))
    ]
    metrics = {
        "episodes_available": total,
        "memory_size": mcfg.memory_size,
        "episode_dim": mcfg.episode_dim,
        "exact_recall_bound": mcfg.exact_recall_bound,
        "sizes": results,
        "vision_only_no_memory": summarize(vision_only),
        "empty_memory_all": summarize(empty),
        "oracle_written_value": summarize(oracle),
        "forgetting": forgetting,
        "lru_eviction": lru,
        "slow_learning": slow,
        "examples": examples,
    }
    headline = _headline(results, per_size, empty, oracle, forgetting, lru, slow)
    return {
        "metrics": metrics,
        "headline": headline,
        "notes": [
            f"{total} novel-word episodes; written once (no gradient), queried with a second view of the picture; "
            "reference column = the same decoding with an empty memory (editing rows: the exact outcome); "
            "readout cosine = cos(readout, written value): memory fidelity, independent of the decoder"
        ],
    }


def _row(metric: str, value: Any, reference: Any) -> dict[str, Any]:
    return {"metric": metric, "value": value, "reference": reference}


def _headline(
    results: list[dict[str, Any]],
    per_size: dict[int, dict[str, list]],
    empty: dict[str, list],
    oracle: dict[str, list],
    forgetting: dict[str, Any] | None,
    lru: dict[str, Any] | None,
    slow: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        n = r["written"]
        if n == 0:
            continue
        asked = f" (asked {r['requested']})" if n != r["requested"] else ""
        mem, base = r["memory"], r["empty_memory"]
        rows.append(_row(f"N={n}{asked}: nonce-word recall", mem["nonce_word_recall"], base["nonce_word_recall"]))
        rows.append(_row(f"N={n}{asked}: exact match", mem["exact_match"], base["exact_match"]))
        rows.append(_row(f"N={n}: readout cosine to its value", mem["readout_cosine"], base["readout_cosine"]))
    if per_size:
        largest = max(per_size)
        mem = summarize(per_size[largest])
        base = next(r["empty_memory"] for r in results if r["written"] == largest)
        rows.append(_row(f"N={largest}: teacher-forced token accuracy", mem["token_accuracy"], base["token_accuracy"]))
        rows.append(_row(f"N={largest}: caption NLL/token", mem["nll_per_token"], base["nll_per_token"]))
        if "choice_accuracy" in mem:
            rows.append(_row(f"N={largest}: caption beats 3 foils", mem["choice_accuracy"], base["choice_accuracy"]))
    best = summarize(oracle)
    rows.append(_row("decoding the written value itself: exact match", best["exact_match"], None))
    rows.append(_row("decoding the written value itself: nonce-word recall", best["nonce_word_recall"], None))
    for sl in slow or []:
        rows.append(_row(f"slow learning, N={sl['episodes']}, {sl['steps']} decoder step(s): seconds",
                         sl["seconds"], sl["memory_write_seconds"]))  # fmt: skip
        rows.append(
            _row(
                f"slow learning, N={sl['episodes']}, {sl['steps']} decoder step(s): nonce-word recall",
                sl["nonce_word_recall"],
                sl["before"]["nonce_word_recall"],
            )
        )
    if forgetting is not None:
        rows.append({**_row("forgetting: forgotten episodes, nonce-word recall",
                            forgetting["forgotten_episodes"]["nonce_word_recall"], 0.0),
                     "higher_is_better": False})  # fmt: skip
        kept, kept_before = forgetting["kept"], forgetting["kept_before"]
        rows.append(_row("forgetting: kept episodes, nonce-word recall (reference: before forgetting)",
                         kept["nonce_word_recall"], kept_before["nonce_word_recall"]))  # fmt: skip
        rows.append(
            _row(
                f"forget {forgetting['forgotten']} of {forgetting['written']}: readout error vs never written",
                forgetting["relative_readout_difference_vs_fresh_write"],
                0.0,
            )
        )
    if lru is not None:
        rows.append(_row(f"LRU store (capacity {lru['capacity']}): evicts the least recently used",
                         lru["evicted_as_expected"], True))  # fmt: skip
        rows.append(_row("LRU store: readout error vs a fresh write of the held episodes",
                         lru["relative_readout_difference_vs_fresh_write"], 0.0))  # fmt: skip
    return rows


def _relative_difference(ctx: EvalContext, ep: _Episodes, held: list[int], readout: Tensor) -> float:
    """max |readout - fresh| / max |fresh|, fresh = the same queries read from a memory written with `held` only."""
    fresh_state = ctx.model.write_memory(ep.keys[held], ep.values[held])
    fresh, _ = ctx.model.read_memory(fresh_state, key=ep.queries[held])
    return float((readout - fresh).abs().max()) / float(fresh.abs().max().clamp(min=1e-12))


def _forgetting(ctx: EvalContext, ep: _Episodes, n: int) -> dict[str, Any]:
    store = EpisodicStore(ctx.model.memory, capacity=n, device=ctx.device)
    ids = [store.write(ep.keys[i], ep.values[i]) for i in range(n)]
    forget = list(range(n // 2))
    for i in forget:
        store.forget(ids[i])
    kept = list(range(n // 2, n))
    readout = store.read(ep.queries[kept])  # (n - n//2, E)
    before_state = ctx.model.write_memory(ep.keys[:n], ep.values[:n])
    before, _ = ctx.model.read_memory(before_state, key=ep.queries[kept])
    return {
        "written": n,
        "forgotten": len(forget),
        "kept_before": summarize(per_episode(ctx, ep, kept, before)),
        "kept": summarize(per_episode(ctx, ep, kept, readout)),
        "forgotten_episodes": summarize(per_episode(ctx, ep, forget, store.read(ep.queries[forget]))),
        "relative_readout_difference_vs_fresh_write": _relative_difference(ctx, ep, kept, readout),
    }


def _lru(ctx: EvalContext, ep: _Episodes, limit: int) -> dict[str, Any] | None:
    capacity = limit * 2 // 3  # room for capacity + capacity/2 episodes in the eval set
    if capacity < 4:
        return None
    store = EpisodicStore(ctx.model.memory, capacity=capacity, device=ctx.device)
    episode_of: dict[int, int] = {}
    for i in range(capacity):
        episode_of[store.write(ep.keys[i], ep.values[i])] = i
    touched = list(range(capacity // 4))
    store.read(ep.keys[touched])  # reading marks these as recently used
    extra = list(range(capacity, capacity + capacity // 2))
    for i in extra:
        episode_of[store.write(ep.keys[i], ep.values[i])] = i
    held = sorted(episode_of[eid] for eid in store.episode_ids)
    evicted = sorted(set(range(capacity + len(extra))) - set(held))
    expected_evicted = list(range(capacity // 4, capacity // 4 + len(extra)))
    readout = store.read(ep.queries[held])
    return {
        "capacity": capacity,
        "written": capacity + len(extra),
        "read_before_overflow": len(touched),
        "evicted_as_expected": evicted == expected_evicted,
        "relative_readout_difference_vs_fresh_write": _relative_difference(ctx, ep, held, readout),
        "held": summarize(per_episode(ctx, ep, held, readout)),
        "evicted": summarize(per_episode(ctx, ep, evicted, store.read(ep.queries[evicted]))),
    }


def _memory_write_seconds(ctx: EvalContext, ep: _Episodes, n: int) -> float:
    """Wall time of learning n episodes with the memory: encode key and value of each, one least-squares write."""
    seqs = ep.seqs[:n]
    start = time.perf_counter()
    ids, mask = pad_sequences(seqs, ctx.tokenizer.pad_token_id)
    ids, mask = ids.to(ctx.device), mask.to(ctx.device)
    study = ep.study[:n]
    keys = ctx.model.memory_key(study).float()
    values = ctx.model.episode_latent(ids, mask, study).float()
    ctx.model.write_memory(keys, values)
    return time.perf_counter() - start


def _slow_learning(ctx: EvalContext, ep: _Episodes, n: int, steps: int) -> dict[str, Any]:
    """Baseline: learn the same n study episodes by `steps` AdamW steps on the decoder (caption loss conditioned on
    the study view, the phase-2 objective), then caption the TEST view without memory. A copy of the model is
    trained; the evaluated model is untouched."""
    idx = list(range(n))
    model = copy.deepcopy(ctx.model)
    params = [p for p in model.decoder.parameters() if p.requires_grad]
    lr = float(ctx.cfg.training.learning_rate)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(ctx.cfg.training.betas), weight_decay=0.0)
    ids, mask = pad_sequences(ep.seqs[:n], ctx.tokenizer.pad_token_id)
    ids, mask = ids.to(ctx.device), mask.to(ctx.device)
    study = ep.study[:n]
    sub = copy.copy(ctx)
    sub.model = model
    model.eval()
    before = summarize(per_episode(sub, ep, idx, None, via_vision=True))
    start = time.perf_counter()
    model.train()
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            out = model(ids, mask, vision_features=study, return_latents=False)
            lm_loss(out.logits, ids, mask).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    after = summarize(per_episode(sub, ep, idx, None, via_vision=True))
    return {
        "episodes": n,
        "steps": steps,
        "learning_rate": lr,
        "seconds": seconds,
        "memory_write_seconds": _memory_write_seconds(ctx, ep, n) if ctx.has_memory else None,
        "before": before,
        **after,
    }


def _without_memory(ctx: EvalContext, ep: _Episodes) -> dict[str, Any]:
    """The no-memory ablation: caption each test view (it cannot know a new name), and learn by gradient steps."""
    per_vision = per_episode(ctx, ep, list(range(len(ep))), None, via_vision=True)
    vision_only = summarize(per_vision)
    largest = min(len(ep), max(SLOW_LEARNING_SIZES))
    slow = [
        _slow_learning(ctx, ep, n, steps)
        for n in sorted({min(n, largest) for n in SLOW_LEARNING_SIZES})
        for steps in SLOW_LEARNING_STEPS
    ]
    rows = [_row("no memory: nonce-word recall from the test view", vision_only["nonce_word_recall"], None)]
    # The rows of the memory model under the same names: with no memory, N study episodes leave nothing to recall
    # from but the test view itself, so the ablation table pairs "N=n: nonce-word recall" across variants.
    sizes = resolve_recall_sizes(list(ctx.ecfg.recall_sizes), ctx.cfg.model.memory_size, 10**9, len(ep))
    for r in sizes:
        n = r["written"]
        if n == 0:
            continue
        asked = f" (asked {r['requested']})" if n != r["requested"] else ""
        measured = [i for g in range(min(len(ep) // n, MAX_GROUPS)) for i in range(g * n, (g + 1) * n)]
        part = summarize(per_vision, measured)
        rows.append(_row(f"N={n}{asked}: nonce-word recall", part["nonce_word_recall"], None))
        rows.append(_row(f"N={n}{asked}: exact match", part["exact_match"], None))
    rows += [
        _row(f"slow learning, N={sl['episodes']}, {sl['steps']} decoder step(s): nonce-word recall",
             sl["nonce_word_recall"], sl["before"]["nonce_word_recall"])
        for sl in slow
    ]  # fmt: skip
    return {
        "metrics": {"episodes_available": len(ep), "vision_only_no_memory": vision_only, "slow_learning": slow},
        "headline": rows,
        "notes": [
            "model.use_memory=false: no episode can be written; reported are the vision-only decoding of the "
            "test view and the gradient-step baseline"
        ],  # fmt: skip
    }
