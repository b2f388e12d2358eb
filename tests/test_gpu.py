"""GPU tests (marker `gpu`): skipped without CUDA, run on a machine with one (`python -m pytest -m gpu`).

bf16 training step of the full objective, the memory's least-squares solves on CUDA, and generation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitmar.config import load_config
from bitmar.memory import EpisodicMemory, EpisodicStore
from bitmar.model import BitMar
from bitmar.training.objective import TrainingObjective

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


def _tiny(seed: int = 0) -> tuple[BitMar, object]:
    cfg = load_config(ROOT / "configs" / "bitmar_tiny.yaml", ["training.memory_episodes_per_write=4"])
    cfg.model.vocab_size = 256
    torch.manual_seed(seed)
    return BitMar(cfg.model).to(CUDA), cfg


def _caption_batch(cfg, size: int = 6, length: int = 16) -> dict[str, object]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, cfg.model.vocab_size, (size, length), generator=g)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[-1, length // 2 :] = 0
    features = torch.randn(size, cfg.model.vision_encoder_dim, generator=g)
    return {
        "kind": "caption",
        "input_ids": ids.to(CUDA),
        "attention_mask": mask.to(CUDA),
        "vision_features": features.to(CUDA),
    }


def test_bf16_training_step_of_every_phase_on_cuda() -> None:
    model, cfg = _tiny()
    objective = TrainingObjective.from_config(model, cfg, mask_token_id=3, special_token_ids=[0, 1, 2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = _caption_batch(cfg)
    text = {"kind": "text", "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for phase, b in ((1, text), (2, batch), (3, batch)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, metrics = objective(b, phase)
        assert torch.isfinite(loss), (phase, float(loss))
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert "Loss_memory_kl" in metrics and metrics["_memory_weights"].is_cuda
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("fusion.") for n in changed) and any(n.startswith("decoder.") for n in changed)


def test_memory_solve_on_cuda_is_exact_and_matches_cpu() -> None:
    torch.manual_seed(0)
    memory = EpisodicMemory(64, 48, key_dim=64)
    Z = torch.randn(32, 48)
    keys = torch.randn(32, 64)
    cpu_state = memory.write_kv(keys, Z)
    cpu_read, _ = memory.eval().read_kv(keys, cpu_state)
    memory = memory.to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the solves switch autocast off inside
        state = memory.write_kv(keys.to(CUDA), Z.to(CUDA))
        read, W = memory.read_kv(keys.to(CUDA), state)
    assert state.memory.is_cuda and state.memory.dtype == torch.float32 and state.precision.dtype == torch.float64
    read = read.detach()
    assert float((read.float() - Z.to(CUDA)).norm() / Z.norm()) < 1e-4  # exact recall for N <= K
    assert float((read.float().cpu() - cpu_read).norm() / cpu_read.norm()) < 1e-4
    store = EpisodicStore(memory, device=CUDA)
    ids = [store.write(k, v) for k, v in zip(keys[:8].to(CUDA), Z[:8].to(CUDA), strict=True)]
    store.forget(ids[0])
    kept = store.read(keys[1:8].to(CUDA))
    assert float((kept - Z[1:8].to(CUDA)).norm() / Z[1:8].norm()) < 1e-4


def test_generation_on_cuda_kv_cache_equals_recompute() -> None:
    model, cfg = _tiny()
    model.eval()
    batch = _caption_batch(cfg, size=3)
    prompt = batch["input_ids"][:, :4]
    with torch.no_grad():
        cached = model.generate(prompt, vision_features=batch["vision_features"], max_new_tokens=8)
        full = model.generate(prompt, vision_features=batch["vision_features"], max_new_tokens=8, use_cache=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as under training's autocast: runs, valid tokens
            sampled = model.generate(
                prompt, vision_features=batch["vision_features"], max_new_tokens=8, do_sample=True, top_k=5
            )
    assert cached.is_cuda and cached.shape == (3, 8)
    assert torch.equal(cached, full)  # float32: the KV cache changes nothing
    assert sampled.shape == (3, 8) and 0 <= int(sampled.min()) and int(sampled.max()) < cfg.model.vocab_size
