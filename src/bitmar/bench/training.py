"""Training throughput: BitMar against its full-precision twin, and the CUDA bfloat16 path with FLOP utilisation.

    python -m bitmar.bench --only training [--quick]
    python -m bitmar.bench --only gpu_training --device cuda [--peak_tflops 790]

A step is what the trainer does per batch: `TrainingObjective` forward for the phase, backward, gradient clipping,
AdamW step (the trainer's parameter groups), zero_grad. Batches are fixed synthetic ones of the phase's kind
(phase 1: text blocks; phases 2-3: right-padded captions with DINOv2-sized features), so the data path is not
measured. The twin is the same configuration with `model.quantize=false` (every BitLinear runs as RMSNorm +
nn.Linear); both start from the same seed and their steps alternate.

Model FLOPs (`count_flops`, used for MFU) are counted analytically from the shapes that actually flow through the
model in one forward:
    forward  = sum over linear layers of 2 * rows * in * out          (every BitLinear / nn.Linear call, and the tied
                                                                       LM head: 2 * rows * C * V)
             + sum over attention calls of 4 * B * H * Tq * Tk * d    (QK^T and PV; causal masking not halved)
    training = 3 * forward                                             (backward = 2 x forward)
i.e. 6 x (parameters in matmuls) x (tokens through them) plus attention, the PaLM / nanoGPT convention. Embedding
lookups, norms, activations, quantizers, losses and the float64 memory solves are not counted. MFU = training FLOPs
per step / step time / peak FLOP/s.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bitmar.bench.rows import TIME_RATIO, Goal, Row, Settings, Unavailable, ratio_row, value_row
from bitmar.bench.timing import time_interleaved
from bitmar.bitnet import PackedBitLinear
from bitmar.config import BitMarConfig, load_config
from bitmar.model import BitMar
from bitmar.model.layers import Attention
from bitmar.training.objective import TrainingObjective
from bitmar.training.trainer import make_optimizer

ROOT = Path(__file__).resolve().parents[3]
TINY_CONFIG = ROOT / "configs" / "bitmar_tiny.yaml"
FULL_CONFIG = ROOT / "configs" / "bitmar_config.yaml"
TRAINING_GOAL = Goal("<=", 1.2, "<= 1.2x time")
MFU_GOAL = Goal(">=", 30.0, ">= 30% MFU")  # of the --peak_tflops ceiling (H200 bf16 dense: ~790 TFLOP/s)
MASK_ID, SPECIAL_IDS = 3, [0, 1, 2]  # synthetic ids are drawn from [4, vocab)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic batches and one training step
# ---------------------------------------------------------------------------------------------------------------


def synthetic_batch(
    phase: int, batch_size: int, length: int, vocab_size: int, feature_dim: int, seed: int = 0
) -> dict[str, Any]:
    """A fixed batch like the loaders make: phase 1 full text blocks; phases 2-3 right-padded captions (lengths
    between half and all of `length`) with (B, feature_dim) vision features."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (batch_size, length), generator=g)  # (B, T)
    mask = torch.ones(batch_size, length, dtype=torch.long)  # (B, T)
    if phase == 1:
        return {"kind": "text", "input_ids": ids, "attention_mask": mask}
    lengths = torch.randint(max(2, length // 2), length + 1, (batch_size,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()  # (B, T) right padding
    features = torch.randn(batch_size, feature_dim, generator=g)  # (B, D)
    return {"kind": "caption", "input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
            "vision_features": features}  # fmt: skip


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def build_objective(cfg: BitMarConfig, quantize: bool, seed: int = 0, device: str = "cpu") -> TrainingObjective:
    cfg.model.quantize = quantize
    torch.manual_seed(seed)
    model = BitMar(cfg.model).to(device)
    objective = TrainingObjective.from_config(model, cfg, MASK_ID, SPECIAL_IDS)
    return objective.train()


def make_step(
    objective: nn.Module, model: BitMar, cfg: BitMarConfig, batch: dict[str, Any], phase: int,
    autocast_dtype: torch.dtype | None = None, optimizer: torch.optim.Optimizer | None = None,
) -> Callable[[], None]:  # fmt: skip
    """The trainer's step on a fixed batch: forward, backward, clip, AdamW step, zero_grad."""
    t = cfg.training
    optimizer = optimizer or make_optimizer(model, cfg.training)  # the trainer's AdamW
    device_type = batch["input_ids"].device.type
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss, _ = objective(batch, phase)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.gradient_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def text_tokens(batch: dict[str, Any]) -> int:
    """Real (non-padding) text tokens of a batch: the numerator of tokens/s."""
    return int(batch["attention_mask"].sum())


# ---------------------------------------------------------------------------------------------------------------
# Analytic FLOP counter
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FlopCount:
    matmul: float = 0.0  # forward FLOPs of linear layers (incl. the LM head)
    attention: float = 0.0  # forward FLOPs of attention score and value products

    @property
    def forward(self) -> float:
        return self.matmul + self.attention

    @property
    def training(self) -> float:
        return 3.0 * self.forward


def linear_flops(rows: int, in_features: int, out_features: int) -> float:
    """Forward FLOPs of rows x in @ in x out (2 per multiply-add)."""
    return 2.0 * rows * in_features * out_features


def attention_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int) -> float:
    """Forward FLOPs of softmax(Q K^T) V: 2 * B*H*Tq*Tk*d for the scores plus the same for the weighted values."""
    return 4.0 * batch * heads * q_len * k_len * head_dim


@contextlib.contextmanager
def count_flops(model: nn.Module) -> Iterator[FlopCount]:
    """Count the forward FLOPs of everything `model` runs inside the block (hooks on linear layers and attention;
    the tied LM head through `model.lm_logits`). Usage: `with count_flops(model) as flops: objective(batch, phase)`."""
    count = FlopCount()
    handles = []

    def on_linear(module: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        x = args[0]
        rows = x.numel() // x.shape[-1]
        count.matmul += linear_flops(rows, module.in_features, module.out_features)

    def on_attention(module: Attention, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> None:
        x = args[0]  # (B, Tq, C)
        context = args[1] if len(args) > 1 else kwargs.get("context")
        cache = args[5] if len(args) > 5 else kwargs.get("cache")
        k_len = context.shape[1] if module.cross else x.shape[1] + (cache.length if cache is not None else 0)
        count.attention += attention_flops(x.shape[0], module.num_heads, x.shape[1], k_len, module.head_dim)

    for module in model.modules():
        if isinstance(module, (nn.Linear, PackedBitLinear)):
            handles.append(module.register_forward_hook(on_linear))
        elif isinstance(module, Attention):
            handles.append(module.register_forward_hook(on_attention, with_kwargs=True))
    original = getattr(model, "lm_logits", None)
    tied = original is not None and getattr(model, "lm_head", None) is None  # an untied head is an nn.Linear
    if tied:
        vocab, width = model.embed_tokens.weight.shape

        def lm_logits(hidden: Tensor) -> Tensor:
            count.matmul += linear_flops(hidden.numel() // hidden.shape[-1], width, vocab)
            return original(hidden)

        model.lm_logits = lm_logits  # instance attribute shadows the method while counting
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()
        if tied:
            del model.lm_logits


# ---------------------------------------------------------------------------------------------------------------
# CPU: BitMar vs full-precision twin
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingCase:
    label: str  # "tiny" / "full"
    config: Path
    batch_size: int
    phases: tuple[int, ...]
    length: int | None = None  # tokens per row; None: the config's (text_block_length / max_caption_length)


def training_cases(quick: bool) -> list[TrainingCase]:
    """Tiny at its configured batch; the full configuration at a CPU-sized batch (its 64 x 64 takes minutes on CPU;
    --quick also halves the caption length and runs the full configuration in phase 3 only: phase 3's objective is
    phase 2's plus the memory, so one phase runs every part of it, and its steps are the quick run's largest cost)."""
    tiny = load_config(TINY_CONFIG).training.batch_size
    if quick:
        return [TrainingCase("tiny", TINY_CONFIG, tiny, (2, 3)), TrainingCase("full", FULL_CONFIG, 2, (3,), 32)]
    return [TrainingCase("tiny", TINY_CONFIG, tiny, (1, 2, 3)), TrainingCase("full", FULL_CONFIG, 8, (1, 2, 3))]


def time_training_case(case: TrainingCase, phase: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Alternating steps of BitMar and its twin on the same fixed batch; per-step seconds of each."""
    cfg = load_config(case.config)
    length = case.length or (cfg.data.text_block_length if phase == 1 else cfg.data.max_caption_length)
    batch = synthetic_batch(phase, case.batch_size, length, cfg.model.vocab_size, cfg.model.vision_encoder_dim)
    steps = {}
    for label, quantize in (("BitMar", True), ("full precision", False)):
        objective = build_objective(load_config(case.config), quantize)
        steps[label] = make_step(objective, objective.model, cfg, batch, phase)
    times = time_interleaved(steps, repeats, warmup)["wall"]
    tokens = text_tokens(batch)
    return {
        "phase": phase,
        "batch": f"{case.batch_size} x {length}",
        "tokens_per_step": tokens,
        "times": times,
        "tokens_per_s": {k: tokens / statistics.median(v) for k, v in times.items()},
    }


def training_rows(settings: Settings) -> list[Row | Unavailable]:
    rows: list[Row | Unavailable] = []
    for case in training_cases(settings.quick):
        # The full configuration's steps take seconds on CPU (~7 s for --quick's 2 x 32 batch on one thread): fewer
        # repeats keep the full run near 5 minutes; --quick checks that every case runs (its numbers mean nothing),
        # so no warm-up and a single timed full-configuration step.
        if settings.quick:
            repeats, warmup = (2, 0) if case.label == "tiny" else (1, 0)
        else:
            repeats, warmup = (7, 2) if case.label == "tiny" else (5, 1)
        for phase in case.phases:
            r = time_training_case(case, phase, repeats, warmup)
            tps = r["tokens_per_s"]
            rows.append(
                ratio_row(
                    "training",
                    f"training step, {case.label} config, phase {phase}, batch {r['batch']} "
                    f"({tps['BitMar']:,.0f} vs {tps['full precision']:,.0f} tokens/s)",
                    "BitMar",
                    "full-precision twin",
                    TIME_RATIO,
                    r["times"]["BitMar"],
                    r["times"]["full precision"],
                    TRAINING_GOAL,
                    {k: v for k, v in r.items() if k != "times"},
                )
            )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# CUDA: full configuration in bfloat16, eager vs torch.compile
# ---------------------------------------------------------------------------------------------------------------


def _cuda_time(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Seconds of one step (synchronised) and the peak allocated GB during it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 2**30


def gpu_training_rows(settings: Settings) -> list[Row | Unavailable]:
    """Full configuration, bf16 autocast (the trainer's precision on CUDA), phase 2 and 3 caption batches: eager and
    torch.compile'd steps alternate; tokens/s ratio, peak memory and MFU of each."""
    if not torch.cuda.is_available():
        raise ValueError("gpu_training needs a CUDA GPU (torch.cuda.is_available() is False); use --device cpu")
    device = torch.device("cuda", torch.cuda.current_device())
    batch_size, repeats, warmup = (16, 5, 2) if settings.quick else (64, 20, 3)
    return compiled_training_rows(FULL_CONFIG, device, batch_size, repeats, warmup, settings.peak_tflops, _cuda_time)


def compiled_training_rows(
    config_path: Path,
    device: torch.device,
    batch_size: int,
    repeats: int,
    warmup: int,
    peak_tflops: float,
    timer: Callable[[Callable[[], None], torch.device], tuple[float, float]],
) -> list[Row | Unavailable]:
    """Eager against torch.compile'd bf16 training steps on `device`: `timer(step, device)` -> (seconds, peak GB).

    The body of `gpu_training_rows`, kept device-generic so that a CPU test runs the same logic (row shapes, FLOP
    count, MFU arithmetic) that a GPU session would otherwise be the first to run.
    """
    rows: list[Row | Unavailable] = []
    for phase in (2, 3):
        cfg = load_config(config_path)
        batch = synthetic_batch(
            phase, batch_size, cfg.data.max_caption_length, cfg.model.vocab_size, cfg.model.vision_encoder_dim
        )
        batch = batch_to(batch, device)
        objective = build_objective(cfg, quantize=True, device=str(device))
        with torch.no_grad(), count_flops(objective.model) as flops:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                objective(batch, phase)
        compiled = torch.compile(objective)
        optimizer = make_optimizer(objective.model, cfg.training)  # one optimizer state: peak memory counts it once
        steps = {
            "eager": make_step(objective, objective.model, cfg, batch, phase, torch.bfloat16, optimizer),
            "torch.compile": make_step(compiled, objective.model, cfg, batch, phase, torch.bfloat16, optimizer),
        }
        for _ in range(warmup):  # includes compilation
            for step in steps.values():
                timer(step, device)
        seconds: dict[str, list[float]] = {k: [] for k in steps}
        peak_gb: dict[str, float] = dict.fromkeys(steps, 0.0)
        for r in range(repeats):
            for name in list(steps)[r % 2 :] + list(steps)[: r % 2]:
                s, gb = timer(steps[name], device)
                seconds[name].append(s)
                peak_gb[name] = max(peak_gb[name], gb)
        tokens = text_tokens(batch)
        peak = peak_tflops * 1e12
        config_label = "full config" if Path(config_path) == FULL_CONFIG else Path(config_path).stem
        label = f"{config_label} bf16, phase {phase}, batch {batch_size} x {cfg.data.max_caption_length}"
        details = {
            "tokens_per_step": tokens,
            "train_flops_per_step": flops.training,
            "forward_flops": {"matmul": flops.matmul, "attention": flops.attention},
            "peak_memory_gb": peak_gb,
            "tokens_per_s": {k: tokens / statistics.median(v) for k, v in seconds.items()},
            "peak_tflops": peak_tflops,
            "device": str(device),
        }
        rows.append(
            ratio_row(
                "gpu_training", f"{label}: tokens/s", "torch.compile", "eager", "tokens/s A / tokens/s B",
                [1 / s for s in seconds["torch.compile"]], [1 / s for s in seconds["eager"]], None, details,
            )
        )  # fmt: skip
        for name in steps:
            mfu = [100 * flops.training / s / peak for s in seconds[name]]
            rows.append(value_row("gpu_training", f"{label}: MFU", name, "model FLOPs utilisation", mfu, MFU_GOAL, "%"))
            rows.append(
                value_row(
                    "gpu_training", f"{label}: peak memory", name, "torch.cuda.max_memory_allocated",
                    [peak_gb[name]], None, "GB",
                )
            )  # fmt: skip
    return rows
