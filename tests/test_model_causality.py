"""The decoder is causal: logits at positions < t never depend on tokens at positions >= t (docs/design.md §3).

Compared bitwise (torch.equal, float32): masked keys contribute exact zeros to the softmax, activation
quantization is per token, and the same shapes run the same kernels, so nothing leaks even by rounding.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_model import TINY_MODEL

from bitmar.model import BitMar

CFG = TINY_MODEL
B, T = 3, 9


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    mask[2, 3:] = 0
    return ids, mask, torch.randn(B, CFG.vision_encoder_dim, generator=g)


def _model(**overrides) -> BitMar:
    torch.manual_seed(0)
    return BitMar(replace(CFG, **overrides)).eval()


def _assert_causal(model: BitMar, ids: torch.Tensor, mask: torch.Tensor | None, **kwargs) -> None:
    with torch.no_grad():
        ref = model(ids, mask, **kwargs).logits
        g = torch.Generator().manual_seed(1)
        for t in range(T):
            changed = ids.clone()
            changed[:, t:] = torch.randint(0, CFG.vocab_size, (B, T - t), generator=g)
            out = model(changed, mask, **kwargs).logits
            assert torch.equal(out[:, :t], ref[:, :t]), f"logits before position {t} changed with later tokens"
            if t < T - 1:
                assert not torch.equal(out[:, t + 1 :], ref[:, t + 1 :])  # the test can see a change


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("prefix", ["none", "vision", "readout", "vision+readout", "vision+memory", "patches"])
def test_decoder_is_causal(prefix: str, padded: bool):
    model = _model()
    ids, mask, vision = _inputs()
    kwargs: dict = {}
    if "vision" in prefix:
        kwargs["vision_features"] = vision
    if prefix == "patches":
        kwargs["vision_features"] = torch.randn(B, 5, CFG.vision_encoder_dim)
    if "readout" in prefix:
        kwargs["memory_readout"] = torch.randn(B, CFG.episode_dim)
    if prefix == "vision+memory":
        keys = torch.randn(6, CFG.episode_dim)
        kwargs["memory_state"] = model.write_memory(keys, torch.randn(6, CFG.episode_dim))
    _assert_causal(model, ids, mask if padded else None, **kwargs)


@pytest.mark.parametrize("overrides", [{"quantize": False}, {"gqa_group_size": 1}, {"use_memory": False}])
def test_decoder_is_causal_in_variants(overrides: dict):
    ids, mask, vision = _inputs(3)
    _assert_causal(_model(**overrides), ids, mask, vision_features=vision)


def test_left_padding_is_masked_not_assumed_causal():
    # Generation left-aligns prompts: the explicit mask must keep real tokens off the pads before them.
    model = _model()
    ids, _, vision = _inputs()
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        ref = model(ids, mask, vision_features=vision).logits
        changed = ids.clone()
        changed[0, :4] = (changed[0, :4] + 1) % CFG.vocab_size  # only pad positions change
        out = model(changed, mask, vision_features=vision).logits
    torch.testing.assert_close(out[0, 4:], ref[0, 4:], atol=1e-5, rtol=1e-5)


def test_left_padded_row_matches_the_unpadded_row():
    # Rotary positions count real tokens only, so the distance to the prefix does not grow with the padding.
    model = _model()
    ids, _, vision = _inputs()
    readout = torch.randn(B, CFG.episode_dim)
    pad = 3
    padded = torch.cat([torch.zeros(B, pad, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(B, pad, dtype=torch.long), torch.ones(B, T, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = model(ids, vision_features=vision, memory_readout=readout)
        out = model(padded, mask, vision_features=vision, memory_readout=readout)
    torch.testing.assert_close(out.logits[:, pad:], ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text_latent, ref.text_latent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.multimodal_latent, ref.multimodal_latent, atol=1e-5, rtol=1e-5)


def test_decoder_never_reads_the_bidirectional_encoder():
    # The trap of earlier versions: a "decoder" fed by the encoder sees the future. Scrambling the encoder's
    # weights must leave the logits unchanged.
    model = _model()
    ids, mask, vision = _inputs()
    with torch.no_grad():
        ref = model(ids, mask, vision_features=vision).logits
        for p in model.text_encoder.parameters():
            p.add_(torch.randn_like(p))
        out = model(ids, mask, vision_features=vision)
    assert torch.equal(out.logits, ref)
    assert out.text_latent is not None  # the encoder did run
