"""Attention-head analysis: gate importance, attention statistics, the training tracker, and the report CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bitmar.analysis import (
    HeadHistory,
    HeadImportanceTracker,
    attention_statistics,
    gate_importance,
    prefix_statistics,
    top_heads,
)
from bitmar.analysis.report import jaccard, main, stability
from bitmar.config import load_config
from bitmar.model import BitMar
from bitmar.model.layers import Attention
from bitmar.training.objective import TrainingObjective

ROOT = Path(__file__).resolve().parents[1]
CFG = load_config(ROOT / "configs" / "bitmar_tiny.yaml")
MASK_ID, SPECIAL_IDS = 3, [0, 1, 2]


class FakeLogger:
    """RunLogger's interface, recording what it is given."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.figures: list[tuple[str, Path, int]] = []

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_figure(self, key: str, path: Path, step: int) -> None:
        self.figures.append((key, path, step))


def _model(seed: int = 0) -> tuple[BitMar, TrainingObjective]:
    torch.manual_seed(seed)
    model = BitMar(CFG.model)
    return model, TrainingObjective.from_config(model, CFG, MASK_ID, SPECIAL_IDS)


def _batch(kind: str, size: int = 6, length: int = 20, seed: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, CFG.model.vocab_size, (size, length), generator=g)
    mask = torch.ones(size, length, dtype=torch.long)
    if kind == "caption":
        for b in range(size):  # right padding of different lengths
            mask[b, length - 2 * b :] = 0
        ids = ids.masked_fill(mask == 0, 0)
        return {
            "kind": kind,
            "input_ids": ids,
            "attention_mask": mask,
            "vision_features": torch.randn(size, CFG.model.vision_encoder_dim, generator=g),
        }
    return {"kind": kind, "input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------------------------------ importance


def test_gated_off_head_has_zero_importance_although_its_raw_gradient_is_not_zero() -> None:
    model, objective = _model()
    model.eval()
    decoder = model.attention_modules()["decoder"]
    decoder[0].head_gates[1] = 0.0
    batch = _batch("caption")
    scores, loss = gate_importance(lambda: objective(batch, 2)[0], {"decoder": decoder})
    assert math.isfinite(loss)
    assert scores["decoder"][0, 1] == 0.0
    others = np.delete(scores["decoder"].ravel(), 1)
    assert (others > 0).all()
    # Why the gate factor: at g = 0 the plain gradient <head output, upstream grad> is in general not zero.
    gate = decoder[0].head_gates
    gate.requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(batch, 2)[0], gate)
    gate.requires_grad_(False)
    assert grad[1].abs() > 0


