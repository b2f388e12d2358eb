"""Efficiency: parameters, ternary share, packed model size vs float32, generation speed packed vs unpacked.

Sizes are the bytes of the state dict (each tensor once): the training model holds float32 master weights; after
`bitmar.bitnet.pack_model` every quantized BitLinear stores its ternary weight at 2 bits (+ one float32 scale), the
embeddings, norms and memory prior stay float32. Speed: greedy generation of a fixed number of tokens (no early stop)
for a small batch (seeded random vision features: speed does not depend on the values), median wall time of a few
repeats after a warm-up, both models on the same inputs, plus the share of generated tokens on which they agree
(packing reproduces BitLinear's eval outputs to ~1e-6).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

from bitmar.bitnet import pack_model, quantization_stats
from bitmar.evaluation.context import EvalContext

SPEED_BATCH = 8
SPEED_NEW_TOKENS = 32
SPEED_REPEATS = 5


def state_dict_bytes(module: nn.Module) -> int:
    """Bytes of the persistent state (parameters and buffers), each storage counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in module.state_dict().values():
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_generation(
    model: nn.Module, ctx: EvalContext, vision: torch.Tensor | None, steps: int, repeats: int
) -> tuple[float, torch.Tensor]:
    """Median seconds of one greedy generation of `steps` tokens (after one warm-up), and the tokens."""
    bos = torch.full((SPEED_BATCH, 1), ctx.tokenizer.bos_token_id, dtype=torch.long, device=ctx.device)

    def run() -> torch.Tensor:
        return model.generate(input_ids=bos, vision_features=vision, max_new_tokens=steps)  # no EOS: fixed length

    tokens = run()
    times = []
    for _ in range(repeats):
        _sync(ctx.device)
        start = time.perf_counter()
        run()
        _sync(ctx.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), tokens


def evaluate_efficiency(ctx: EvalContext) -> dict[str, Any]:
    model = ctx.model
    stats = quantization_stats(model)
    packed = pack_model(copy.deepcopy(model)).eval()
    float_bytes = state_dict_bytes(model)
    packed_bytes = state_dict_bytes(packed)
    vision = None
    if ctx.has_vision:  # speed does not depend on the values: seeded random features, no data needed
        generator = torch.Generator().manual_seed(0)
        vision = torch.randn(SPEED_BATCH, ctx.cfg.model.vision_encoder_dim, generator=generator).to(ctx.device)
    t_float, tok_float = time_generation(model, ctx, vision, SPEED_NEW_TOKENS, SPEED_REPEATS)
    t_packed, tok_packed = time_generation(packed, ctx, vision, SPEED_NEW_TOKENS, SPEED_REPEATS)
    n_tokens = SPEED_BATCH * SPEED_NEW_TOKENS
    metrics = {
        "parameters": model.num_parameters(),
        "parameter_breakdown": model.parameter_breakdown(),
        "ternary_parameters": stats["ternary_params"],
        "ternary_fraction": stats["ternary_fraction"],
        "ternary_weights_float32_bytes": stats["float32_bytes"],
        "ternary_weights_packed_bytes": stats["packed_bytes"],
        "ternary_compression_ratio": stats["compression_ratio"],
        "mean_zero_fraction": (
            sum(s["zero_fraction"] for s in stats["layers"].values()) / len(stats["layers"]) if stats["layers"] else 0.0
        ),
        "model_bytes_float32": float_bytes,
        "model_bytes_packed": packed_bytes,
        "model_size_ratio": float_bytes / packed_bytes,
        "speed": {
            "device": str(ctx.device),
            "threads": torch.get_num_threads(),
            "batch": SPEED_BATCH,
            "new_tokens": SPEED_NEW_TOKENS,
            "repeats": SPEED_REPEATS,
            "unpacked_tokens_per_s": n_tokens / t_float,
            "packed_tokens_per_s": n_tokens / t_packed,
            "packed_speedup": t_float / t_packed,
            "token_agreement": float((tok_float == tok_packed).float().mean()),
        },
    }
    speed = metrics["speed"]
    return {
        "metrics": metrics,
        "headline": [
            {"metric": "parameters", "value": metrics["parameters"], "reference": None},
            {"metric": "ternary fraction of parameters", "value": stats["ternary_fraction"], "reference": None},
            {"metric": "model size packed (MiB)", "value": packed_bytes / 2**20, "reference": float_bytes / 2**20},
            {
                "metric": "generation tokens/s packed",
                "value": speed["packed_tokens_per_s"],
                "reference": speed["unpacked_tokens_per_s"],
            },
            {"metric": "packed/unpacked greedy token agreement", "value": speed["token_agreement"], "reference": 1.0},
        ],
        "notes": [
            f"reference column = float32 training model; speed: batch {SPEED_BATCH} x {SPEED_NEW_TOKENS} greedy "
            f"tokens on {ctx.device} (torch threads: {torch.get_num_threads()}), median of {SPEED_REPEATS}"
        ],
    }
