"""Batched autoregressive generation for BitMar: greedy, temperature, top-k, nucleus; KV cache or full recompute.

Prompts arrive right-padded (the training convention) and are left-aligned here, so every sequence's next
token sits at the last position; rotary positions count real tokens only and the left pads are masked, so a
padded prompt is decoded like the same prompt alone. The prefix (memory readout tokens, vision tokens) is
computed once. `use_cache=False` recomputes the whole decoder sequence at every step (reference path for
tests and benchmarks); both paths run the same sampler, so with the same generator seed they give the same
tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bitmar.model.decoder import decoder_layout


def left_align(input_ids: Tensor, attention_mask: Tensor, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Move each row's real tokens to the end: (B, T) right/any padding -> left padding."""
    mask = attention_mask.bool()
    # A stable sort of "is real" puts pads first while keeping the real tokens in order.
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices  # (B, T)
    ids = torch.gather(input_ids, 1, order)
    mask_l = torch.gather(mask, 1, order)
    return ids.masked_fill(~mask_l, pad_id), mask_l


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Keep the top-k logits and/or the smallest set whose probability reaches top_p; the rest become -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def select_tokens(
    logits: Tensor,  # (B, V)
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:  # (B,)
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _check_args(
    max_new_tokens: int, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    input_ids: Tensor | None = None,  # (B, T) prompt, right padding
    attention_mask: Tensor | None = None,  # (B, T)
    vision_features: Tensor | None = None,  # (B, D) or (B, P, D)
    memory_state: object | None = None,  # MemoryState
    memory_readout: Tensor | None = None,  # (B, E)
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Generate up to `max_new_tokens` tokens after the prompt; returns only the new tokens (B, steps).

    Without `input_ids` generation starts from `bos_token_id` (captioning from vision features or a memory
    readout). A sequence that emitted `eos_token_id` continues with `pad_token_id` (default: the EOS id);
    generation stops early once every sequence has finished. With a memory_state and no readout, the key
    comes from the vision features, else from the prompt's text latent. The model's train/eval mode is left
    as it is: call `model.eval()` first for deterministic decoding (no dropout, no addressing noise).
    """
    _check_args(max_new_tokens, do_sample, temperature, top_k, top_p)
    device = model.embed_tokens.weight.device
    if input_ids is None:
        if bos_token_id is None:
            raise ValueError("generate without input_ids starts from BOS: pass bos_token_id (tokenizer's BOS id)")
        sources = [t for t in (vision_features, memory_readout) if t is not None]
        if not sources:
            raise ValueError("generate needs something to condition on: input_ids, vision_features or memory_readout")
        input_ids = torch.full((sources[0].shape[0], 1), bos_token_id, dtype=torch.long, device=device)
        attention_mask = None
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    model._check_text(input_ids, attention_mask)
    if bool((attention_mask.sum(dim=1) == 0).any()):
        raise ValueError("every prompt needs at least one real token (attention_mask row of zeros found)")
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    if generator is not None and do_sample and generator.device.type != device.type:
        raise ValueError(f"the generator lives on {generator.device} but the model on {device}")

    bsz = input_ids.shape[0]
    vision_tokens = None
    if vision_features is not None:
        vision_tokens, _ = model.encode_vision(vision_features)
        if vision_tokens.shape[0] != bsz:
            raise ValueError(f"vision_features has batch size {vision_tokens.shape[0]}, the prompt has {bsz}")
    if memory_readout is None and memory_state is not None:
        if vision_features is not None:
            key = model.memory_key(vision_features)
        else:
            key = model.text_memory_key(input_ids, attention_mask)
        memory_readout, _ = model.read_memory(memory_state, key=key)
    prefix = model.decoder_prefix(vision_tokens, memory_readout)  # (B, P, C) | None
    copies_vision = vision_tokens is not None and model.vision_pointer is not None
    vision_words = model.vision_word_log_probs(vision_tokens) if copies_vision else None  # (B, N, V), once
    num_prefix = 0 if prefix is None else prefix.shape[1]

    ids, mask = left_align(input_ids, attention_mask)
    key_mask, positions = decoder_layout(mask, num_prefix)  # (B, P + T) each
    next_position = positions[:, -1:] + 1  # (B, 1)

    decoder = model.decoder
    cache = decoder.new_cache(num_prefix + ids.shape[1] + max_new_tokens) if use_cache else None
    hidden, _ = decoder(model.embed_tokens(ids), prefix, key_mask, positions, cache)
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    new_tokens: list[Tensor] = []
    text_index = mask.sum(dim=1, keepdim=True) - 1  # (B, 1) text index of each row's last token
    for step in range(max_new_tokens):
        logits = model.lm_logits(hidden[:, -1])  # (B, V)
        if copies_vision:
            logits = logits.float() + model.vision_copy_log_probs(hidden[:, -1:], vision_tokens, vision_words)[:, 0]
        if memory_readout is not None:
            copy = model.copy_log_probs(memory_readout, text_index + step)  # (B, 1, V) | None
            if copy is not None:
                logits = logits.float() + copy[:, 0]
        token = select_tokens(logits, do_sample, temperature, top_k, top_p, generator)
        token = token.masked_fill(finished, pad_token_id)
        new_tokens.append(token)
        if eos_token_id is not None:
            finished |= token == eos_token_id
            if bool(finished.all()):
                break
        if step == max_new_tokens - 1:
            break
        key_mask = torch.cat([key_mask, mask.new_ones(bsz, 1)], dim=1)
        if use_cache:
            hidden, _ = decoder(model.embed_tokens(token[:, None]), None, key_mask, next_position, cache)
        else:
            ids = torch.cat([ids, token[:, None]], dim=1)
            positions = torch.cat([positions, next_position], dim=1)
            hidden, _ = decoder(model.embed_tokens(ids), prefix, key_mask, positions, None)
        next_position = next_position + 1
    return torch.stack(new_tokens, dim=1)
