"""Decoding from packed ternary weights: tokens/s and peak RSS against the full-precision twin and BitLinear eval.

    python -m bitmar.bench --only decoding [--quick]

Full configuration at random initialisation (speed and memory do not depend on the values), greedy decoding with the
KV cache, `NEW_TOKENS` new tokens (no EOS, so every call makes all of them) after an 8-token prompt with a DINOv2
feature (vision prefix), batch 1 and batch 8, with 1 and 2 torch threads. Three variants, each in a fresh process
(`python -m bitmar.bench.packed_decoding`) so that peak RSS (`ru_maxrss`: the whole process, torch included) belongs
to that variant alone:
- packed: `pack_model` layers computing from their 2-bit bytes (the packed CPU kernel), loaded the way a deployment
  loads them: the module tree is built on the meta device and the packed state dict assigned, so no float copy of
  the ternary weights ever exists in the process;
- fp32 twin: the same architecture with `model.quantize=false` (plain float32 linear layers);
- BitLinear eval: the quantized model as trained (float master weights, quantized per weight update and cached).
Each round starts one process per variant, the order rotating per round; a process warms up (4 tokens), then times
`CALLS` generate calls and reports the median tokens/s, its peak RSS (VmHWM) and its RSS after the imports (the
torch runtime every variant shares). Ratios are per round (side by side).

Goals (issue 15): batch 1, one thread: packed >= 2.5x the twin's tokens/s and peak RSS <= 0.5x; batch 8 not slower;
two threads >= 2x at batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitmar.bench.rows import Goal, Row, Settings, Unavailable, ratio_row
from bitmar.bitnet import BitLinear, PackedBitLinear, pack_model
from bitmar.config import load_config
from bitmar.kernels.packed_cpu import packed_kernel_decision
from bitmar.model import BitMar

VARIANTS = ("packed", "twin", "bitlinear")
LABELS = {"packed": "packed (2-bit kernel)", "twin": "fp32 twin", "bitlinear": "BitLinear eval"}
NEW_TOKENS = 48
PROMPT_TOKENS = 8
CALLS = 3  # timed generate calls per process (median)
SPEED_GOALS = {(1, 1): Goal(">=", 2.5, ">= 2.5x tokens/s"), (2, 1): Goal(">=", 2.0, ">= 2x tokens/s")}
NOT_SLOWER_TPS = Goal(">=", 1.0, "not slower")
RSS_GOAL = Goal("<=", 0.5, "<= 0.5x peak RSS")


# ---------------------------------------------------------------------------------------------------------------
# One variant in this process (the child)
# ---------------------------------------------------------------------------------------------------------------


_INIT_FUNCTIONS = ("normal_", "zeros_", "ones_", "uniform_", "trunc_normal_", "xavier_uniform_", "kaiming_uniform_",
                   "orthogonal_", "constant_")  # fmt: skip


def _packed_skeleton(model: nn.Module) -> None:
    """Swap every quantized BitLinear for an empty PackedBitLinear of the same shape, on the meta device."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BitLinear) and child.quantize:
                setattr(
                    parent,
                    name,
                    PackedBitLinear(
                        child.in_features,
                        child.out_features,
                        bias=child.bias is not None,
                        input_norm=child.norm is not None,
                        activation_bits=child.activation_bits,
                        device=torch.device("meta"),
                    ),
                )


def load_packed_model(config_path: str | Path, state_path: str | Path) -> BitMar:
    """The packed model from `save_packed_state`'s file without materialising any float ternary weight."""
    cfg = load_config(config_path)
    # The module tree is built on the meta device (no storage) with torch.nn.init skipped there: torch's meta
    # normal_ is a Python reference that imports torch._dynamo and sympy (+74 MB RSS, more than the packed weights).
    originals = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}

    def skip_meta(init: Any) -> Any:
        return lambda tensor, *args, **kwargs: tensor if tensor.is_meta else init(tensor, *args, **kwargs)

    for name, init in originals.items():
        setattr(nn.init, name, skip_meta(init))
    try:
        with torch.device("meta"):
            model = BitMar(cfg.model)
    finally:
        for name, init in originals.items():
            setattr(nn.init, name, init)
    _packed_skeleton(model)
    saved = torch.load(state_path, weights_only=True, mmap=True)  # file-backed, as safetensors loading is
    model.load_state_dict(saved["state"], assign=True, strict=True)
    for name, value in saved["buffers"].items():  # non-persistent buffers (head gates) are not in the state dict
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, value, persistent=False)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"tensors left on the meta device after loading {state_path}: {meta[:5]}")
    return model.eval()


def save_packed_state(config_path: str | Path, path: Path, seed: int = 0) -> None:
    """Pack the seeded model and write its state dict plus non-persistent buffers (done once by the parent)."""
    cfg = load_config(config_path)
    torch.manual_seed(seed)
    model = pack_model(BitMar(cfg.model).eval())
    persistent = model.state_dict()
    buffers = {n: b for n, b in model.named_buffers() if n not in persistent and b is not None}
    torch.save({"state": persistent, "buffers": buffers}, path)


def _build(variant: str, config_path: str, state_path: str | None) -> BitMar:
    if variant == "packed":
        if state_path is None:
            raise ValueError("the packed variant needs --state (written by save_packed_state)")
        return load_packed_model(config_path, state_path)
    cfg = load_config(config_path)
    if variant == "twin":
        cfg.model.quantize = False
    torch.manual_seed(0)
    return BitMar(cfg.model).eval()


