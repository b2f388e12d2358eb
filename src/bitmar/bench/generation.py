"""Inference: KV-cache generation against full recomputation, and the packed ternary model against BitLinear eval.

    python -m bitmar.bench --only generation packed [--quick]

Generation: `model.generate(use_cache=True / False)`, greedy, 64 new tokens (no EOS, so every call makes all 64)
after an 8-token prompt with a DINOv2 feature (vision prefix), eval mode, the tiny and the full configuration at
random initialisation (speed does not depend on training); batch 1 (one stream) for both, and batch 32 (the
evaluation batch) for the tiny model. Both variants alternate; the ratio is
tokens/s with the cache over tokens/s without. Goal: >= 3x at 64 new tokens.

Packed: the tiny model in eval mode against a copy after `pack_model` (every quantized BitLinear becomes a
PackedBitLinear holding 2-bit weights), forward on a caption batch with vision features. Ratios: latency (goal: not
slower) and the bytes of the ternary layers' weights, float32 master weights over packed bytes + scales (goal: >= 8x).
"""

from __future__ import annotations

import copy
import functools
import statistics
from typing import Any

import torch

from bitmar.bench.rows import NOT_SLOWER, TIME_RATIO, Goal, Row, Settings, Unavailable, ratio_row
from bitmar.bench.timing import time_interleaved
from bitmar.bench.training import FULL_CONFIG, TINY_CONFIG, synthetic_batch
from bitmar.bitnet import BitLinear, PackedBitLinear, pack_model
from bitmar.config import load_config
from bitmar.model import BitMar

GENERATION_GOAL = Goal(">=", 3.0, ">= 3x tokens/s")
BYTES_GOAL = Goal(">=", 8.0, ">= 8x fewer bytes")
NEW_TOKENS = 64
QUICK_NEW_TOKENS = 16  # --quick only checks that every case runs; without the cache, time grows with length squared
PROMPT_TOKENS = 8
# (config, model file, batch): batch 1 is single-stream latency; 32 is the evaluation batch (captioning a set).
GENERATION_CASES = (("tiny", TINY_CONFIG, 1), ("tiny", TINY_CONFIG, 32), ("full", FULL_CONFIG, 1))


def _model(config_path: Any, device: torch.device, seed: int = 0) -> BitMar:
    cfg = load_config(config_path)
    torch.manual_seed(seed)
    return BitMar(cfg.model).to(device).eval()


def _generate(model: BitMar, ids: torch.Tensor, features: torch.Tensor, use_cache: bool, new_tokens: int) -> None:
    tokens = model.generate(ids, vision_features=features, max_new_tokens=new_tokens, use_cache=use_cache)
    if tokens.shape[1] != new_tokens:
        raise RuntimeError(f"generate made {tokens.shape[1]} tokens, expected {new_tokens} (no EOS was given)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generation_rows(settings: Settings) -> list[Row | Unavailable]:
    device = torch.device(settings.device)
    repeats, new_tokens = (2, QUICK_NEW_TOKENS) if settings.quick else (7, NEW_TOKENS)
    rows: list[Row | Unavailable] = []
    models: dict[str, BitMar] = {}
    for label, config_path, batch_size in GENERATION_CASES:
        if label not in models:
            models[label] = _model(config_path, device)
        model = models[label]
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(4, model.config.vocab_size, (batch_size, PROMPT_TOKENS), generator=g).to(device)  # (B, T)
        features = torch.randn(batch_size, model.config.vision_encoder_dim, generator=g).to(device)  # (B, D)

        def call(use_cache: bool, model: BitMar = model, ids: torch.Tensor = ids, feats: torch.Tensor = features):
            _generate(model, ids, feats, use_cache, new_tokens)
            _sync(device)

        for use_cache in (True, False):  # warm-up: weight caches, allocator (short, the full run is timed below)
            _generate(model, ids, features, use_cache, 4)
        fns = {"cache": functools.partial(call, True), "no cache": functools.partial(call, False)}
        times = time_interleaved(fns, repeats, warmup=0)["wall"]
        cached_tps = [batch_size * new_tokens / t for t in times["cache"]]  # generated tokens per second
        full_tps = [batch_size * new_tokens / t for t in times["no cache"]]
        rows.append(
            ratio_row(
                "generation",
                f"generation, {label} config, {new_tokens} new tokens, batch {batch_size}, prompt {PROMPT_TOKENS} + "
                f"vision ({statistics.median(cached_tps):,.0f} vs {statistics.median(full_tps):,.0f} tokens/s)",
                "KV cache",
                "no cache",
                "tokens/s A / tokens/s B",
                cached_tps,
                full_tps,
                GENERATION_GOAL,
                {"seconds": times, "device": str(device)},
            )
        )
    return rows


def ternary_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes holding the weights of quantized layers: float master weights of BitLinear(quantize=True), packed bytes
    plus the scale of PackedBitLinear (norms and biases are the same in both and not counted)."""
    total = 0
    for module in model.modules():
        if isinstance(module, BitLinear) and module.quantize:
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, PackedBitLinear):
            for t in (module.packed_weight, module.weight_scale):
                total += t.numel() * t.element_size()
    return total


def packed_rows(settings: Settings) -> list[Row | Unavailable]:
    repeats = 5 if settings.quick else 15
    model = _model(TINY_CONFIG, torch.device("cpu"))
    packed = pack_model(copy.deepcopy(model))
    cfg = load_config(TINY_CONFIG)
    batch = synthetic_batch(2, cfg.training.batch_size, cfg.data.max_caption_length, cfg.model.vocab_size,
                            cfg.model.vision_encoder_dim)  # fmt: skip

    @torch.no_grad()
    def forward(m: BitMar) -> torch.Tensor:
        return m(batch["input_ids"], batch["attention_mask"], vision_features=batch["vision_features"]).logits

    reference, result = forward(model), forward(packed)
    max_abs_diff = float((reference - result).abs().max())
    fns = {"packed": functools.partial(forward, packed), "bitlinear": functools.partial(forward, model)}
    times = time_interleaved(fns, repeats, warmup=2)["wall"]
    float_bytes, packed_bytes = ternary_weight_bytes(model), ternary_weight_bytes(packed)
    name = f"tiny model eval forward, batch {cfg.training.batch_size} x {cfg.data.max_caption_length} + vision"
    details = {"max_abs_logit_diff": max_abs_diff, "float_bytes": float_bytes, "packed_bytes": packed_bytes}
    return [
        ratio_row("packed", f"{name}: latency", "pack_model (2-bit)", "BitLinear eval", TIME_RATIO, times["packed"],
                  times["bitlinear"], NOT_SLOWER, details),
        ratio_row("packed", "tiny model ternary-layer weight bytes", "BitLinear (float32)", "pack_model (2-bit)",
                  "bytes A / bytes B", [float_bytes], [packed_bytes], BYTES_GOAL, details),
    ]  # fmt: skip