def test_planted_head_ranks_first_in_a_toy_attention() -> None:
    torch.manual_seed(0)
    attn = Attention(32, 4, quantize=False)
    attn.o_proj.norm = None  # no SubLN: heads meet only in o_proj, so unplanted heads cannot matter at all
    with torch.no_grad():
        for head in (0, 1, 3):  # only head 2's output reaches the layer output
            attn.o_proj.weight[:, head * 8 : (head + 1) * 8] = 0.0
    x, target = torch.randn(4, 10, 32), torch.randn(4, 10, 32)
    scores, _ = gate_importance(lambda: ((attn(x)[0] - target) ** 2).mean(), {"toy": [attn]})
    assert scores["toy"][0, 2] > 0
    assert np.array_equal(scores["toy"][0, [0, 1, 3]], np.zeros(3))
    assert top_heads(scores["toy"], 1)[0, :2].tolist() == [0, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_decoder_head_ranks_first_in_a_tiny_bitmar(seed: int) -> None:
    model, objective = _model(seed)
    model.eval()
    decoder = model.attention_modules()["decoder"]
    hd = decoder[0].head_dim
    with torch.no_grad():  # every decoder head but (1, 2) writes nothing into the residual stream
        for layer, attn in enumerate(decoder):
            for head in range(attn.num_heads):
                if (layer, head) != (1, 2):
                    attn.o_proj.weight[:, head * hd : (head + 1) * hd] = 0.0
    batch = _batch("text", size=8, length=32, seed=seed)
    scores, _ = gate_importance(lambda: objective(batch, 1)[0], {"decoder": decoder})
    ranked = top_heads(scores["decoder"], 8)
    assert ranked[0, :2].tolist() == [1, 2]
    assert np.array_equal(scores["decoder"][0], np.zeros(4))  # layer 0 contributes nothing at all
    # The others in layer 1 only act through the shared SubLN norm of o_proj: below the planted head.
    assert ranked[0, 2] > 1.2 * ranked[1, 2]


def test_gate_importance_restores_requires_grad_and_leaves_unreached_types_out() -> None:
    model, objective = _model()
    model.eval()
    modules = model.attention_modules()
    scores, _ = gate_importance(lambda: objective(_batch("text"), 1)[0], modules)
    assert set(scores) == {"encoder", "decoder"}  # text batches never reach the vision or cross-modal heads
    assert all(not m.head_gates.requires_grad for mods in modules.values() for m in mods)


# ------------------------------------------------------------------------------------------------ statistics


def test_attention_statistics_known_distributions_and_query_mask() -> None:
    weights = torch.zeros(2, 2, 3, 4)  # (B, H, Tq, Tk)
    weights[:, 0] = 0.25  # head 0 uniform over 4 keys
    weights[:, 1, :, 2] = 1.0  # head 1 one-hot
    weights[1, :, 2] = torch.tensor([0.7, 0.1, 0.1, 0.1])  # a padded query row: must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    entropy, concentration = attention_statistics(weights, mask)
    assert entropy == pytest.approx([math.log(4), 0.0], abs=1e-6)
    assert concentration == pytest.approx([0.25, 1.0], abs=1e-6)
    entropy_all, _ = attention_statistics(weights)
    assert entropy_all[1] > 0  # without the mask the padded row leaks in


def test_prefix_statistics_mass_entropy_and_readout() -> None:
    p, t = 3, 2
    weights = torch.zeros(1, 1, p + t, p + t)
    weights[0, 0, p] = torch.tensor([0.2, 0.2, 0.2, 0.4, 0.0])  # text query 0: mass 0.6 spread over the prefix
    weights[0, 0, p + 1] = torch.tensor([0.5, 0.0, 0.0, 0.25, 0.25])  # text query 1: mass 0.5 on readout token 0
    stats = prefix_statistics(weights, p, torch.ones(1, t), readout_tokens=1)
    assert stats["mass"] == pytest.approx([0.55])
    assert stats["readout_mass"] == pytest.approx([0.35])
    assert stats["entropy"] == pytest.approx([0.5 * math.log(3)], abs=1e-6)
    assert stats["concentration"] == pytest.approx([(1 / 3 + 1.0) / 2], abs=1e-6)
    with pytest.raises(ValueError, match="prefix"):
        prefix_statistics(weights, 0, None)


def test_top_heads_orders_by_score_and_ranks_nan_last() -> None:
    scores = np.array([[0.1, np.nan, 0.5], [0.3, 0.2, 0.0]])
    best = top_heads(scores, 4)
    assert best[:, :2].tolist() == [[0, 2], [1, 0], [1, 1], [0, 0]]
    assert best[:, 2].tolist() == [0.5, 0.3, 0.2, 0.1]
    assert top_heads(scores, 100).shape == (6, 3)


def test_history_ema_is_bias_corrected_and_truncates() -> None:
    history = HeadHistory("decoder", "gradient", 1, 2, ema_decay=0.5)
    history.append(10, 1, np.array([[4.0, 0.0]]), np.zeros((1, 2)), np.zeros((1, 2)))
    history.append(20, 1, np.array([[0.0, 2.0]]), np.zeros((1, 2)), np.zeros((1, 2)))
    assert history.importance[0].tolist() == [[4.0, 0.0]]  # the first measurement is not shrunk towards 0
    # m1 = 0.5*4 = 2; m2 = 0.5*2 + 0.5*0 = 1 -> 1 / 0.75; second head: m2 = 0.5*2 = 1 -> 1 / 0.75
    assert history.importance[1] == pytest.approx(np.array([[4 / 3, 4 / 3]]))
    history.truncate_before(20)
    assert history.steps.tolist() == [10] and history.importance.shape == (1, 1, 2)


def test_stability_jaccard() -> None:
    history = HeadHistory("vision", "gradient", 1, 3)
    for step, row in enumerate(([3.0, 2.0, 1.0], [3.0, 1.0, 2.0], [1.0, 2.0, 3.0])):
        history.ema_decay = 0.0  # score = this measurement, so the sets are the designed ones
        history.append(step, 2, np.array([row]), np.zeros((1, 3)), np.zeros((1, 3)))
    stats = stability(history, 2)  # sets {0,1}, {0,2}, {2,1}
    assert stats["consecutive_mean"] == pytest.approx(1 / 3)
    assert stats["first_vs_last"] == pytest.approx(1 / 3)
    assert stats["last_change_step"] == 2
    assert jaccard({1, 2}, {1, 2}) == 1.0


# ---------------------------------------------------------------------------------------------------- tracker


def _run_tracker(run_dir: Path, **cfg_overrides: Any) -> tuple[HeadImportanceTracker, FakeLogger]:
    model, objective = _model()
    cfg = replace(CFG.attention_analysis, save_head_patterns=True, viz_every_n_epochs=2, **cfg_overrides)
    tracker = HeadImportanceTracker(model, cfg, run_dir / "attention_analysis")
    logger = FakeLogger()
    for step, phase, kind in ((5, 1, "text"), (10, 2, "caption"), (15, 3, "caption"), (20, 3, "caption")):
        tracker.measure(objective, _batch(kind, seed=step), phase, step, logger)
    return tracker, logger


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, HeadImportanceTracker, FakeLogger]:
    run_dir = tmp_path_factory.mktemp("run")
    tracker, logger = _run_tracker(run_dir)
    return run_dir, tracker, logger


