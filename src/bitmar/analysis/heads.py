"""Attention-head importance, entropy and memory attention, measured during training.

Method. Every attention module multiplies head h's output by a gate g_h (`head_gates`, ones in training), so
the loss depends on the gates and one backward pass w.r.t. the gates alone gives, for every head of every stack,

    I_h = | g_h * dL/dg_h |,        dL/dg_h = sum_{b, t} < o_h(b, t), dL/d(g_h o_h)(b, t) >

where o_h is the head's output (before the output projection) and L is the training objective of the current
phase on a small analysis batch. At g_h = 1 this is the gradient importance |dL/dg_h| of Michel et al. 2019
("Are Sixteen Heads Really Better than One?"); the factor g_h makes it the first-order Taylor estimate of the loss
change when the head is removed (Molchanov et al. 2019), which is exactly 0 for a head already gated off (at g_h = 0,
|dL/dg_h| itself is |<o_h, upstream grad>| and in general not 0). The gradient of the batch-mean loss is taken
(one backward, not one per example as Michel et al.), so per-example signs may cancel; the tracked score averages
over measurements with a bias-corrected exponential moving average (beta = `ema_decay`, 0.9):

    m_n = beta * m_{n-1} + (1 - beta) * I^(n),        score_n = m_n / (1 - beta^n).

On the same batch a no-grad forward with `output_attentions=True` gives, per head, the attention entropy
H_h = mean over examples and real query positions of -sum_k A[q, k] log A[q, k] (nats) and the concentration
C_h = mean of max_k A[q, k]. The "memory" type scores each decoder (layer, head) by the attention mass that text
queries put on the decoder prefix (memory readout tokens, then vision tokens): M_h = mean_q sum_{k < P} A[q, k];
its entropy is that of the prefix attention renormalised over the P prefix positions. In phase >= 3 the analysis
batch's episodes are written into a fresh memory and recalled with their image keys (as validation does), so the
prefix holds [readout tokens, vision tokens] as at inference; before phase 3 it holds the vision tokens only.

Which heads get a gradient depends on the phase's loss: phase 1 text batches reach the decoder (and the encoder
through the masked-token loss); caption batches add the vision encoder; the cross-modal stack feeds the episode
latent z_m and so gets importance from phase 3 on. A type's history gets a row only at steps where it was measured.

Cost: one forward/backward of the objective (gradients for the gates only: parameter `.grad` is never touched)
and one or two no-grad forwards, on the analysis batch, every `attention_analysis.log_every_n_steps` optimizer
steps, on rank 0 only (other ranks return at once). The training trajectory is unchanged: the global RNG is
forked (and seeded from the step, so a measurement is reproducible), module train/eval modes and the gates'
`requires_grad` are restored, and nothing is stepped.

Files (rank 0, under the run's `attention_analysis/`): `history_{type}.npz` (rewritten atomically at every
measurement; see `HeadHistory`), `top_heads_{type}_step_{X}.npy` ((K, 3): layer, head, score), with
`attention_analysis.save_head_patterns` `head_patterns_{type}_step_{X}.npz` (attention maps of the top heads on the
first analysis example), and at `on_epoch_end` / `on_train_end` the figures `attention_heads_{type}_step_{X}.png`
and `attention_timeline_step_{X}.png`. A resumed run truncates each history to the steps before its first new
measurement, so a resume continues the same history.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bitmar.analysis.history import (
    ANALYSIS_TYPES,
    GRADIENT_TYPES,
    METRIC_NAMES,
    HeadHistory,
    history_path,
    save_npy_atomic,
    save_npz_atomic,
)

log = logging.getLogger("bitmar")


# ------------------------------------------------------------------------------------------------ measurements


def gate_importance(
    loss_fn: Callable[[], Tensor], modules: dict[str, list[nn.Module]]
) -> tuple[dict[str, np.ndarray], float]:
    """|g_h * dL/dg_h| per (layer, head) for every type whose gates the loss reaches -> ({type: (L, H)}, loss).

    `loss_fn` runs the forward pass; only the gate buffers get gradients (`torch.autograd.grad`, so no parameter's
    `.grad` changes). A type none of whose gates the loss depends on is left out; within a reached type a layer
    the loss does not depend on scores 0. The gates' `requires_grad` flags are restored.
    """
    entries = [(kind, layer, module) for kind, mods in modules.items() for layer, module in enumerate(mods)]
    gates = [module.head_gates for _, _, module in entries]
    flags = [gate.requires_grad for gate in gates]
    for gate in gates:
        gate.requires_grad_(True)
    try:
        loss = loss_fn()
        grads = (
            torch.autograd.grad(loss, gates, allow_unused=True) if gates and loss.requires_grad else [None] * len(gates)
        )
    finally:
        for gate, flag in zip(gates, flags, strict=True):
            gate.requires_grad_(flag)
    result: dict[str, np.ndarray] = {}
    reached = {kind for (kind, _, _), grad in zip(entries, grads, strict=True) if grad is not None}
    for kind in reached:
        rows = []
        for (k, _, module), grad in zip(entries, grads, strict=True):
            if k != kind:
                continue
            if grad is None:
                rows.append(np.zeros(module.num_heads))
            else:
                rows.append((module.head_gates.detach() * grad.detach()).abs().double().cpu().numpy())
        result[kind] = np.stack(rows)  # (L, H)
    return result, float(loss.detach())


def _masked_head_mean(values: Tensor, query_mask: Tensor | None) -> Tensor:  # (B, H, Tq), (B, Tq) -> (H,)
    if query_mask is None:
        return values.mean(dim=(0, 2))
    weight = query_mask.to(values.dtype)[:, None, :]  # (B, 1, Tq)
    return (values * weight).sum(dim=(0, 2)) / weight.sum(dim=(0, 2)).clamp(min=1)


def _entropy(p: Tensor) -> Tensor:  # (..., K) probabilities -> (...) nats; 0 log 0 = 0
    return -(p * p.clamp(min=1e-12).log()).sum(dim=-1)


def attention_statistics(weights: Tensor, query_mask: Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-head mean entropy (nats) and mean max weight over examples and real queries -> ((H,), (H,)).

    weights (B, H, Tq, Tk); query_mask (B, Tq), 1 = a real query (padding rows are left out), None = all.
    """
    p = weights.detach().float()
    entropy = _masked_head_mean(_entropy(p), query_mask)
    concentration = _masked_head_mean(p.amax(dim=-1), query_mask)
    return entropy.double().cpu().numpy(), concentration.double().cpu().numpy()


