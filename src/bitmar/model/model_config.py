"""Typed configuration of the BitMar network.

Kept free of any dependency but the standard library: the Hugging Face export copies this file
verbatim next to the modeling code, so the exported model can be rebuilt without the `bitmar` package.
"""

from __future__ import annotations

from dataclasses import dataclass

# Architecture presets for `text_encoder` / `text_decoder`. BabyLM rules: models are trained from
# scratch, so a preset names a shape (layers, heads), never a pretrained checkpoint to download.
ARCHITECTURE_PRESETS: dict[str, dict[str, int]] = {
    "bitnet-tiny": {"num_layers": 2, "num_heads": 4},
    "bitnet-small": {"num_layers": 4, "num_heads": 8},
    "bitnet-base": {"num_layers": 6, "num_heads": 12},
    "bitnet-large": {"num_layers": 12, "num_heads": 12},
}


@dataclass
class ModelConfig:
    """Shape and behaviour of the BitMar network (see docs/configuration.md)."""

    text_encoder: str = "bitnet-small"  # preset for the bidirectional text encoder
    text_decoder: str = "bitnet-base"  # preset for the causal decoder
    vocab_size: int = 16384  # overwritten with the trained tokenizer's size at run time
    hidden_size: int = 768  # C: width of every transformer stream
    max_seq_len: int = 128  # longest text in tokens: text blocks and captions must fit (prefix tokens come on top)
    mlp_ratio: float = 4.0
    gqa_group_size: int = 4  # query heads per key/value head (grouped-query attention, as BitNet b1.58 2B4T); 1 = MHA
    dropout: float = 0.0
    text_latent_size: int = 768  # pooled text latent z_t
    vision_encoder_dim: int = 768  # width of the DINOv2 input features
    vision_latent_size: int = 768  # pooled vision latent z_v
    vision_num_tokens: int = 8  # a global DINOv2 vector is expanded into this many vision tokens
    vision_layers: int = 2  # BitNet transformer layers over the vision tokens
    vision_quantization: bool = True  # False: full-precision twin of the vision encoder (ablation)
    fusion_layers: int = 1  # cross-attention layers (text tokens attend to vision tokens)
    # Vision copy path: each decoder position points at the vision tokens (learned attention) and adds the gated log of
    # the pointed tokens' word distributions (read through the tied LM head) to its logits
    # (BitMar.vision_copy_log_probs).
    # False here so that checkpoints and exports made before it existed (no pointer weights) load as they were; both
    # shipped configs turn it on.
    vision_copy: bool = False
    memory_size: int = 512  # K: episodic memory slots
    episode_dim: int = 768  # latent width written into memory
    memory_alpha: float = 1.0  # write strength of the persistent store (EpisodicStore alpha; 1.0 = exact one-shot)
    memory_readout_tokens: int = 1  # decoder prefix tokens made from each episode token of the readout
    # An episode is `episode_tokens` vectors of episode_dim, flattened into one memory row: token 0 is the pooled
    # multimodal latent z_m, tokens 1.. are the fused caption token states (BOS first), so an episode can carry the
    # exact words of its caption (new words included). 1 = the single pooled latent.
    episode_tokens: int = 1
    memory_key_dim: int | None = None  # width of episode keys and of the prior M0 (None: the memory width)
    # What a key is computed from: "latent" = the pooled vision latent z_v, "features" = the DINOv2 input vector
    # itself (a wider, frozen key space: more episodes stay separable than z_v's width allows).
    memory_key_input: str = "latent"
    addressing_noise_std: float = 0.1  # Larimar addressing noise, training only
    use_memory: bool = True  # False: ablation without episodic memory
    use_vision: bool = True  # False: ablation without vision input
    quantize: bool = True  # False: every BitLinear becomes nn.Linear (full-precision ablation / baseline)
    tie_embeddings: bool = True  # LM head shares the (full-precision) token embedding

    @property
    def memory_width(self) -> int:
        """Width of one memory row: episode_tokens x episode_dim."""
        return self.episode_tokens * self.episode_dim

    @property
    def memory_key_width(self) -> int:
        return self.memory_width if self.memory_key_dim is None else self.memory_key_dim

    @property
    def exact_recall_bound(self) -> int:
        """Most episodes that one write recalls exactly: min(K, key width) (the rank of the addressing)."""
        return min(self.memory_size, self.memory_key_width)

    @property
    def memory_prefix_tokens(self) -> int:
        """Decoder prefix tokens made from one memory readout."""
        return self.episode_tokens * self.memory_readout_tokens

    def preset(self, name: str) -> dict[str, int]:
        if name not in ARCHITECTURE_PRESETS:
            raise ValueError(f"unknown architecture preset {name!r}; choose one of {sorted(ARCHITECTURE_PRESETS)}")
        return ARCHITECTURE_PRESETS[name]

    @property
    def encoder_layers(self) -> int:
        return self.preset(self.text_encoder)["num_layers"]

    @property
    def decoder_layers(self) -> int:
        return self.preset(self.text_decoder)["num_layers"]

    @property
    def encoder_heads(self) -> int:
        return self.preset(self.text_encoder)["num_heads"]

    @property
    def decoder_heads(self) -> int:
        return self.preset(self.text_decoder)["num_heads"]
