"""Unit tests of the training infrastructure: schedule, phase budget, checkpoints, losses, logger, plots."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bitmar.bitnet import BitLinear
from bitmar.config import load_config
from bitmar.infra.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from bitmar.infra.figures import safe_plot
from bitmar.infra.run_logger import RunLogger, resolve_wandb_mode
from bitmar.training import plots
from bitmar.training.losses import contrastive_loss, lm_loss, sequence_log_probs, token_nll
from bitmar.training.objective import mask_tokens
from bitmar.training.progress import effective_phase_epochs, epoch_fraction
from bitmar.training.schedule import TwoStageSchedule
from bitmar.training.trainer import make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def _optimizer() -> torch.optim.Optimizer:
    w = torch.nn.Parameter(torch.zeros(2, 2))
    b = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW(
        [{"params": [w], "weight_decay": 0.1, "decay": True}, {"params": [b], "weight_decay": 0.0, "decay": False}]
    )


def test_two_stage_schedule_warms_up_drops_at_midpoint_and_turns_weight_decay_off() -> None:
    opt = _optimizer()
    sched = TwoStageSchedule(opt, total_steps=100, peak_lr=1e-3, warmup_steps=10, weight_decay=0.1, min_lr_ratio=0.1)
    lrs, wds = [], []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        wds.append((opt.param_groups[0]["weight_decay"], opt.param_groups[1]["weight_decay"]))
        sched.step()
    assert lrs[0] == pytest.approx(1e-4)  # warm-up starts at peak / warmup_steps
    assert max(lrs) == pytest.approx(1e-3)
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # rising during warm-up
    assert lrs[49] >= 0.5e-3 - 1e-9 and lrs[50] <= 0.1e-3 + 1e-12  # the drop at the midpoint
    assert lrs[50] < lrs[49] / 4
    assert wds[49] == (0.1, 0.0) and wds[50] == (0.0, 0.0)  # decay group 0.1 -> 0; no-decay group never decays
    assert all(lr > 0 for lr in lrs)


def test_schedule_state_round_trip() -> None:
    opt = _optimizer()
    sched = TwoStageSchedule(opt, total_steps=50, peak_lr=1e-3, warmup_steps=5, weight_decay=0.1)
    for _ in range(30):
        sched.step()
    other = TwoStageSchedule(_optimizer(), total_steps=50, peak_lr=1e-3, warmup_steps=5, weight_decay=0.1)
    other.load_state_dict(sched.state_dict())
    assert other.current_lr == sched.current_lr and other.step_count == 30


@pytest.mark.parametrize(
    ("budget", "expected", "fraction"),
    [
        (10, {1: 2, 2: 3, 3: 5}, 1.0),
        (5, {1: 1, 2: 2, 3: 2}, 1.0),
        (3, {1: 1, 2: 1, 3: 1}, 1.0),
        (2, {1: 1, 2: 1, 3: 1}, 2 / 3),  # a budget below the number of phases: every phase, on a share of an epoch
        (1, {1: 1, 2: 1, 3: 1}, 1 / 3),
    ],
)
def test_phase_epochs_fit_the_budget(budget: int, expected: dict[int, int], fraction: float) -> None:
    cfg = load_config(None, [f"training.max_epochs={budget}"])
    epochs = effective_phase_epochs(cfg)
    assert epochs == expected
    assert epoch_fraction(cfg) == pytest.approx(fraction)
    assert sum(epochs.values()) * epoch_fraction(cfg) <= budget + 1e-9  # never more data than max_epochs


def test_readme_quick_test_budget_runs_all_three_phases() -> None:
    """The original quick test `--config configs/bitmar_config.yaml --max_epochs 1 --batch_size 4` exercises every
    phase, a third of an epoch each (docs/training-and-logging.md, Training)."""
    cfg = load_config(ROOT / "configs" / "bitmar_config.yaml", ["training.max_epochs=1", "training.batch_size=4"])
    assert sorted(effective_phase_epochs(cfg)) == [1, 2, 3]
    assert epoch_fraction(cfg) == pytest.approx(1 / 3)
    assert epoch_fraction(cfg, start_phase=3) == 1.0  # --phase 3 alone: a whole epoch fits the budget


def test_phase_epochs_from_a_later_phase() -> None:
    cfg = load_config(None)
    assert effective_phase_epochs(cfg, start_phase=3) == {3: 5}


def test_checkpoint_round_trip_and_rng_restore(tmp_path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    path = save_checkpoint(
        {"model": {"w": torch.ones(3)}, "config": {}, "progress": {"global_step": 7}, "rng": state}, tmp_path / "c.pt"
    )
    payload = load_checkpoint(path)
    assert torch.equal(payload["model"]["w"], torch.ones(3)) and payload["progress"]["global_step"] == 7
    restore_rng_state(payload["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_checkpoint_errors_are_clear(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated or not a BitMar checkpoint"):
        load_checkpoint(corrupt)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not a BitMar checkpoint"):
        load_checkpoint(other)


def test_lm_loss_ignores_padding_and_matches_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    expected_terms = []
    for b in range(2):
        for t in range(4):
            if mask[b, t + 1]:
                expected_terms.append(torch.nn.functional.cross_entropy(logits[b, t][None], ids[b, t + 1][None]))
    assert lm_loss(logits, ids, mask).item() == pytest.approx(torch.stack(expected_terms).mean().item(), rel=1e-6)
    total, count = token_nll(logits, ids, mask)
    assert int(count) == 6
    assert sequence_log_probs(logits, ids, mask).sum().item() == pytest.approx(-total.item(), rel=1e-6)


def test_contrastive_loss_prefers_aligned_pairs() -> None:
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    aligned, accuracy = contrastive_loss(z, z, 0.1)
    shuffled, _ = contrastive_loss(z, z.roll(1, 0), 0.1)
    assert aligned < shuffled and accuracy == 1.0


def test_hard_negative_captions_join_only_the_image_to_text_softmax() -> None:
    torch.manual_seed(0)
    text, vision = torch.randn(4, 16), torch.randn(4, 16)
    plain, _ = contrastive_loss(text, vision, 0.1)
    far, _ = contrastive_loss(text, vision, 0.1, negative_text=-vision[:2])  # negatives no image prefers
    close, _ = contrastive_loss(text, vision, 0.1, negative_text=vision[:2])  # negatives that match images 0, 1
    assert plain < far < close  # a negative only ever adds to the loss, a matching one a lot
    # the image->text half gets the negatives as extra columns, the text->image half is unchanged
    t = torch.nn.functional.normalize(text, dim=-1)
    v = torch.nn.functional.normalize(vision, dim=-1)
    n = torch.nn.functional.normalize(vision[:2], dim=-1)
    expected = 0.5 * (
        torch.nn.functional.cross_entropy(t @ v.T / 0.1, torch.arange(4))
        + torch.nn.functional.cross_entropy(torch.cat([v @ t.T, v @ n.T], 1) / 0.1, torch.arange(4))
    )
    assert torch.allclose(close, expected)


def test_mask_tokens_never_masks_specials_or_padding() -> None:
    torch.manual_seed(0)
    ids = torch.tensor([[1, 5, 6, 7, 2, 0, 0]] * 64)
    mask = (ids != 0).long()
    masked, chosen = mask_tokens(ids, mask, 0.5, mask_id=3, special_ids=[0, 1, 2])
    assert chosen.any()
    assert not chosen[:, [0, 4, 5, 6]].any()
    assert torch.equal(masked[chosen], torch.full_like(masked[chosen], 3))
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_run_logger_writes_jsonl_and_survives_disabled_wandb(tmp_path) -> None:
    logger = RunLogger(tmp_path, enabled=True, wandb_mode="disabled", project="p", entity=None, config={})
    logger.log_metrics({"Training/Loss": torch.tensor(1.5), "Training/Bad": math.nan}, step=3)
    logger.close()
    record = json.loads((tmp_path / "logs" / "metrics.jsonl").read_text().strip())
    assert record == {"step": 3, "Training/Loss": 1.5, "Training/Bad": "nan"}
    silent = RunLogger(tmp_path / "rank1", enabled=False, wandb_mode="disabled", project="p", entity=None, config={})
    silent.log_metrics({"x": 1}, step=1)
    assert not (tmp_path / "rank1").exists()  # non-zero ranks write nothing


def test_wandb_auto_mode_is_offline_without_credentials(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"


def test_plots_are_written_for_any_slot_count_and_failures_only_warn(tmp_path, caplog) -> None:
    for k in (1, 7, 64, 512):
        path = plots.plot_memory_slots(np.random.rand(k), np.arange(k), tmp_path / f"mem_{k}.png", step=1)
        assert path.is_file() and path.stat().st_size > 1000
    assert plots.plot_quantization({"decoder": {"layer": np.random.randn(100)}}, tmp_path / "q.png", step=1).is_file()
    assert plots.plot_attention_heatmap(np.random.rand(2, 4, 4), tmp_path / "a.png", "t").is_file()
    with caplog.at_level("WARNING", logger="bitmar"):
        assert safe_plot(plots.plot_curves, [], ["Training/Loss"], tmp_path / "c.png", "t", "y") is None
    assert "could not be drawn" in caplog.text
    assert not (tmp_path / "c.png").exists()


def test_optimizer_is_adamw_with_decay_only_on_matrices() -> None:
    cfg = load_config("configs/bitmar_tiny.yaml")
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 3), "embed_tokens": torch.nn.Embedding(5, 4)})
    opt = make_optimizer(model, cfg.training)
    assert not opt.defaults["fused"]  # the fused kernel skips version counters: BitLinear's cache would go stale
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 4])]  # linear matrices only
    assert decay["weight_decay"] == cfg.training.weight_decay and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 2  # the bias and the embedding
    # AdamW's update: compare one step with torch's reference loop implementation.
    reference = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    loop = torch.optim.AdamW(
        [{"params": [reference["proj.weight"]], "weight_decay": cfg.training.weight_decay},
         {"params": [reference["proj.bias"], reference["embed_tokens.weight"]], "weight_decay": 0.0}],
        lr=cfg.training.learning_rate, betas=tuple(cfg.training.betas), eps=1e-8, foreach=False,
    )  # fmt: skip
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, 0.5)
        reference[name].grad = torch.full_like(p, 0.5)
    opt.step()
    loop.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, reference[name])


def test_optimizer_steps_refresh_the_bitlinear_weight_cache() -> None:
    """BitLinear's cache keys on version counters: every step must bump them (torch's fused AdamW kernel does not)."""
    cfg = load_config("configs/bitmar_tiny.yaml")
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    opt = make_optimizer(layer, cfg.training)
    x = torch.randn(4, 16)
    for _ in range(3):
        version = layer.weight._version
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert layer.weight._version > version
        cached = layer(x).detach()  # served from the cache when it believes the weight unchanged
        layer.clear_weight_cache()
        torch.testing.assert_close(cached, layer(x).detach(), rtol=0, atol=0)


def test_training_and_infra_stand_below_the_layers_that_use_them() -> None:
    """bitmar.training imports nothing of evaluation/analysis/export/bench/pipeline (bitmar.pipeline composes them
    through hooks); bitmar.infra imports nothing of BitMar but bitmar.fileio."""
    import ast

    above = ("bitmar.evaluation", "bitmar.analysis", "bitmar.export", "bitmar.bench", "bitmar.pipeline")
    for package, allowed in (("training", None), ("infra", ("bitmar.fileio",))):
        for path in sorted((ROOT / "src" / "bitmar" / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:  # `from bitmar import x` names bitmar.x
                    names = [f"{node.module}.{alias.name}" for alias in node.names]
                else:
                    continue
                for name in names:
                    assert not name.startswith(above), f"{package}/{path.name} imports {name}"
                    if allowed is not None and name.startswith("bitmar"):
                        assert name.startswith(allowed), f"{package}/{path.name} imports {name}"
