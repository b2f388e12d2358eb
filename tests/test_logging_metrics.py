"""What the trainer logs carries information (issue: logging as BitMar's users know it), on small tensors.

The names themselves are checked on a real tiny run's metrics.jsonl in test_training_e2e.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bitmar.bitnet import pack_model, quantization_stats
from bitmar.config import load_config
from bitmar.evaluation.efficiency import state_dict_bytes
from bitmar.memory import EpisodicMemory, EpisodicStore
from bitmar.model import BitMar
from bitmar.training import plots
from bitmar.training.diagnostics import (
    ACTIVE_SLOT_THRESHOLD,
    SlotUsageWindow,
    addressing_kl,
    component_of,
    model_size_by_component,
    slot_usage,
)

K = 64


def _memory(key_dim: int = K, episode_dim: int = 16, seed: int = 0) -> EpisodicMemory:
    torch.manual_seed(seed)
    return EpisodicMemory(K, episode_dim, key_dim=key_dim)


def _window_after(memory: EpisodicMemory, keys: torch.Tensor) -> SlotUsageWindow:
    window = SlotUsageWindow()
    window.add(memory.address(keys))
    return window


def test_memory_usage_moves_with_the_number_of_distinct_episodes() -> None:
    """Same number of writes (64): 2 distinct episodes repeated vs 64 distinct ones. Usage_Mean and
    Active_Slots_Percentage both rise with the distinct episodes; the top-5 share falls towards uniform (5/K)."""
    memory = _memory()
    g = torch.Generator().manual_seed(1)
    few = torch.randn(2, K, generator=g).repeat(32, 1)  # (64, K) two distinct keys
    many = torch.randn(64, K, generator=g)  # (64, K)
    u_few = _window_after(memory, few).take()
    u_many = _window_after(memory, many).take()
    assert u_few is not None and u_many is not None and u_few.episodes == u_many.episodes == 64
    assert u_many.usage_mean > u_few.usage_mean + 0.2
    assert u_many.active_pct > u_few.active_pct + 30.0
    assert u_many.top5_share < u_few.top5_share
    assert 5 / K < u_many.top5_share < 1.0
    assert len(u_few.top5_slots) == 5 and len(set(u_few.top5_slots)) == 5
    # one episode repeated: its own |W| profile; usage is relative to the busiest slot
    one = slot_usage(memory.address(few[:1]).abs()[0])
    assert float(one.usage.max()) == 1.0 and 0 < one.usage_mean < 1
    assert one.active_pct == pytest.approx(100.0 * float((one.usage >= ACTIVE_SLOT_THRESHOLD).float().mean()))


def test_usage_window_resets_and_refuses_an_empty_window() -> None:
    window = SlotUsageWindow()
    assert not window and window.take() is None
    window.add(torch.ones(3, K))
    usage = window.take()
    assert usage is not None and usage.usage_mean == 1.0 and usage.active_pct == 100.0  # perfectly even
    assert usage.top5_share == pytest.approx(5 / K)
    assert window.take() is None  # a new window
    with pytest.raises(ValueError, match="no memory write or read"):
        slot_usage(torch.zeros(K))


def test_addressing_kl_is_the_moving_part_of_the_memory_kl() -> None:
    """KL(q(W) || N(0, I)) = constant 0.5 K (s^2 - 1 - log s^2) + 0.5 ||W||^2 per episode (docs)."""
    memory = _memory()
    W = torch.randn(5, K) * 0.3
    kl = float(memory.kl_divergence(W))
    s2 = memory.addressing_noise_std**2
    constant = 0.5 * K * (s2 - 1 - math.log(s2))
    part, rms = addressing_kl(W)
    assert kl == pytest.approx(constant + part, rel=1e-5)
    assert rms == pytest.approx(float(W.square().mean().sqrt()), rel=1e-6)
    assert constant > 10 * part  # why Training/Loss_memory_kl looks flat: the constant dominates


def test_store_alpha_is_the_write_strength() -> None:
    """alpha moves the recall of a new key alpha of the way to the value; other episodes stay exact; 1 = one-shot."""
    memory = _memory(key_dim=K, episode_dim=16)
    g = torch.Generator().manual_seed(2)
    keys, values = torch.randn(3, K, generator=g), torch.randn(3, 16, generator=g)
    exact, weak = EpisodicStore(memory), EpisodicStore(memory, alpha=0.1)
    for store in (exact, weak):
        store.write(keys[0], values[0])
    # key_dim != episode_dim: an empty store recalls 0, so the first weak write holds 0.1 * v
    torch.testing.assert_close(exact.read(keys[0]), values[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weak.read(keys[0]), 0.1 * values[0], rtol=1e-4, atol=1e-4)
    # a second key: recall before the write (r, about 0 for an independent key) moves 10% of the way to the value
    before = weak.read(keys[1])
    weak.write(keys[1], values[1])
    torch.testing.assert_close(weak.read(keys[1]), before + 0.1 * (values[1] - before), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weak.read(keys[0]), 0.1 * values[0], rtol=1e-4, atol=1e-4)  # unchanged
    # forgetting removes exactly what the weak write held
    weak.forget(weak.episode_ids[1])
    torch.testing.assert_close(weak.read(keys[0]), 0.1 * values[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="write strength"):
        EpisodicStore(memory, alpha=0.0)


@pytest.mark.parametrize("log_attention", [True, False])
def test_wandb_log_attention_reaches_the_head_tracker(tmp_path, log_attention: bool) -> None:
    """The pipeline builds the head tracker with wandb.log_attention: false -> no Attention/* from the tracker."""
    from types import SimpleNamespace

    from bitmar.pipeline import HeadAnalysis, pipeline_hooks

    cfg = load_config("configs/bitmar_tiny.yaml", [f"wandb.log_attention={str(log_attention).lower()}"])
    hooks = [h for h in pipeline_hooks(cfg, tmp_path) if isinstance(h, HeadAnalysis)]
    assert len(hooks) == 1 and hooks[0].logs_attention  # the trainer then leaves Attention/* to the tracker
    hooks[0].attach(SimpleNamespace(model=_tiny_model()))
    assert hooks[0].tracker is not None and hooks[0].tracker.log_metrics is log_attention


def test_trainer_store_uses_model_memory_alpha() -> None:
    """model.memory_alpha reaches the trainer's persistent store (Trainer builds EpisodicStore with it)."""
    import inspect

    from bitmar.training import trainer

    source = inspect.getsource(trainer.Trainer.__init__)
    assert "alpha=cfg.model.memory_alpha" in source


def _tiny_model(vocab_size: int = 256) -> BitMar:
    cfg = load_config("configs/bitmar_tiny.yaml")
    cfg.model.vocab_size = vocab_size
    torch.manual_seed(0)
    return BitMar(cfg.model)


def test_whole_model_compression_ratio_is_the_evaluations_and_covers_every_component() -> None:
    model = _tiny_model()
    sizes = model_size_by_component(model)
    float_bytes, packed_bytes = sizes["total"]
    packed = pack_model(__import__("copy").deepcopy(model), cache_weights=False)
    assert float_bytes == state_dict_bytes(model) and packed_bytes == state_dict_bytes(packed)
    whole, ternary = float_bytes / packed_bytes, quantization_stats(model)["compression_ratio"]
    assert 1.0 < whole < ternary == pytest.approx(16.0)  # embeddings stay float32: the whole model gains less
    assert {"text_encoder", "vision_encoder", "fusion", "decoder", "memory", "embeddings"} <= set(sizes)
    assert component_of("memory_key_proj.weight") == component_of("episode_token_proj.weight") == "memory"
    shipped = model_size_by_component(_tiny_model(vocab_size=1024))["total"]  # the tiny config's own vocabulary
    assert shipped[0] / shipped[1] == pytest.approx(7.2, abs=0.05)  # docs/training-and-logging.md, Logged metrics
    assert component_of("text_encoder.blocks.0.attn.qkv_proj.weight") == "text_encoder"


def test_quantization_and_compression_plots_cover_every_component(tmp_path) -> None:
    model = _tiny_model()
    latent: dict[str, dict[str, np.ndarray]] = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "BitLinear" and module.quantize:
            latent.setdefault(component_of(name), {})[name] = module.weight.detach().numpy()
    assert set(latent) == {"text_encoder", "vision_encoder", "fusion", "decoder", "memory"}
    assert plots.plot_quantization(latent, tmp_path / "q.png", 3).stat().st_size > 1000
    assert plots.plot_compression(model_size_by_component(model), tmp_path / "c.png", 3).stat().st_size > 1000


def test_loss_figure_puts_the_kl_on_its_own_panel(tmp_path) -> None:
    keys = ["Training/Loss", "Training/Loss_lm", "Training/Loss_caption", "Training/Loss_contrastive",
            "Training/Loss_memory_kl", "Training/Loss_new_term"]  # fmt: skip
    panels = dict(plots.loss_panels(keys))
    kl_panel = [t for t, members in panels.items() if "Training/Loss_memory_kl" in members]
    assert len(kl_panel) == 1 and panels[kl_panel[0]] == ["Training/Loss_memory_kl"]
    assert panels["other terms"] == ["Training/Loss_new_term"]
    records = [{"step": s, **{k: 470.0 if "kl" in k else 3.0 / s for k in keys}} for s in range(1, 6)]
    path = plots.plot_loss_panels(records, keys, tmp_path / "loss_curves.png")
    assert path.stat().st_size > 1000
    json.dumps(records)  # the records are what metrics.jsonl holds
