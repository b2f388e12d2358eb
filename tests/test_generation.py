"""Generation: KV cache == full recompute, sampling controls, EOS handling, padded prompts, conditioning paths."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_model import TINY_MODEL

from bitmar.model import BitMar
from bitmar.model.generation import filter_logits, left_align

CFG = TINY_MODEL
B, T, BOS = 3, 6, 1


@pytest.fixture(scope="module")
def model() -> BitMar:
    torch.manual_seed(0)
    return BitMar(CFG).eval()


def _prompt(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, CFG.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # right padding, as the data pipeline produces it
    mask[2, 2:] = 0
    return ids.masked_fill(mask == 0, 0), mask, torch.randn(B, CFG.vision_encoder_dim, generator=g)


@pytest.mark.parametrize(
    "sampling",
    [
        {"do_sample": False},
        {"do_sample": True, "temperature": 1.5},
        {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9},
    ],
)
@pytest.mark.parametrize("conditioning", ["text", "vision+memory"])
def test_kv_cache_matches_full_recompute(model: BitMar, sampling: dict, conditioning: str):
    ids, mask, vision = _prompt()
    kwargs: dict = {}
    if conditioning == "vision+memory":
        state = model.write_memory(model.memory_key(vision), model.episode_latent(ids, mask, vision))
        kwargs = {"vision_features": vision, "memory_state": state}
    runs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(7)
        runs.append(
            model.generate(ids, mask, max_new_tokens=10, use_cache=use_cache, generator=gen, **sampling, **kwargs)
        )
    assert runs[0].shape == (B, 10)
    assert torch.equal(runs[0], runs[1])


def test_sampling_is_reproducible_with_a_generator(model: BitMar):
    ids, mask, _ = _prompt()

    def sample(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return model.generate(ids, mask, max_new_tokens=12, do_sample=True, temperature=2.0, generator=gen)

    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))


def test_top_k_one_and_tiny_top_p_are_greedy(model: BitMar):
    ids, mask, _ = _prompt(1)
    greedy = model.generate(ids, mask, max_new_tokens=8)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=8, do_sample=True, top_k=1, generator=gen), greedy)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=8, do_sample=True, top_p=1e-6, generator=gen), greedy)


def test_eos_stops_each_sequence_then_pads(model: BitMar):
    ids, mask, _ = _prompt()
    free = model.generate(ids, mask, max_new_tokens=8)
    eos, pad = int(free[0, 2]), 0
    out = model.generate(ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=pad)
    for row, ref in zip(out, free, strict=True):
        hits = (ref == eos).nonzero()
        if len(hits):  # identical up to the first EOS, then padding
            first = int(hits[0])
            assert torch.equal(row[: first + 1], ref[: first + 1])
            assert torch.all(row[first + 1 :] == pad)
        else:
            assert torch.equal(row, ref[: len(row)])
    # every sequence finished at its first token: generation stops after one step
    first = model.generate(ids[:1], mask[:1], max_new_tokens=8)[0, 0]
    assert model.generate(ids[:1], mask[:1], max_new_tokens=8, eos_token_id=int(first)).shape == (1, 1)


def test_padded_prompt_decodes_like_the_prompt_alone(model: BitMar):
    ids, mask, vision = _prompt()
    batched = model.generate(ids, mask, vision_features=vision, max_new_tokens=6)
    for i in range(B):
        n = int(mask[i].sum())
        alone = model.generate(ids[i : i + 1, :n], vision_features=vision[i : i + 1], max_new_tokens=6)
        assert torch.equal(alone[0], batched[i]), i


def test_generation_from_vision_or_memory_alone_starts_at_bos(model: BitMar):
    ids, mask, vision = _prompt()
    caption = model.generate(vision_features=vision, bos_token_id=BOS, max_new_tokens=5)
    explicit = model.generate(torch.full((B, 1), BOS), vision_features=vision, max_new_tokens=5)
    assert caption.shape == (B, 5) and torch.equal(caption, explicit)
    readout = model.episode_latent(ids, mask, vision)
    from_memory = model.generate(memory_readout=readout, bos_token_id=BOS, max_new_tokens=5)
    assert from_memory.shape == (B, 5)
    state = model.write_memory(model.memory_key(vision), readout)
    recalled = model.generate(vision_features=vision, memory_state=state, bos_token_id=BOS, max_new_tokens=5)
    direct = model.generate(vision_features=vision, memory_readout=readout, bos_token_id=BOS, max_new_tokens=5)
    assert torch.equal(recalled, direct)  # the memory returns the episode value: same conditioning
    assert model.training is False  # generation leaves the mode alone


def test_generation_errors_are_actionable(model: BitMar):
    ids, mask, vision = _prompt()
    with pytest.raises(ValueError, match="bos_token_id"):
        model.generate(vision_features=vision)
    with pytest.raises(ValueError, match="condition on"):
        model.generate(bos_token_id=BOS)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="at least one real token"):
        model.generate(ids, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="batch size"):
        model.generate(ids, mask, vision_features=vision[:1])


def test_left_align_and_logit_filters():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    aligned, aligned_mask = left_align(ids, mask, pad_id=0)
    assert aligned.tolist() == [[0, 5, 6, 7], [0, 0, 8, 9]]
    assert aligned_mask.tolist() == [[False, True, True, True], [False, False, True, True]]
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03
    kept = torch.isfinite(filter_logits(logits, top_p=float(probs[0] + 0.01))[0])
    assert kept.tolist() == [True, True, False, False]  # smallest set reaching top_p
    assert torch.isfinite(filter_logits(logits, top_p=float(probs[0]) - 0.01)[0]).tolist() == [
        True,
        False,
        False,
        False,
    ]


def test_text_prompt_memory_key_generation():
    ids, mask, _ = _prompt()
    torch.manual_seed(0)
    text_model = BitMar(replace(CFG, use_vision=False)).eval()
    values = text_model.episode_latent(ids, mask)
    state = text_model.write_memory(text_model.text_memory_key(ids, mask), values)
    via_state = text_model.generate(ids, mask, memory_state=state, max_new_tokens=4)
    via_readout = text_model.generate(ids, mask, memory_readout=values, max_new_tokens=4)
    assert torch.equal(via_state, via_readout)  # the prompt's text key recalls its own episode