def test_tracker_writes_histories_top_heads_and_patterns(tracked_run) -> None:
    run_dir, tracker, logger = tracked_run
    out = run_dir / "attention_analysis"
    expected_steps = {
        "encoder": [5, 10, 15, 20],
        "decoder": [5, 10, 15, 20],
        "vision": [10, 15, 20],
        "cross_modal": [15, 20],  # z_m feeds the loss from phase 3 on
        "memory": [10, 15, 20],  # needs a prefix: caption batches
    }
    k = CFG.attention_analysis.track_top_k
    for kind, steps in expected_steps.items():
        history = HeadHistory.load(out / f"history_{kind}.npz")
        assert history.steps.tolist() == steps
        s, layers, heads = history.importance.shape
        assert s == len(steps) and history.entropy.shape == (s, layers, heads)
        assert np.isfinite(history.importance).all() and np.isfinite(history.entropy).all()
        best = np.load(out / f"top_heads_{kind}_step_{steps[-1]}.npy")
        assert best.shape == (min(k, layers * heads), 3)
        assert np.all(np.diff(best[:, 2]) <= 0)
        assert np.array_equal(best, history.top_heads())
        patterns = np.load(out / f"head_patterns_{kind}_step_{steps[-1]}.npz")
        assert patterns["patterns"].shape[0] == best.shape[0]
        assert np.allclose(patterns["patterns"].sum(-1), 1.0, atol=1e-4)  # rows of attention maps
    memory = HeadHistory.load(out / "history_memory.npz")
    prefix, readout = CFG.model.vision_num_tokens, CFG.model.memory_prefix_tokens
    assert memory.prefix_length.tolist() == [prefix, prefix + readout, prefix + readout]  # readout from phase 3 on
    assert memory.readout_tokens.tolist() == [0, readout, readout]
    assert np.isnan(memory.readout_mass[0]).all() and np.isfinite(memory.readout_mass[1:]).all()
    assert ((memory.raw_importance > 0) & (memory.raw_importance < 1)).all()
    assert not list(out.glob("*.tmp"))


def test_tracker_logs_metrics(tracked_run) -> None:
    _, _, logger = tracked_run
    steps = [step for step, _ in logger.metrics]
    assert steps == [5, 10, 15, 20]
    phase3 = logger.metrics[2][1]
    for key in (
        "Attention/CrossModal_layer_0_Entropy",
        "Attention/Memory_Mean",
        "Attention/Memory_Entropy",
        "Attention/Memory_Readout_Mean",
        "Attention/Top_Decoder_1",
        "Attention/Top_CrossModal_1",
        "Attention/Analysis_Seconds",
    ):
        assert key in phase3, key
    assert 0 < phase3["Attention/Memory_Mean"] < 1
    assert phase3["Attention/Top_Decoder_1"] >= phase3["Attention/Top_Decoder_2"] > 0
    assert "Attention/Memory_Mean" not in logger.metrics[0][1]  # text batch: no prefix