def _memory_mb(field: str) -> float | None:
    """VmHWM (peak) or VmRSS of this process from /proc, in MB; None where /proc is missing.

    Not getrusage's ru_maxrss: Linux keeps it across fork + exec, so a child started by a large parent reports the
    parent's size (the benchmark's parent holds the full float model it packed)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def run_variant(
    variant: str, config_path: str, batch: int, threads: int, new_tokens: int, calls: int, state: str | None
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    baseline = _memory_mb("VmRSS")  # torch and bitmar imported, nothing built
    model = _build(variant, config_path, state)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, model.config.vocab_size, (batch, PROMPT_TOKENS), generator=g)  # (B, T)
    features = torch.randn(batch, model.config.vision_encoder_dim, generator=g)  # (B, D)
    times = []
    with torch.no_grad():
        model.generate(ids, vision_features=features, max_new_tokens=4)  # warm-up: probes, caches, allocator
        for _ in range(calls):
            t0 = time.perf_counter()
            tokens = model.generate(ids, vision_features=features, max_new_tokens=new_tokens)
            times.append(time.perf_counter() - t0)
            if tokens.shape != (batch, new_tokens):
                raise RuntimeError(f"generate made {tuple(tokens.shape)} tokens, expected {(batch, new_tokens)}")
    result: dict[str, Any] = {
        "variant": variant,
        "tokens_per_s": batch * new_tokens / statistics.median(times),
        "peak_rss_mb": _memory_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_imports_mb": baseline,
        "seconds": times,
    }
    if variant == "packed":
        decision = packed_kernel_decision()
        result["kernel"] = {k: decision[k] for k in ("use", "isa", "reason")}
    return result


# ---------------------------------------------------------------------------------------------------------------
# The benchmark (the parent)
# ---------------------------------------------------------------------------------------------------------------


def _child(args: Sequence[str], threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "bitmar.bench.packed_decoding", *args, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decoding_rows(settings: Settings) -> list[Row | Unavailable]:
    from bitmar.bench.training import FULL_CONFIG, TINY_CONFIG

    decision = packed_kernel_decision()  # builds the kernel here once, so no child pays the compile
    quick = settings.quick
    config = TINY_CONFIG if quick else FULL_CONFIG
    label = "tiny" if quick else "full"
    rounds, new_tokens, calls = (1, 8, 1) if quick else (3, NEW_TOKENS, CALLS)
    thread_counts, batches = ((1,), (1,)) if quick else ((1, 2), (1, 8))
    rows: list[Row | Unavailable] = []
    with tempfile.TemporaryDirectory(dir=settings.tmp_dir) as tmp:
        state = Path(tmp) / "packed_state.pt"
        save_packed_state(config, state)
        for threads in thread_counts:
            for batch in batches:
                got: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
                for r in range(rounds):
                    for variant in VARIANTS[r % 3 :] + VARIANTS[: r % 3]:  # the order rotates per round
                        args = ["--variant", variant, "--config", str(config), "--batch", str(batch)]
                        args += ["--new_tokens", str(new_tokens), "--calls", str(calls), "--state", str(state)]
                        got[variant].append(_child(args, threads))
                tps = {v: [g["tokens_per_s"] for g in got[v]] for v in VARIANTS}
                rss = {v: [g["peak_rss_mb"] for g in got[v]] for v in VARIANTS}
                med = {v: statistics.median(tps[v]) for v in VARIANTS}
                rss_med = {v: statistics.median(rss[v]) for v in VARIANTS}
                base = {v: [g["rss_after_imports_mb"] for g in got[v]] for v in VARIANTS}
                details = {"tokens_per_s": tps, "peak_rss_mb": rss, "rss_after_imports_mb": base,
                           "kernel": got["packed"][0].get("kernel"),
                           "new_tokens": new_tokens, "calls_per_process": calls, "config": str(config)}  # fmt: skip
                name = (
                    f"decoding, {label} config, batch {batch}, {threads} thread(s), {new_tokens} new tokens "
                    f"({med['packed']:,.1f} / {med['twin']:,.1f} / {med['bitlinear']:,.1f} tokens/s packed / twin / "
                    "BitLinear)"
                )
                goal = SPEED_GOALS.get((threads, batch), NOT_SLOWER_TPS)
                packed_label = LABELS["packed"] if decision["use"] else "packed (pure torch: no kernel)"
                rows.append(ratio_row("decoding", name, packed_label, LABELS["twin"], "tokens/s A / tokens/s B",
                                      tps["packed"], tps["twin"], goal, details))  # fmt: skip
                rows.append(ratio_row("decoding", f"decoding, {label} config, batch {batch}, {threads} thread(s)",
                                      packed_label, LABELS["bitlinear"], "tokens/s A / tokens/s B",
                                      tps["packed"], tps["bitlinear"], None, details))  # fmt: skip
                if threads == thread_counts[0]:
                    rows.append(ratio_row(
                        "decoding",
                        f"decoding peak RSS, {label} config, batch {batch} ({rss_med['packed']:,.0f} / "
                        f"{rss_med['twin']:,.0f} / {rss_med['bitlinear']:,.0f} MB packed / twin / BitLinear)",
                        packed_label, LABELS["twin"], "peak RSS A / peak RSS B", rss["packed"], rss["twin"],
                        RSS_GOAL if batch == 1 else None, details,
                    ))  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one decoding variant in this process (used by the benchmark)")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new_tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--state", default=None, help="packed state file (save_packed_state); packed variant only")
    args = parser.parse_args(argv)
    result = run_variant(args.variant, args.config, args.batch, args.threads, args.new_tokens, args.calls, args.state)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