def prefix_statistics(
    weights: Tensor, prefix_length: int, text_mask: Tensor | None, readout_tokens: int = 0
) -> dict[str, np.ndarray]:
    """Decoder attention of the text queries on the prefix, per head -> {"mass", "entropy", "concentration",
    "readout_mass"} each (H,).

    weights (B, H, P + T, P + T) of the decoder; text_mask (B, T). "mass" is the attention mass on the P prefix
    positions, "entropy"/"concentration" describe that attention renormalised over the prefix, "readout_mass" the
    mass on the first `readout_tokens` positions (the memory readout) and "readout_entropy" the entropy of the
    attention renormalised over those positions (0 without readout tokens).
    """
    if prefix_length <= 0:
        raise ValueError("prefix_statistics needs a decoder prefix (prefix_length > 0)")
    rows = weights.detach().float()[:, :, prefix_length:, :]  # (B, H, T, P + T): text queries only
    on_prefix = rows[..., :prefix_length]  # (B, H, T, P)
    mass = on_prefix.sum(dim=-1)  # (B, H, T)
    renormalised = on_prefix / mass.clamp(min=1e-12)[..., None]
    stats = {
        "mass": _masked_head_mean(mass, text_mask),
        "entropy": _masked_head_mean(_entropy(renormalised), text_mask),
        "concentration": _masked_head_mean(renormalised.amax(dim=-1), text_mask),
        "readout_mass": _masked_head_mean(rows[..., :readout_tokens].sum(dim=-1), text_mask),
    }
    on_readout = rows[..., :readout_tokens]  # (B, H, T, R)
    readout_p = on_readout / on_readout.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    stats["readout_entropy"] = _masked_head_mean(_entropy(readout_p), text_mask)
    return {k: v.double().cpu().numpy() for k, v in stats.items()}


# ----------------------------------------------------------------------------------------------------- tracker


@dataclass
class _Observation:
    """What one attention pass saw for one type (per layer (H,) arrays and the maps of the first example)."""

    entropy: np.ndarray  # (L, H)
    concentration: np.ndarray  # (L, H)
    maps: list[Tensor]  # per layer (H, Tq, Tk), first example, cropped to its real tokens
    score: np.ndarray | None = None  # memory type: prefix mass (L, H)
    readout_mass: np.ndarray | None = None
    readout_entropy: np.ndarray | None = None
    prefix_length: int = 0
    readout_tokens: int = 0