def test_memory_attention_only_with_a_readout_and_the_vision_prefix_under_its_own_name(tracked_run) -> None:
    _, _, logger = tracked_run
    phase2, phase3 = logger.metrics[1][1], logger.metrics[2][1]
    # Phase 2: the prefix holds only vision tokens, so there is no memory attention to report.
    assert "Attention/Memory_Mean" not in phase2 and "Attention/Memory_Entropy" not in phase2
    assert phase2["Attention/Vision_Prefix_Mean"] == pytest.approx(phase2["Attention/Prefix_Mean"])
    # Phase 3: readout + vision = the whole prefix; the readout's entropy is over its own R tokens.
    total = phase3["Attention/Memory_Mean"] + phase3["Attention/Vision_Prefix_Mean"]
    assert total == pytest.approx(phase3["Attention/Prefix_Mean"], rel=1e-6)
    assert 0 < phase3["Attention/Vision_Prefix_Mean"] < 1
    assert 0 <= phase3["Attention/Memory_Entropy"] <= math.log(CFG.model.memory_prefix_tokens) + 1e-6


def test_tracker_without_log_metrics_writes_files_but_logs_nothing(tmp_path: Path) -> None:
    """wandb.log_attention: false reaches the tracker: no Attention/* metric or figure goes to the run logger."""
    model, objective = _model()
    cfg = replace(CFG.attention_analysis, viz_every_n_epochs=1)
    tracker = HeadImportanceTracker(model, cfg, tmp_path / "attention_analysis", log_metrics=False)
    logger = FakeLogger()
    metrics = tracker.measure(objective, _batch("caption", seed=3), 2, 4, logger)
    assert "Attention/Vision_Prefix_Mean" in metrics  # measured all the same
    assert (tmp_path / "attention_analysis" / "history_decoder.npz").is_file()
    assert tracker.on_epoch_end(1, 4, logger)  # figures drawn on disk
    assert logger.metrics == [] and logger.figures == []


def test_tracker_figures_every_viz_interval(tracked_run) -> None:
    run_dir, tracker, _ = tracked_run
    logger = FakeLogger()
    assert tracker.on_epoch_end(1, 20, logger) == []  # viz_every_n_epochs = 2
    written = tracker.on_epoch_end(2, 20, logger)
    names = {p.name for p in written}
    assert "attention_timeline_step_20.png" in names
    assert {
        f"attention_heads_{k}_step_20.png" for k in ("encoder", "decoder", "cross_modal", "vision", "memory")
    } <= names
    assert all(p.stat().st_size > 1000 for p in written)
    assert {key for key, _, _ in logger.figures} >= {"Attention/Timeline", "Attention/Heads_CrossModal"}
    assert tracker.on_train_end(20, logger) == []  # already drawn at this step


def test_measure_leaves_grads_rng_modes_and_gates_untouched(tmp_path: Path) -> None:
    model, objective = _model()
    objective.train()
    model.memory.eval()  # a mixed mode pattern must come back as it was
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.grad = torch.randn_like(p) if i % 2 == 0 else None
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    gates = {id(m): m.head_gates.clone() for mods in model.attention_modules().values() for m in mods}
    modes = {name: m.training for name, m in objective.named_modules()}
    rng = torch.get_rng_state()
    tracker = HeadImportanceTracker(model, CFG.attention_analysis, tmp_path)
    metrics = tracker.measure(objective, _batch("caption"), 3, 7, FakeLogger())
    assert metrics  # it did measure (phase 3 draws the memory query noise)
    assert torch.equal(torch.get_rng_state(), rng)
    for p, before in zip(params, grads, strict=True):
        assert (p.grad is None) if before is None else torch.equal(p.grad, before)
    assert {name: m.training for name, m in objective.named_modules()} == modes
    for mods in model.attention_modules().values():
        for m in mods:
            assert torch.equal(m.head_gates, gates[id(m)]) and not m.head_gates.requires_grad


def test_measure_on_a_non_main_rank_does_nothing(tmp_path: Path) -> None:
    model, objective = _model()
    tracker = HeadImportanceTracker(model, CFG.attention_analysis, tmp_path / "a")
    logger = FakeLogger(enabled=False)
    assert tracker.measure(objective, _batch("caption"), 3, 5, logger) == {}
    assert tracker.on_epoch_end(2, 5, logger) == [] and not (tmp_path / "a").exists()


