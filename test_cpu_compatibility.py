"""Check that the BitMar network builds and runs on this machine's CPU, for the shipped configurations.

    python test_cpu_compatibility.py                                   # tiny and full configuration
    python test_cpu_compatibility.py --config configs/bitmar_tiny.yaml  # one configuration

For each configuration: build the model from the YAML's `model:` section, run a training step over every path
(text, vision, fusion, memory write + read, backward, optimizer step), greedy generation with and without the
KV cache, and an episodic-store write / read / forget. Prints parameter counts, the ternary fraction, the 2-bit
compression ratio and the step time. Exit status: 0 all passed, 1 a check failed (the message says which and
why), 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bitmar.config import ConfigError, load_config
from bitmar.memory import EpisodicStore
from bitmar.model import BitMar

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIGS = (ROOT / "configs" / "bitmar_tiny.yaml", ROOT / "configs" / "bitmar_config.yaml")


class CompatibilityError(RuntimeError):
    """A check failed; the message names the check and the observed value."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CompatibilityError(message)


def _finite(name: str, tensor: torch.Tensor | None) -> None:
    if tensor is not None:
        _require(bool(torch.isfinite(tensor).all()), f"{name} contains NaN or inf")


def check_config(path: Path, batch_size: int, seq_len: int) -> dict[str, float]:
    cfg = load_config(path).model
    torch.manual_seed(0)
    build_start = time.perf_counter()
    model = BitMar(cfg)
    build_s = time.perf_counter() - build_start
    total = model.num_parameters()
    report = model.quantization_report()
    print(f"  parameters        {total:,} ({total / 1e6:.2f}M), built in {build_s:.1f}s")
    for name, count in model.parameter_breakdown().items():
        print(f"    {name:<18}{count:>14,}")
    print(
        f"  ternary fraction  {report['ternary_fraction']:.3f} ({report['ternary_params']:,} ternary weights); "
        f"compression of the ternary layers {report['compression_ratio']:.1f}x (2-bit packing)"
    )

    g = torch.Generator().manual_seed(0)
    t = min(seq_len, cfg.max_seq_len)
    ids = torch.randint(3, cfg.vocab_size, (batch_size, t), generator=g)
    mask = torch.ones(batch_size, t, dtype=torch.long)
    mask[-1, t // 2 :] = 0  # right padding in the last row
    has_vision, has_memory = cfg.use_vision, cfg.use_memory
    vision = torch.randn(batch_size, cfg.vision_encoder_dim, generator=g) if has_vision else None

    # Training step over every enabled path.
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_times = []
    for _ in range(2):  # the first step pays one-off allocation costs
        start = time.perf_counter()
        state = None
        if has_memory and has_vision:
            state = model.write_memory(model.memory_key(vision), model.episode_latent(ids, mask, vision))
        out = model(ids, mask, vision_features=vision, memory_state=state)
        logits = out.logits[:, :-1].reshape(-1, cfg.vocab_size)
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).reshape(-1)
        loss = F.cross_entropy(logits, targets, ignore_index=-100)
        for latent in (out.text_latent, out.vision_latent, out.multimodal_latent):  # stand-ins for the aux losses
            if latent is not None:
                loss = loss + latent.square().mean()
        if out.memory_weights is not None:
            loss = loss + 0.01 * model.memory.kl_divergence(out.memory_weights)
        _require(bool(torch.isfinite(loss.detach())), f"training loss is {float(loss.detach())}")
        loss.backward()
        # Unused here: the patch-token input path, and the text-key projection (keys come from vision).
        unused = ("vision_encoder.patch_proj.", "text_key_proj.") if has_vision else ()
        missing = [
            n for n, p in model.named_parameters() if p.requires_grad and p.grad is None and not n.startswith(unused)
        ]
        _require(not missing, f"parameters without gradient after backward: {missing[:5]}")
        nonfinite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        _require(not nonfinite, f"non-finite gradients in {nonfinite[:5]}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
    print(f"  train step        {step_times[-1]:.3f}s (batch {batch_size} x {t} tokens, all enabled paths)")

    # Evaluation: all-zero features stay finite; generation with and without the KV cache agrees.
    model.eval()
    with torch.no_grad():
        zeros = torch.zeros_like(vision) if vision is not None else None
        out = model(ids, mask, vision_features=zeros)
        for name in ("logits", "text_latent", "vision_latent", "multimodal_latent"):
            _finite(f"eval output {name} with all-zero vision features", getattr(out, name))
        start = time.perf_counter()
        cached = model.generate(ids[:, :4], vision_features=vision, max_new_tokens=8)
        gen_s = time.perf_counter() - start
        full = model.generate(ids[:, :4], vision_features=vision, max_new_tokens=8, use_cache=False)
        _require(cached.shape == (batch_size, 8), f"generation returned shape {tuple(cached.shape)}")
        _require(torch.equal(cached, full), "KV-cache generation differs from full recomputation")
    print(f"  generation        8 tokens x {batch_size} sequences in {gen_s:.3f}s, KV cache == recompute")

    # Episodic memory: persistent store write / read / forget (exact alpha = -1 update).
    if has_memory:
        with torch.no_grad():
            if has_vision:
                keys = model.memory_key(vision)
                values = model.episode_latent(ids, mask, vision)
            else:
                keys = model.text_memory_key(ids, mask)
                values = model.episode_latent(ids, mask)
            state = model.write_memory(keys, values)
            readout, _ = model.read_memory(state, key=keys)
            error = float((readout - values).norm() / values.norm())
            _require(error < 1e-3, f"one-shot key-value recall error {error:.2e} (expected < 1e-3)")
            store = EpisodicStore(model.memory)
            ids_written = [store.write(k, v) for k, v in zip(keys, values, strict=True)]
            recalled = store.read(keys)
            store_error = float((recalled - values).norm() / values.norm())
            _require(store_error < 1e-3, f"episodic store recall error {store_error:.2e} (expected < 1e-3)")
            store.forget(ids_written[0])
            kept = store.read(keys[1:])
            kept_error = float((kept - values[1:]).norm() / values[1:].norm())
            _require(len(store) == batch_size - 1, f"store holds {len(store)} episodes after forgetting one")
            _require(kept_error < 1e-3, f"recall of the kept episodes after forgetting: error {kept_error:.2e}")
        print(f"  memory            recall error {error:.1e}; store write/read/forget ok (kept {kept_error:.1e})")
    return {"parameters": total, "step_s": step_times[-1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, action="append", help="config YAML (repeatable); default: tiny + full")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=32)
    args = parser.parse_args(argv)
    if args.batch_size < 2 or args.seq_len < 4:
        parser.error("--batch_size must be >= 2 and --seq_len >= 4")
    configs = args.config or list(DEFAULT_CONFIGS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    failed = []
    for path in configs:
        print(f"\n== {path}")
        try:
            check_config(path, args.batch_size, args.seq_len)
        except ConfigError as err:
            print(f"CONFIG ERROR: {err}", file=sys.stderr)
            return 2
        except CompatibilityError as err:
            print(f"  FAILED: {err}", file=sys.stderr)
            failed.append(str(path))
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
