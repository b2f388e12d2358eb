"""Fast mapping: pseudo-word pools, the phase-3 caption augmentation, and multi-token episodes with a copy path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bitmar.config import ConfigError, load_config
from bitmar.data.pseudowords import (
    COMMON_NOUNS,
    PseudoWordAugmenter,
    augment_episode_ids,
    default_noun_forms,
    plural_of,
    pseudo_word_pool,
    sample_world_noun_forms,
    split_of,
)
from bitmar.data.sample import NOUNS, held_out_pseudo_words
from bitmar.model import BitMar
from bitmar.model.model_config import ModelConfig

TINY = Path(__file__).resolve().parents[1] / "configs" / "bitmar_tiny.yaml"


def test_pools_are_disjoint_for_any_size_and_seed() -> None:
    train = set(pseudo_word_pool("train", 3000, seed=0)) | set(pseudo_word_pool("train", 500, seed=7))
    held_out = set(pseudo_word_pool("eval", 600, seed=0)) | set(pseudo_word_pool("eval", 100, seed=3))
    assert not train & held_out
    assert all(split_of(w) == "train" for w in train) and all(split_of(w) == "eval" for w in held_out)


def test_pool_is_deterministic_distinct_and_pronounceable() -> None:
    a, b = pseudo_word_pool("train", 200, seed=1), pseudo_word_pool("train", 200, seed=1)
    assert a == b and len(set(a)) == 200
    assert all(4 <= len(w) <= 10 and w.isalpha() and w.islower() for w in a)
    assert all(any(v in w for v in "aeiou") for w in a)
    assert pseudo_word_pool("train", 200, seed=2) != a


def test_pool_excludes_known_words_and_rejects_bad_arguments() -> None:
    words = pseudo_word_pool("train", 2000, seed=0, exclude=["slestu"])
    assert "slestu" not in words
    assert not set(words) & (set(COMMON_NOUNS) | set(COMMON_NOUNS.values()))
    with pytest.raises(ValueError, match="split"):
        pseudo_word_pool("test", 3)
    with pytest.raises(ValueError, match="size"):
        pseudo_word_pool("train", -1)


def test_sample_world_held_out_words_come_from_the_eval_pool() -> None:
    words = held_out_pseudo_words(64, seed=0)
    assert len(set(words)) == 64 and all(split_of(w) == "eval" for w in words)
    assert not set(words) & (set(NOUNS) | set(NOUNS.values()))


def test_augmentation_renames_one_noun_consistently() -> None:
    aug = PseudoWordAugmenter(["blicket"], sample_world_noun_forms())
    rng = np.random.default_rng(0)
    out = aug.augment("a red dog next to two dogs", rng)
    assert out.word == "blicket" and out.replaced == "dog"
    assert out.text == "a red blicket next to two blickets"
    nothing = aug.augment("zzz qqq", rng)
    assert nothing.word is None and nothing.text == "zzz qqq"


def test_augmentation_works_on_cc3m_style_captions() -> None:
    aug = PseudoWordAugmenter(["tomaki"], default_noun_forms())
    out = aug.augment("a man riding a horse on the beach", np.random.default_rng(3))
    assert out.word == "tomaki" and out.replaced in {"man", "horse", "beach"}
    assert out.text.count("tomaki") == 1 and out.replaced not in out.text.split()
    assert plural_of("dax") == "daxes" and plural_of("toma") == "tomas"


class _ToyTokenizer:
    """Character-level stand-in with the PreTrainedTokenizerFast calls the augmentation uses."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self) -> None:
        class _Enc:
            def __init__(self, ids: list[int]) -> None:
                self.ids = ids

        class _Backend:
            def encode_batch_fast(self, texts: list[str], add_special_tokens: bool = False) -> list[_Enc]:
                return [_Enc([3 + ord(c) - 32 for c in t]) for t in texts]

        self.backend_tokenizer = _Backend()

    def batch_decode(self, rows: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        lut = {3 + ord(c) - 32: c for c in "abcdefghijklmnopqrstuvwxyz "}
        return ["".join(lut[i] for i in r if i > 2) for r in rows]


def test_augment_episode_ids_reencodes_and_pads() -> None:
    tok = _ToyTokenizer()
    texts = ["a dog", "two cats on a box"]
    seqs = [[1, *tok.backend_tokenizer.encode_batch_fast([t])[0].ids, 2] for t in texts]
    ids = torch.zeros(2, max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    aug = PseudoWordAugmenter(["zib"], sample_world_noun_forms())
    new_ids, new_mask, renamed = augment_episode_ids(tok, aug, ids, mask, 1.0, np.random.default_rng(0), max_len=64)
    assert renamed == 2
    decoded = tok.batch_decode([r[m.bool()].tolist() for r, m in zip(new_ids, new_mask, strict=True)])
    assert decoded[0] == "a zib" and "zib" in decoded[1]
    assert int(new_ids[0, 0]) == 1 and int(new_ids[0, int(new_mask[0].sum()) - 1]) == 2  # BOS ... EOS
    same, _, none = augment_episode_ids(tok, aug, ids, mask, 0.0, np.random.default_rng(0), max_len=64)
    assert none == 0 and torch.equal(same[:, : ids.shape[1]], ids)


def _episode_model(episode_tokens: int = 6) -> BitMar:
    torch.manual_seed(0)
    cfg = ModelConfig(
        text_encoder="bitnet-tiny", text_decoder="bitnet-tiny", vocab_size=64, hidden_size=32, max_seq_len=32,
        text_latent_size=32, vision_latent_size=32, vision_encoder_dim=16, vision_num_tokens=2, vision_layers=1,
        memory_size=8, episode_dim=32, episode_tokens=episode_tokens,
    )  # fmt: skip
    return BitMar(cfg).eval()


def test_episode_is_pooled_latent_plus_caption_slots() -> None:
    model = _episode_model()
    ids = torch.randint(3, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    value = model.episode_latent(ids, mask, torch.randn(3, 16))
    assert value.shape == (3, 6 * 32) and model.config.memory_width == 6 * 32
    slots = value.view(3, 6, 32)
    assert torch.all(slots[0, 5:] == 0)  # slots past a caption's end are empty
    assert not torch.all(slots[1, 5] == 0)
    # a write/read round trip returns the slots exactly (N <= K)
    keys = model.memory_key(torch.randn(3, 16))
    readout, _ = model.read_memory(model.write_memory(keys, value), key=keys)
    torch.testing.assert_close(readout, value, rtol=1e-4, atol=1e-4)


def test_copy_path_adds_the_aligned_slot_to_the_logits() -> None:
    model = _episode_model()
    ids = torch.randint(3, 64, (2, 7))
    readout = torch.randn(2, model.config.memory_width)
    plain = model(ids, memory_readout=torch.zeros_like(readout), return_latents=False)
    out = model(ids, memory_readout=readout, return_latents=False)
    slots = model.slot_log_probs(readout)  # (2, 5, V)
    copy = model.copy_log_probs(readout, torch.arange(7).expand(2, 7))
    assert torch.equal(copy[:, 0], slots[:, 1]) and torch.equal(copy[:, 3], slots[:, 4])
    assert torch.all(copy[:, 4:] == 0)  # text index 4 predicts position 5: no slot holds it
    assert out.logits.shape == plain.logits.shape == (2, 7, 64)
    assert not torch.allclose(out.logits[:, :4], plain.logits[:, :4])


def test_generation_uses_the_copy_path_like_forward() -> None:
    model = _episode_model()
    readout = torch.randn(2, model.config.memory_width) * 5
    generated = model.generate(memory_readout=readout, max_new_tokens=5, bos_token_id=1, use_cache=True)
    recomputed = model.generate(memory_readout=readout, max_new_tokens=5, bos_token_id=1, use_cache=False)
    assert torch.equal(generated, recomputed)
    seq = torch.cat([torch.ones(2, 1, dtype=torch.long), generated], dim=1)
    logits = model(seq, memory_readout=readout, return_latents=False).logits
    assert torch.equal(logits[:, :-1].argmax(-1), generated)  # greedy = argmax of the teacher-forced logits


def test_single_latent_episodes_are_unchanged() -> None:
    model = _episode_model(episode_tokens=1)
    assert model.slot_log_scale is None and model.slot_log_probs(torch.randn(1, 32)) is None
    value = model.episode_latent(torch.randint(3, 64, (2, 5)), None, torch.randn(2, 16))
    assert value.shape == (2, 32)


def test_config_checks_episode_settings() -> None:
    with pytest.raises(ConfigError, match="episode_dim"):
        load_config(TINY, ["model.episode_dim=64"])
    with pytest.raises(ConfigError, match="probability"):
        load_config(TINY, ["data.pseudo_words.probability=1.5"])
    with pytest.raises(ConfigError, match="episode_tokens"):
        load_config(TINY, ["model.episode_tokens=0"])