@pytest.mark.slow
def test_training_trajectory_is_identical_with_and_without_measurements(tmp_path: Path) -> None:
    def train(measure: bool) -> list[torch.Tensor]:
        model, objective = _model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tracker = HeadImportanceTracker(model, CFG.attention_analysis, tmp_path / str(measure))
        torch.manual_seed(123)
        objective.train()
        for step in range(1, 4):
            loss, _ = objective(_batch("caption", size=4, seed=step), 3)  # phase 3 draws noise from the global RNG
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if measure:
                tracker.measure(objective, _batch("caption", size=4, seed=99), 3, step, FakeLogger())
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(False), train(True), strict=True):
        assert torch.equal(a, b)


def test_resumed_tracker_truncates_and_continues_the_history(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _run_tracker(run_dir)
    model, objective = _model()
    tracker = HeadImportanceTracker(model, CFG.attention_analysis, run_dir / "attention_analysis")
    tracker.measure(objective, _batch("text", seed=42), 1, 15, FakeLogger())  # resumed from step 10
    history = HeadHistory.load(run_dir / "attention_analysis" / "history_decoder.npz")
    assert history.steps.tolist() == [5, 10, 15]
    beta = history.ema_decay
    m1 = (1 - beta) * history.raw_importance[0].astype(np.float64)
    m2 = beta * m1 + (1 - beta) * history.raw_importance[1]
    m3 = beta * m2 + (1 - beta) * history.raw_importance[2]
    assert history.importance[2] == pytest.approx(m3 / (1 - beta**3), rel=1e-5)
    assert not (run_dir / "attention_analysis" / "history_cross_modal.npz").exists()  # only steps >= 15
    assert HeadHistory.load(run_dir / "attention_analysis" / "history_memory.npz").steps.tolist() == [10]


# -------------------------------------------------------------------------------------------------------- CLI


def test_cli_prints_tables_draws_figures_and_writes_the_report(tracked_run, capsys) -> None:
    run_dir, _, _ = tracked_run
    analysis_dir = run_dir / "attention_analysis"
    assert main(["--analysis_dir", str(analysis_dir), "--top_k", "3", "--create_report"]) == 0
    printed = capsys.readouterr().out
    assert "cross_modal" in printed and "Jaccard" in printed
    report = run_dir / "reports" / "attention_analysis_report.md"
    text = report.read_text(encoding="utf-8")
    for heading in ("## Overview", "### Cross-modal heads", "### Memory heads", "| rank | layer | head |"):
        assert heading in text
    links = [line.split("](", 1)[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(links) == 6  # a timeline and five heatmaps
    for link in links:
        assert not os.path.isabs(link) and (report.parent / link).is_file()
    assert (analysis_dir / "figures" / "attention_timeline_step_20.png").is_file()


def test_cli_single_type_and_output_dir(tracked_run, tmp_path: Path, capsys) -> None:
    run_dir, _, _ = tracked_run
    out = tmp_path / "out"
    args = ["--analysis_dir", str(run_dir), "--attention_type", "memory", "--output_dir", str(out), "--create_report"]
    assert main(args) == 0  # the run directory is accepted too
    assert "prefix mass" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == [
        "attention_heads_memory_step_20.png",
        "attention_timeline_step_20.png",
    ]
    assert (out / "reports" / "attention_analysis_report.md").is_file()


def test_cli_original_invocation_and_no_analysis_dir_use_the_default_run(
    tracked_run, tmp_path: Path, monkeypatch, capsys
) -> None:
    """From the repository root, `--analysis_dir ./attention_analysis` (the original invocation) and no
    --analysis_dir at all both read the default run's outputs/attention_analysis."""
    import shutil

    run_dir, _, _ = tracked_run
    repo = tmp_path / "repo"
    shutil.copytree(run_dir / "attention_analysis", repo / "outputs" / "attention_analysis")
    monkeypatch.chdir(repo)
    assert main(["--analysis_dir", "./attention_analysis", "--attention_type", "decoder"]) == 0
    assert "using outputs/attention_analysis" in capsys.readouterr().err
    assert main(["--attention_type", "decoder", "--output_dir", str(tmp_path / "out")]) == 0
    assert "== decoder" in capsys.readouterr().out
    assert list((tmp_path / "out").glob("*.png"))  # figures drawn from the default run's histories
    shutil.rmtree(repo / "outputs")
    assert main([]) == 2  # no default run here: a clear message, not a traceback
    assert "does not exist" in capsys.readouterr().err


def test_cli_bad_inputs_exit_2_with_a_clear_message(tmp_path: Path, capsys) -> None:
    assert main(["--analysis_dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--analysis_dir", str(empty)]) == 2
    assert "no head-importance history" in capsys.readouterr().err
    only_decoder = tmp_path / "partial"
    history = HeadHistory("decoder", "gradient", 1, 2)
    history.append(5, 1, np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 2)))
    history.save(only_decoder / "history_decoder.npz")
    assert main(["--analysis_dir", str(only_decoder), "--attention_type", "vision"]) == 2
    assert "no measurements of 'vision'" in capsys.readouterr().err
    (only_decoder / "history_memory.npz").write_bytes(b"not a zip")
    assert main(["--analysis_dir", str(only_decoder)]) == 2
    assert "not a readable head-history file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--analysis_dir", str(only_decoder), "--attention_type", "memroy"])
    assert exit_info.value.code == 2 and "invalid choice: 'memroy'" in capsys.readouterr().err


