"""The minimal BitMar shape shared by the model tests (every path enabled, seconds to run)."""

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

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
    vision_copy=True,
    fusion_layers=1,
    memory_size=16,
    episode_dim=24,
    memory_readout_tokens=2,
    gqa_group_size=2,
)


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over `words` (the first four: <pad>, <s>, </s>, <unk>) that prepends BOS, like
    BitMar's: for scoring tests with hand-made models."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
