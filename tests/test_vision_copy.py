"""The vision copy path (model.vision_copy): a gated pointer from each decoder state to the vision tokens' words."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_model import TINY_MODEL

from bitmar.config import config_from_dict, config_to_dict, load_config
from bitmar.model import BitMar
from bitmar.training.diagnostics import component_of
from bitmar.training.losses import lm_loss

B, T = 2, 7


def _model(**overrides) -> BitMar:
    torch.manual_seed(0)
    return BitMar(replace(TINY_MODEL, **overrides)).eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randint(0, TINY_MODEL.vocab_size, (B, T), generator=g), torch.randn(B, 20, generator=g)


def test_copy_is_the_gated_log_of_the_pointed_mixture_of_token_words() -> None:
    model = _model()
    with torch.no_grad():
        model.vision_copy_gate.bias.fill_(0.7)  # a gate that is not the initial 0.5
        hidden = torch.randn(B, T, TINY_MODEL.hidden_size)
        tokens = torch.randn(B, TINY_MODEL.vision_num_tokens, TINY_MODEL.hidden_size)
        copy = model.vision_copy_log_probs(hidden, tokens)
        # The definition, computed the wide way: log sum_j a_tj p_j(w) over a (B, T, N, V) tensor.
        pointer = torch.log_softmax(model.vision_pointer(hidden) @ tokens.mT / TINY_MODEL.hidden_size**0.5, dim=-1)
        words = torch.log_softmax(model.lm_logits(tokens), dim=-1)
        mixture = torch.logsumexp(pointer[..., None] + words[:, None], dim=2)
        expected = torch.sigmoid(torch.tensor(0.7)) * mixture
    torch.testing.assert_close(copy, expected, atol=1e-5, rtol=1e-5)
    assert copy.shape == (B, T, TINY_MODEL.vocab_size) and bool((copy <= 0).all())  # a scaled log-probability


def test_with_one_vision_token_the_copy_is_that_tokens_words() -> None:
    model = _model(vision_num_tokens=1)
    with torch.no_grad():
        hidden, tokens = torch.randn(B, T, TINY_MODEL.hidden_size), torch.randn(B, 1, TINY_MODEL.hidden_size)
        copy = model.vision_copy_log_probs(hidden, tokens)
        words = torch.log_softmax(model.lm_logits(tokens), dim=-1)  # (B, 1, V)
    torch.testing.assert_close(copy, 0.5 * words.expand(-1, T, -1), atol=1e-6, rtol=1e-6)  # the gate starts at 0.5


def test_forward_adds_the_copy_to_the_decoder_logits_only_with_a_picture() -> None:
    model = _model()
    plain = _model(vision_copy=False)
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith(("vision_pointer", "vision_copy_gate"))}
    )
    ids, vision = _inputs()
    with torch.no_grad():
        out = model(ids, vision_features=vision, return_latents=False).logits
        base = plain(ids, vision_features=vision, return_latents=False).logits
        tokens, _ = model.encode_vision(vision)
        assert not torch.allclose(out, base)
        text_only = model(ids, return_latents=False).logits
        assert torch.equal(text_only, plain(ids, return_latents=False).logits)  # no picture: nothing to copy
    # The difference is exactly the copy computed from the same decoder states.
    states = {}
    handle = model.decoder.register_forward_hook(lambda m, a, o: states.__setitem__("h", o[0]))
    with torch.no_grad():
        model(ids, vision_features=vision, return_latents=False)
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(out - base, model.vision_copy_log_probs(states["h"], tokens), atol=1e-5, rtol=1e-5)


def test_greedy_generation_uses_the_copy_like_forward() -> None:
    model = _model()
    with torch.no_grad():
        model.vision_copy_gate.bias.fill_(3.0)  # a strong copy, so it decides the tokens
    _, vision = _inputs()
    generated = model.generate(vision_features=vision, max_new_tokens=6, bos_token_id=1, use_cache=True)
    recomputed = model.generate(vision_features=vision, max_new_tokens=6, bos_token_id=1, use_cache=False)
    assert torch.equal(generated, recomputed)
    seq = torch.cat([torch.ones(B, 1, dtype=torch.long), generated], dim=1)
    with torch.no_grad():
        logits = model(seq, vision_features=vision, return_latents=False).logits
    assert torch.equal(logits[:, :-1].argmax(-1), generated)  # greedy = argmax of the teacher-forced logits


def test_generation_reads_the_pictures_words_once_not_at_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    calls = []
    original = model.vision_word_log_probs
    monkeypatch.setattr(model, "vision_word_log_probs", lambda tokens: calls.append(1) or original(tokens))
    _, vision = _inputs()
    model.generate(vision_features=vision, max_new_tokens=6, bos_token_id=1, use_cache=True)
    assert len(calls) == 1  # an (N x V) product per picture, not per token


def test_the_copy_trains_the_pointer_the_gate_and_the_vision_encoder() -> None:
    model = _model().train()
    ids, vision = _inputs()
    lm_loss(model(ids, vision_features=vision, return_latents=False).logits, ids).backward()
    for name in ("vision_pointer", "vision_copy_gate", "vision_encoder.expand"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads), name


def test_switch_and_bookkeeping() -> None:
    assert _model(vision_copy=False).vision_pointer is None
    assert _model(use_vision=False).vision_pointer is None  # no picture, no copy path
    with pytest.raises(RuntimeError, match="vision_copy"):
        _model(vision_copy=False).vision_copy_log_probs(torch.zeros(1, 1, 32), torch.zeros(1, 3, 32))
    assert component_of("vision_pointer.weight") == component_of("vision_copy_gate.bias") == "decoder"
    assert load_config("configs/bitmar_tiny.yaml").model.vision_copy  # both shipped configs turn it on
    assert load_config("configs/bitmar_config.yaml").model.vision_copy
    # A config saved before the switch existed (a checkpoint's) has no key: it builds the model it was, without copy.
    saved = config_to_dict(load_config("configs/bitmar_tiny.yaml"))
    del saved["model"]["vision_copy"]
    assert not config_from_dict(saved).model.vision_copy