def _truncated_copy(history: HeadHistory, path: Path) -> Path:
    """`history` saved to `path`, then cut in half, as a disk-full or a copy interrupted midway leaves it."""
    history.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_history_is_a_clear_error_naming_the_file(tmp_path: Path, capsys) -> None:
    analysis_dir = tmp_path / "attention_analysis"
    decoder = HeadHistory("decoder", "gradient", 1, 2)
    decoder.append(5, 1, np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 2)))
    decoder.save(analysis_dir / "history_decoder.npz")
    memory = HeadHistory("memory", "prefix_mass", 1, 2)
    memory.append(5, 3, np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 2)))
    damaged = _truncated_copy(memory, analysis_dir / "history_memory.npz")
    with pytest.raises(ValueError, match=r"history_memory.npz is not a readable head-history file, truncated"):
        HeadHistory.load(damaged)  # was zipfile.BadZipFile, a traceback in the CLI
    assert main(["--analysis_dir", str(analysis_dir)]) == 2  # all types asked for: the damaged one is an error
    err = capsys.readouterr().err
    assert f"{damaged} is not a readable head-history file, truncated or damaged" in err
    assert "analyse the other types alone (--attention_type decoder)" in err and "Traceback" not in err
    assert main(["--analysis_dir", str(analysis_dir), "--attention_type", "memory"]) == 2
    assert str(damaged) in capsys.readouterr().err
    # Another type asked for: the damaged file is only a warning.
    assert (
        main(["--analysis_dir", str(analysis_dir), "--attention_type", "decoder", "--output_dir", str(tmp_path)]) == 0
    )
    captured = capsys.readouterr()
    assert f"warning: {damaged} is not a readable head-history file" in captured.err and "decoder" in captured.out


def test_cli_read_only_output_exits_2_before_drawing(tmp_path: Path, unwritable_dir: Path, capsys) -> None:
    history = HeadHistory("decoder", "gradient", 1, 2)
    history.append(5, 1, np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 2)))
    history.save(tmp_path / "history_decoder.npz")
    assert main(["--analysis_dir", str(tmp_path), "--output_dir", str(unwritable_dir)]) == 2
    err = capsys.readouterr().err
    assert "cannot write the output folder" in err and "pass a writable --output_dir" in err


def test_resumed_tracker_sets_a_damaged_history_aside(tmp_path: Path, caplog) -> None:
    run_dir = tmp_path / "run"
    _run_tracker(run_dir)
    analysis_dir = run_dir / "attention_analysis"
    damaged = _truncated_copy(
        HeadHistory.load(analysis_dir / "history_decoder.npz"), analysis_dir / "history_decoder.npz"
    )
    kept = damaged.read_bytes()
    model, objective = _model()
    tracker = HeadImportanceTracker(model, CFG.attention_analysis, analysis_dir)
    with caplog.at_level("WARNING", logger="bitmar"):
        tracker.measure(objective, _batch("text", seed=42), 1, 15, FakeLogger())  # resumed from step 10
    assert "history_decoder.npz is not a readable head-history file" in caplog.text
    assert (analysis_dir / "history_decoder.npz.damaged").read_bytes() == kept  # the user's file is kept aside
    assert HeadHistory.load(analysis_dir / "history_decoder.npz").steps.tolist() == [15]  # a new history


@pytest.mark.slow
def test_cli_script_reports_errors_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "analyze_attention_heads.py"), "--analysis_dir", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr
