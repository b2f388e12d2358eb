"""BitMar: BitNet b1.58 vision-language model with a Larimar episodic memory.

Data flow (docs/design.md §1):
    text ids -> shared embedding -> bidirectional text encoder -> text tokens, z_t
    DINOv2 features -> quantized vision encoder -> vision tokens, z_v
    text tokens x vision tokens -> cross-modal fusion -> z_m (the episode value written to memory)
    z_v -> key projection -> episode key; memory.read_kv(key) -> readout z_r
    [readout tokens, vision tokens] + text embeddings -> causal decoder -> next-token logits
    (model.vision_copy) decoder state -> pointer over the vision tokens -> their words, added to the logits

The decoder never reads the bidirectional encoder's token states (that would leak the future, docs/design.md §3).
Losses live with the trainer; the model returns logits, latents, memory weights and attention maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitmar.bitnet import BitLinear, quantization_stats
from bitmar.memory import EpisodicMemory, MemoryState
from bitmar.model.decoder import TextDecoder, decoder_layout
from bitmar.model.fusion import CrossModalFusion
from bitmar.model.generation import generate_tokens
from bitmar.model.layers import init_weights, scale_residual_projections
from bitmar.model.model_config import ModelConfig
from bitmar.model.text_encoder import TextEncoder
from bitmar.model.vision_encoder import VisionEncoder

ATTENTION_TYPES = ("encoder", "decoder", "cross_modal", "vision")


@dataclass
class BitMarOutput:
    """What `BitMar.forward` returns. `logits[:, t]` predicts `input_ids[:, t + 1]`."""

    logits: Tensor  # (B, T, V), text positions only
    text_latent: Tensor | None = None  # (B, Lt)
    vision_latent: Tensor | None = None  # (B, Lv)
    multimodal_latent: Tensor | None = None  # (B, R * E) the episode value, needs text + vision
    memory_readout: Tensor | None = None  # (B, R * E)
    memory_weights: Tensor | None = None  # (B, K) addressing weights of the read
    attentions: dict[str, list[Tensor]] | None = None  # per type, per layer (B, H, Tq, Tk)
    prefix_length: int = 0  # decoder positions before the text (readout tokens + vision tokens)
    memory_diagnostics: dict[str, Any] | None = None


class BitMar(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config.hidden_size
        q = config.quantize
        self.embed_tokens = nn.Embedding(config.vocab_size, c)  # full precision, shared by encoder and decoder
        self.text_encoder = TextEncoder(config)
        self.decoder = TextDecoder(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(c, config.vocab_size, bias=False)
        self.vision_encoder = VisionEncoder(config) if config.use_vision else None
        self.fusion = CrossModalFusion(config) if config.use_vision else None
        # Vision copy path (model.vision_copy): a pointer from each decoder state to the vision tokens, and its gate.
        self.vision_pointer: BitLinear | None = None
        self.vision_copy_gate: nn.Linear | None = None
        if config.use_vision and config.vision_copy:
            self.vision_pointer = BitLinear(c, c, quantize=q)
            self.vision_copy_gate = nn.Linear(c, 1)  # one scalar per position: full precision, like the norms
        self.memory: EpisodicMemory | None = None
        self.memory_key_proj: BitLinear | None = None  # z_v (or the DINOv2 vector) -> episode key
        self.text_key_proj: BitLinear | None = None  # z_t -> key, when z_v's projection cannot be shared
        self.text_value_proj: BitLinear | None = None  # z_t -> episode value, text-only models
        self.episode_token_proj: BitLinear | None = None  # caption token states -> episode tokens 1..R-1
        self.slot_log_scale: nn.Parameter | None = None  # sharpness of the copy path's slot -> token distribution
        self.episode_context_gate: nn.Parameter | None = None
        if config.use_memory:
            width = config.memory_width  # R episode tokens x E, one memory row
            key_width = config.memory_key_width
            self.memory = EpisodicMemory(
                config.memory_size, width, addressing_noise_std=config.addressing_noise_std, key_dim=key_width
            )
            from_features = config.memory_key_input == "features"
            if config.use_vision:
                key_in = config.vision_encoder_dim if from_features else config.vision_latent_size
                self.memory_key_proj = BitLinear(key_in, key_width, quantize=q)
            if not config.use_vision or from_features or config.text_latent_size != config.vision_latent_size:
                self.text_key_proj = BitLinear(config.text_latent_size, key_width, quantize=q)
            if not config.use_vision:
                self.text_value_proj = BitLinear(config.text_latent_size, config.episode_dim, quantize=q)
            if config.episode_tokens > 1:
                self.episode_token_proj = BitLinear(c, config.episode_dim, quantize=q)
                # Context enters a slot through a gate that starts closed: at first a slot is exactly the embedding
                # of its token, which the tied LM head can already read.
                self.episode_context_gate = nn.Parameter(torch.zeros(()))
                # Copy path: a slot names the token whose embedding it is closest to (cosine, learned sharpness).
                self.slot_log_scale = nn.Parameter(torch.tensor(math.log(16.0)))
        self._init_weights()

    def _init_weights(self) -> None:
        # The memory initialises its own parameters (its prior is not an N(0, 0.02) matrix).
        for name, child in self.named_children():
            if name != "memory":
                child.apply(init_weights)
        for stack in (self.text_encoder, self.decoder, self.vision_encoder, self.fusion):
            if stack is not None:
                scale_residual_projections(stack.blocks)
        if self.vision_encoder is not None:
            nn.init.normal_(self.vision_encoder.token_pos, mean=0.0, std=0.02)
        if self.vision_copy_gate is not None:  # the gate starts half open at every position
            nn.init.zeros_(self.vision_copy_gate.weight)
            nn.init.zeros_(self.vision_copy_gate.bias)

    # ------------------------------------------------------------------ components

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """-> text tokens (B, T, C), text latent z_t (B, Lt)."""
        self._check_text(input_ids, attention_mask)
        tokens, latent, _ = self.text_encoder(self.embed_tokens(input_ids), attention_mask)
        return tokens, latent

    def encode_vision(self, vision_features: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D) or (B, P, D) DINOv2 features -> vision tokens (B, N, C), vision latent z_v (B, Lv)."""
        tokens, latent, _ = self._vision()(vision_features)
        return tokens, latent

    def episode_latent(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, vision_features: Tensor | None = None
    ) -> Tensor:
        """The episode VALUE written to memory (B, R * E): z_m of text + picture (text-only models: projected z_t),
        then, with model.episode_tokens = R > 1, R - 1 projected caption token states."""
        text_tokens, text_latent = self.encode_text(input_ids, attention_mask)
        if self.fusion is None:
            summary = self._memory_part(self.text_value_proj)(text_latent)
            return self._episode_value(summary, text_tokens, input_ids, attention_mask)
        if vision_features is None:
            raise ValueError("episode_latent needs vision_features: the episode value z_m fuses caption and picture")
        vision_tokens, _ = self.encode_vision(vision_features)
        fused, z_m, _ = self.fusion(text_tokens, attention_mask, vision_tokens)
        return self._episode_value(z_m, fused, input_ids, attention_mask)

    def _episode_value(
        self, summary: Tensor, token_states: Tensor, input_ids: Tensor, attention_mask: Tensor | None
    ) -> Tensor:
        """summary (B, E), token states (B, T, C), ids (B, T) -> flattened episode (B, R * E).

        Slot i holds the caption token at position i: its (full-precision) embedding, which names the token as it
        was heard, plus a ternary projection of its fused state, which adds the context. Padding and positions past
        the caption give zero slots."""
        if self.episode_token_proj is None:
            return summary
        r = self.config.episode_tokens - 1
        states = token_states[:, :r]  # (B, <=r, C)
        if attention_mask is not None:
            states = states * attention_mask[:, :r, None].to(states.dtype)
        context = self.episode_context_gate * self.episode_token_proj(states)  # (B, <=r, E)
        tokens = self.embed_tokens(input_ids[:, :r]).to(context.dtype) + context
        if attention_mask is not None:  # BitLinear's bias-free RMSNorm keeps zero rows zero; be explicit anyway
            tokens = tokens * attention_mask[:, :r, None].to(tokens.dtype)
        if tokens.shape[1] < r:
            tokens = F.pad(tokens, (0, 0, 0, r - tokens.shape[1]))
        return torch.cat([summary[:, None].to(tokens.dtype), tokens], dim=1).flatten(1)  # (B, R * E)

    def memory_key(self, vision_features: Tensor) -> Tensor:
        """The episode KEY (B, key width) from the picture alone, so a picture recalls its episode."""
        if self.config.memory_key_input == "features":
            return self.vision_key(vision_features, None)
        _, vision_latent = self.encode_vision(vision_features)
        return self.vision_key(vision_features, vision_latent)

    def vision_key(self, vision_features: Tensor, vision_latent: Tensor | None) -> Tensor:
        """Key of a picture from what is at hand: its DINOv2 features (B, D) / (B, P, D) or its latent z_v (B, Lv)."""
        proj = self._memory_part(self.memory_key_proj)
        if self.config.memory_key_input == "features":
            features = vision_features.mean(dim=1) if vision_features.dim() == 3 else vision_features  # (B, D)
            return proj(features.to(self.embed_tokens.weight.dtype))  # model dtype (a packed layer has no .weight)
        if vision_latent is None:
            _, vision_latent = self.encode_vision(vision_features)
        return proj(vision_latent)

    def text_memory_key(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """A key (B, R * E) from text (a prompt / question): the vision key projection applied to z_t when the latent
        sizes match (contrastive training aligns z_t with z_v), else a separate text projection."""
        _, text_latent = self.encode_text(input_ids, attention_mask)
        return self._text_key(text_latent)

    def read_memory(
        self, memory_state: MemoryState, vision_features: Tensor | None = None, key: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """-> readout (B, R * E), addressing weights (B, K). The key is given, or computed from vision features."""
        memory = self._memory_part(self.memory)
        if key is None:
            if vision_features is None:
                raise ValueError("read_memory needs vision_features or an explicit key (e.g. text_memory_key(...))")
            key = self.memory_key(vision_features)
        return memory.read_kv(key, memory_state)

    def write_memory(self, keys: Tensor, values: Tensor) -> MemoryState:
        """One-shot key-value write of N episodes: keys (N, E), values (N, E) -> a new MemoryState."""
        return self._memory_part(self.memory).write_kv(keys, values)

    def slot_log_probs(self, memory_readout: Tensor) -> Tensor | None:
        """Token log-probabilities stored in each caption slot of an episode readout: (B, R * E) -> (B, R - 1, V),
        slot i for caption position i (BOS at 0). None when episodes are a single latent (model.episode_tokens=1)."""
        if self.slot_log_scale is None:
            return None
        r, e = self.config.episode_tokens, self.config.episode_dim
        slots = memory_readout.view(memory_readout.shape[0], r, e)[:, 1:]  # (B, R - 1, E)
        table = F.normalize(self.embed_tokens.weight.float(), dim=-1)  # (V, C)
        cosine = F.normalize(slots.float(), dim=-1) @ table.mT  # (B, R - 1, V)
        return torch.log_softmax(self.slot_log_scale.float().exp() * cosine, dim=-1)

    def copy_log_probs(self, memory_readout: Tensor, text_index: Tensor) -> Tensor | None:
        """Copy path of a memory-conditioned decoder (a pointer to the aligned slot, as in pointer-generator
        networks): the text token at index t predicts caption position t + 1, which episode slot t + 1 holds.
        memory_readout (B, R * E), text_index (B, T) -> log-probabilities (B, T, V) to ADD to the decoder's logits
        (a product of experts); zero where no slot is aligned. None when model.episode_tokens = 1."""
        slots = self.slot_log_probs(memory_readout)
        if slots is None:
            return None
        target = text_index + 1  # (B, T)
        valid = (target >= 0) & (target < slots.shape[1])
        picked = slots.gather(1, target.clamp(0, slots.shape[1] - 1)[..., None].expand(-1, -1, slots.shape[-1]))
        return picked * valid[..., None].to(picked.dtype)  # (B, T, V)

    def vision_word_log_probs(self, vision_tokens: Tensor) -> Tensor:
        """What each vision token names through the tied LM head: (B, N, C) -> log p_j(w), (B, N, V) float32. It depends
        on the picture only, so generation computes it once, not at every step."""
        return torch.log_softmax(self.lm_logits(vision_tokens).float(), dim=-1)

    def vision_copy_log_probs(
        self, hidden: Tensor, vision_tokens: Tensor, word_log_probs: Tensor | None = None
    ) -> Tensor:
        """Vision copy path: decoder states (B, T, C) and vision tokens (B, N, C) -> (B, T, V) to ADD to the logits.

        Each vision token names words through the tied LM head (the visual-words term trains exactly this reading:
        log_softmax(lm_logits(token_j)) = log p_j(w)); each position points at the tokens with a learned attention
        a_tj = softmax_j(pointer(h_t) . v_j / sqrt(C)) and adds g_t * log sum_j a_tj p_j(w), g_t = sigmoid(gate(h_t)),
        a gated product of experts with a pointer over the picture's words, as in pointer-generator networks. Why:
        the tokens knew a picture's colours (about 0.5 nats above chance at the best token) while the decoder,
        which had to learn to route them through its own attention, gained 0.08 nats from them; the pointer gives
        that evidence a direct route. Causal: position t reads only h_t and the picture. word_log_probs: the
        tokens' `vision_word_log_probs`, when already computed."""
        if self.vision_pointer is None or self.vision_copy_gate is None:
            raise RuntimeError("this model has no vision copy path (model.vision_copy or model.use_vision is false)")
        scores = self.vision_pointer(hidden) @ vision_tokens.to(hidden.dtype).mT / math.sqrt(hidden.shape[-1])
        pointer = torch.softmax(scores.float(), dim=-1)  # (B, T, N)
        words = self.vision_word_log_probs(vision_tokens) if word_log_probs is None else word_log_probs  # (B, N, V)
        # log sum_j a_tj p_j(w) as one batched matmul, (B, T, V) wide like the logits (never B x T x N x V):
        # shifted by each word's largest log p_j(w), so every term is at most 1.
        top = words.amax(dim=1, keepdim=True)  # (B, 1, V)
        mixture = (pointer @ (words - top).exp()).clamp_min(torch.finfo(torch.float32).tiny).log() + top
        gate = torch.sigmoid(self.vision_copy_gate(hidden).float())  # (B, T, 1)
        return gate * mixture

    def lm_logits(self, hidden: Tensor) -> Tensor:  # (B, T, C) -> (B, T, V)
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return F.linear(hidden, self.embed_tokens.weight)

    def decoder_prefix(
        self, vision_tokens: Tensor | None, memory_readout: Tensor | None
    ) -> Tensor | None:  # -> (B, P, C), P = r * [readout] + N * [vision]
        parts = []
        if memory_readout is not None:
            parts.append(self.decoder.memory_prefix(memory_readout))
        if vision_tokens is not None:
            parts.append(vision_tokens)
        if not parts:
            return None
        return torch.cat([p.to(parts[0].dtype) for p in parts], dim=1)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: Tensor,  # (B, T), right padding
        attention_mask: Tensor | None = None,  # (B, T), 1 = real token
        vision_features: Tensor | None = None,  # (B, D) or (B, P, D)
        memory_state: MemoryState | None = None,
        memory_readout: Tensor | None = None,  # (B, R * E), overrides reading memory_state
        output_attentions: bool = False,
        return_latents: bool = True,
        return_memory_diagnostics: bool = False,
    ) -> BitMarOutput:
        """One pass over all paths that the inputs enable.

        memory_state without memory_readout reads the memory with the vision key; without vision features the key
        comes from the text latent, which the bidirectional encoder computes from the WHOLE input text: every
        position is then conditioned on later text through the readout. Use that path for a given prompt only
        (or compute the readout from the prompt and pass `memory_readout`), never for next-token training.
        `return_latents=False` skips the encoder and fusion when nothing needs them (plain LM scoring).
        """
        self._check_text(input_ids, attention_mask)
        if memory_readout is not None or memory_state is not None:
            self._memory_part(self.memory)
        need_weights = output_attentions
        attentions = {name: [] for name in ATTENTION_TYPES} if output_attentions else None
        embeds = self.embed_tokens(input_ids)  # (B, T, C)

        vision_tokens = vision_latent = None
        if vision_features is not None:
            vision_tokens, vision_latent, att = self._vision()(vision_features, need_weights)
            if attentions is not None:
                attentions["vision"] = att
            if vision_tokens.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"vision_features has batch size {vision_tokens.shape[0]} but input_ids has {input_ids.shape[0]}"
                )

        reads_text_key = memory_state is not None and memory_readout is None and vision_features is None
        text_tokens = text_latent = multimodal_latent = None
        if return_latents or reads_text_key:
            text_tokens, text_latent, att = self.text_encoder(embeds, attention_mask, need_weights)
            if attentions is not None:
                attentions["encoder"] = att
        if return_latents and vision_tokens is not None:
            fused, z_m, att = self.fusion(text_tokens, attention_mask, vision_tokens, need_weights)
            multimodal_latent = self._episode_value(z_m, fused, input_ids, attention_mask)  # (B, R * E)
            if attentions is not None:
                attentions["cross_modal"] = att

        memory_weights = diagnostics = None
        if memory_readout is None and memory_state is not None:
            if vision_latent is not None:
                key = self.vision_key(vision_features, vision_latent)
            else:
                key = self._text_key(text_latent)
            memory_readout, memory_weights = self.memory.read_kv(key, memory_state)
            if return_memory_diagnostics:
                diagnostics = self.memory.diagnostics(memory_state, memory_weights)
        if memory_readout is not None and memory_readout.shape != (input_ids.shape[0], self.config.memory_width):
            raise ValueError(
                f"memory_readout must have shape (batch, episode_tokens * episode_dim) = ({input_ids.shape[0]}, "
                f"{self.config.memory_width}), got {tuple(memory_readout.shape)}"
            )

        prefix = self.decoder_prefix(vision_tokens, memory_readout)
        prefix_length = 0 if prefix is None else prefix.shape[1]
        key_mask = positions = None
        if attention_mask is not None:
            key_mask, positions = decoder_layout(attention_mask, prefix_length)
        hidden, att = self.decoder(embeds, prefix, key_mask, positions, need_weights=need_weights)
        if attentions is not None:
            attentions["decoder"] = att
        logits = self.lm_logits(hidden)  # (B, T, V)
        if vision_tokens is not None and self.vision_pointer is not None:
            logits = logits.float() + self.vision_copy_log_probs(hidden, vision_tokens)
        if memory_readout is not None:
            text_index = positions[:, prefix_length:] - prefix_length if positions is not None else None
            if text_index is None:
                text_index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            copy = self.copy_log_probs(memory_readout, text_index)
            if copy is not None:
                logits = logits.float() + copy
        return BitMarOutput(
            logits=logits,
            text_latent=text_latent if return_latents else None,
            vision_latent=vision_latent,
            multimodal_latent=multimodal_latent,
            memory_readout=memory_readout,
            memory_weights=memory_weights,
            attentions=attentions,
            prefix_length=prefix_length,
            memory_diagnostics=diagnostics,
        )

    @torch.no_grad()
    def generate(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Generated token ids (B, steps) after the prompt: `bitmar.model.generation.generate_tokens(self, ...)`.

        Every keyword argument goes to `generate_tokens`, which documents them: vision_features, memory_state,
        memory_readout, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id,
        bos_token_id, use_cache, generator (an unknown one raises TypeError there).
        """
        return generate_tokens(self, input_ids, attention_mask, **kwargs)

    # ------------------------------------------------------------------ analysis

    def attention_modules(self) -> dict[str, list[nn.Module]]:
        """Attention modules per type, in layer order; each has `head_gates` (H,) and `num_heads`."""
        stacks = {
            "encoder": self.text_encoder.blocks,
            "decoder": self.decoder.blocks,
            "cross_modal": self.fusion.blocks if self.fusion is not None else [],
            "vision": self.vision_encoder.blocks if self.vision_encoder is not None else [],
        }
        return {name: [block.attn for block in blocks] for name, blocks in stacks.items()}

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Distinct parameters (the tied embedding / LM head counts once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def quantization_report(self) -> dict[str, Any]:
        """Ternary statistics of every quantized layer (`bitmar.bitnet.quantization_stats`): per-layer zero fraction and
        scale, ternary_fraction of all parameters, compression_ratio of the 2-bit packing."""
        return quantization_stats(self)

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameters per top-level component (the copy path's own scalars under "episode_scalars")."""
        parts = {name: sum(p.numel() for p in child.parameters()) for name, child in self.named_children()}
        own = sum(p.numel() for p in self._parameters.values() if p is not None)
        if own:
            parts["episode_scalars"] = own
        return parts

    # ------------------------------------------------------------------ helpers

    def _vision(self) -> VisionEncoder:
        if self.vision_encoder is None:
            raise ValueError("this model was built with model.use_vision=false: it takes no vision_features")
        return self.vision_encoder

    def _memory_part(self, part: Any) -> Any:
        if part is None:
            raise ValueError("this model was built with model.use_memory=false: it has no episodic memory")
        return part

    def _text_key(self, text_latent: Tensor) -> Tensor:
        proj = self.text_key_proj if self.text_key_proj is not None else self.memory_key_proj
        return self._memory_part(proj)(text_latent)

    def _check_text(self, input_ids: Tensor, attention_mask: Tensor | None) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int32):
            raise ValueError(
                f"input_ids must be an integer tensor (batch, seq), got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        if input_ids.numel():
            low, high = torch.stack([input_ids.min(), input_ids.max()]).tolist()  # one host sync
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, {self.config.vocab_size}) (model.vocab_size), got range "
                    f"[{low}, {high}]: the tokenizer and the model config disagree"
                )