class HeadImportanceTracker:
    """Measures head importance during training; see the module docstring for the method and the files.

    Trainer hooks: `measure(objective, batch, phase, step, logger)` every `cfg.log_every_n_steps` optimizer steps,
    `on_epoch_end(epochs_done, step, logger)` after each epoch (figures every `cfg.viz_every_n_epochs` finished
    epochs) and `on_train_end(step, logger)` (final figures). Safe to call on every rank: only the rank whose
    logger is enabled measures and writes.
    """

    def __init__(
        self, model: nn.Module, cfg: Any, output_dir: Path, ema_decay: float = 0.9, log_metrics: bool = True
    ) -> None:
        """log_metrics=False (the trainer passes `wandb.log_attention`): measure and write the files, but send no
        Attention/* metric or figure to the run logger."""
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        self.log_metrics = log_metrics
        self.model = model
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.ema_decay = ema_decay
        self.histories: dict[str, HeadHistory] = {}
        self._resumed = False
        self._last_figure_step: int | None = None

    # ---------------------------------------------------------------------------------------------- measure
    def measure(
        self, objective: nn.Module, batch: dict[str, Any], phase: int, step: int, logger: Any
    ) -> dict[str, float]:
        """One measurement on `batch`; logs metrics and writes files on the main rank; returns the metrics."""
        if not logger.enabled:
            return {}
        start = time.perf_counter()
        self._resume_histories(step)
        modes = {module: module.training for module in objective.modules()}
        device = next(self.model.parameters()).device
        fork_devices = (
            [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        )
        objective.eval()  # no dropout or addressing noise: a measurement depends on the weights and the batch only
        try:
            with torch.random.fork_rng(devices=fork_devices):
                # The objective draws MLM masks / memory query noise: a seed from the step makes them reproducible.
                torch.random.default_generator.manual_seed(step)
                if device.type == "cuda":
                    torch.cuda.manual_seed(step)
                modules = {k: v for k, v in self.model.attention_modules().items() if k in GRADIENT_TYPES and v}
                raw, loss = gate_importance(lambda: objective(batch, phase)[0], modules)
                with torch.no_grad():
                    observed = self._observe(batch, phase)
        finally:
            for module, mode in modes.items():
                module.train(mode)
        if not np.isfinite(loss):
            log.warning("attention analysis at step %d: non-finite loss, measurement skipped", step)
            return {}
        metrics = self._record(raw, observed, phase, step)
        metrics["Attention/Analysis_Seconds"] = time.perf_counter() - start
        if self.log_metrics:
            logger.log_metrics(metrics, step=step)
        return metrics

    def _observe(self, batch: dict[str, Any], phase: int) -> dict[str, _Observation]:
        """No-grad forward(s) with attention maps: entropy and concentration per type, prefix attention."""
        model = self.model
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        vision = batch.get("vision_features") if batch.get("kind") == "caption" else None
        if vision is not None and not getattr(model.config, "use_vision", True):
            vision = None
        out = model(ids, mask, vision_features=vision, output_attentions=True)
        n0 = int(mask[0].sum())  # real tokens of the first example (right padding)
        observed: dict[str, _Observation] = {}
        for kind, maps in out.attentions.items():
            if not maps:
                continue
            if kind == "cross_modal" and not self.cfg.analyze_cross_modal:
                continue
            query_mask = self._query_mask(kind, mask, out.prefix_length)
            stats = [attention_statistics(w, query_mask) for w in maps]
            observed[kind] = _Observation(
                entropy=np.stack([s[0] for s in stats]),
                concentration=np.stack([s[1] for s in stats]),
                maps=[self._crop(kind, w[0], n0, out.prefix_length) for w in maps],
            )
        if not self.cfg.analyze_memory_attention:
            return observed
        decoder_maps, prefix, readout_tokens = out.attentions["decoder"], out.prefix_length, 0
        memory = getattr(model, "memory", None)
        if phase >= 3 and memory is not None and vision is not None and out.multimodal_latent is not None:
            # Recall the batch's own episodes from a fresh memory with their image keys: the inference-time prefix.
            keys = model.vision_key(vision, out.vision_latent)  # (B, key width)
            state = model.write_memory(keys, out.multimodal_latent)
            readout, _ = memory.read_kv(keys, state)  # (B, E)
            recalled = model(
                ids, mask, vision_features=vision, memory_readout=readout, return_latents=False, output_attentions=True
            )
            decoder_maps, prefix = recalled.attentions["decoder"], recalled.prefix_length
            readout_tokens = int(model.config.memory_prefix_tokens)
        if prefix > 0 and decoder_maps:
            stats = [prefix_statistics(w, prefix, mask, readout_tokens) for w in decoder_maps]
            observed["memory"] = _Observation(
                entropy=np.stack([s["entropy"] for s in stats]),
                concentration=np.stack([s["concentration"] for s in stats]),
                maps=[self._crop("decoder", w[0], n0, prefix) for w in decoder_maps],
                score=np.stack([s["mass"] for s in stats]),
                readout_mass=np.stack([s["readout_mass"] for s in stats]) if readout_tokens else None,
                readout_entropy=np.stack([s["readout_entropy"] for s in stats]) if readout_tokens else None,
                prefix_length=prefix,
                readout_tokens=readout_tokens,
            )
        return observed

    @staticmethod
    def _query_mask(kind: str, mask: Tensor, prefix_length: int) -> Tensor | None:
        if kind in ("encoder", "cross_modal"):
            return mask  # (B, T): text queries
        if kind == "decoder":  # [prefix, text] queries: the text ones count
            return torch.cat([mask.new_zeros(mask.shape[0], prefix_length), mask], dim=1)
        return None  # vision tokens are all real

    @staticmethod
    def _crop(kind: str, weights: Tensor, n0: int, prefix_length: int) -> Tensor:  # (H, Tq, Tk) of one example
        if kind == "encoder":
            return weights[:, :n0, :n0]
        if kind == "cross_modal":
            return weights[:, :n0, :]
        if kind == "decoder":
            return weights[:, : prefix_length + n0, : prefix_length + n0]
        return weights

    def _resume_histories(self, step: int) -> None:
        """Once per process: continue the histories on disk, dropping measurements at or after `step`."""
        if self._resumed:
            return
        self._resumed = True
        for kind in ANALYSIS_TYPES:
            path = history_path(self.output_dir, kind)
            if not path.is_file():
                continue
            try:
                history = HeadHistory.load(path)
            except ValueError as err:  # keep the damaged file for the user; the type starts a new history
                kept = path.with_name(path.name + ".damaged")
                os.replace(path, kept)
                log.warning("attention analysis: %s; moved it to %s and started a new %s history", err, kept, kind)
                continue
            before = len(history)
            history.truncate_before(step)
            if len(history) < before:  # measurements a resumed run will redo: gone from disk too
                if len(history):
                    history.save(path)
                else:
                    path.unlink()
            if len(history):
                self.histories[kind] = history
                log.info("attention analysis: continuing %s with %d earlier measurement(s)", path, len(history))

    def _history(self, kind: str, num_layers: int, num_heads: int) -> HeadHistory:
        history = self.histories.get(kind)
        if history is not None and (history.num_layers, history.num_heads) != (num_layers, num_heads):
            log.warning(
                "attention analysis: %s holds %dx%d heads but the model has %dx%d; starting a new history",
                history_path(self.output_dir, kind),
                history.num_layers,
                history.num_heads,
                num_layers,
                num_heads,
            )
            history = None
        if history is None:
            history = HeadHistory(
                kind,
                "prefix_mass" if kind == "memory" else "gradient",
                num_layers,
                num_heads,
                ema_decay=self.ema_decay,
                track_top_k=self.cfg.track_top_k,
            )
            self.histories[kind] = history
        return history

    def _record(
        self, raw: dict[str, np.ndarray], observed: dict[str, _Observation], phase: int, step: int
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for kind, obs in observed.items():
            if kind == "memory":
                continue
            name = METRIC_NAMES[kind]
            for layer, entropy in enumerate(obs.entropy):
                metrics[f"Attention/{name}_layer_{layer}_Entropy"] = float(entropy.mean())
            metrics[f"Attention/{name}_Concentration"] = float(obs.concentration.mean())
        if "memory" in observed:
            obs = observed["memory"]
            # The whole decoder prefix (readout + vision tokens), and the vision part under its own name.
            metrics["Attention/Prefix_Mean"] = float(obs.score.mean())
            metrics["Attention/Prefix_Entropy"] = float(obs.entropy.mean())
            readout = obs.readout_mass if obs.readout_mass is not None else np.zeros_like(obs.score)
            metrics["Attention/Vision_Prefix_Mean"] = float((obs.score - readout).mean())
            if obs.readout_mass is not None and obs.readout_entropy is not None:
                # Memory attention only when a memory readout is in the prefix (phase >= 3): the mass the text
                # queries put on the readout tokens, and the entropy of that attention over the readout tokens.
                metrics["Attention/Memory_Mean"] = float(obs.readout_mass.mean())
                metrics["Attention/Memory_Readout_Mean"] = metrics["Attention/Memory_Mean"]  # earlier name
                metrics["Attention/Memory_Entropy"] = float(obs.readout_entropy.mean())
        scores = dict(raw)
        if "memory" in observed:
            scores["memory"] = observed["memory"].score
        for kind, values in scores.items():
            obs = observed.get(kind)
            if obs is None:  # not observed (e.g. analyze_cross_modal is false): no history row
                continue
            history = self._history(kind, *values.shape)
            history.append(
                step,
                phase,
                values,
                obs.entropy,
                obs.concentration,
                readout_mass=obs.readout_mass,
                prefix_length=obs.prefix_length,
                readout_tokens=obs.readout_tokens,
            )
            best = history.top_heads()  # from the stored row, so the file and the history agree
            for rank, (_, _, value) in enumerate(best, start=1):
                metrics[f"Attention/Top_{METRIC_NAMES[kind]}_{rank}"] = float(value)
            save_npy_atomic(self.output_dir / f"top_heads_{kind}_step_{step}.npy", best)
            history.save(history_path(self.output_dir, kind))
            if self.cfg.save_head_patterns:
                self._save_patterns(kind, best, obs, step)
        return metrics

    def _save_patterns(self, kind: str, best: np.ndarray, obs: _Observation, step: int) -> None:
        layers, heads = best[:, 0].astype(np.int64), best[:, 1].astype(np.int64)
        patterns = np.stack(
            [obs.maps[layer][head].float().cpu().numpy() for layer, head in zip(layers, heads, strict=True)]
        )
        save_npz_atomic(
            self.output_dir / f"head_patterns_{kind}_step_{step}.npz",
            {
                "patterns": patterns.astype(np.float32),  # (K, Tq, Tk), first analysis example
                "layers": layers,
                "heads": heads,
                "scores": best[:, 2],
                "prefix_length": np.int64(obs.prefix_length),
                "step": np.int64(step),
            },
        )

    # ---------------------------------------------------------------------------------------------- figures
    def on_epoch_end(self, epoch: int, step: int, logger: Any) -> list[Path]:
        """Figures every `viz_every_n_epochs` finished epochs (`epoch` counts finished epochs, from 1)."""
        if not logger.enabled or epoch % max(1, self.cfg.viz_every_n_epochs) != 0:
            return []
        return self.draw_figures(step, logger)

    def on_train_end(self, step: int, logger: Any) -> list[Path]:
        """Final figures (skipped when the last epoch end already drew this step)."""
        if not logger.enabled or self._last_figure_step == step:
            return []
        return self.draw_figures(step, logger)

    def draw_figures(self, step: int, logger: Any) -> list[Path]:
        """Heatmap per type and the timeline of the top heads; a drawing failure is a warning, never fatal."""
        from bitmar.analysis import report
        from bitmar.infra.figures import safe_plot

        histories = {k: h for k, h in self.histories.items() if len(h)}
        if not histories:
            return []
        self._last_figure_step = step
        written: list[Path] = []
        for kind, history in histories.items():
            path = safe_plot(
                report.plot_head_heatmap, history, self.output_dir / f"attention_heads_{kind}_step_{step}.png"
            )
            if path is not None:
                written.append(path)
                if self.log_metrics:
                    logger.log_figure(f"Attention/Heads_{METRIC_NAMES[kind]}", path, step)
        path = safe_plot(
            report.plot_timeline,
            histories,
            self.output_dir / f"attention_timeline_step_{step}.png",
            self.cfg.track_top_k,
        )
        if path is not None:
            written.append(path)
            if self.log_metrics:
                logger.log_figure("Attention/Timeline", path, step)
        return written
