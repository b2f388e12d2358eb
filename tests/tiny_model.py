"""The minimal BitMar shape shared by the model tests (every path enabled, seconds to run)."""

from bitmar.model.model_config import ModelConfig

TINY_MODEL = ModelConfig(
    text_encoder="bitnet-tiny",
    text_decoder="bitnet-tiny",
    vocab_size=97,
    hidden_size=32,
    text_latent_size=24,
    vision_encoder_dim=20,
    vision_latent_size=24,
    vision_num_tokens=3,
    vision_layers=1,
    fusion_layers=1,
    memory_size=16,
    episode_dim=24,
    memory_readout_tokens=2,
    gqa_group_size=2,
)
