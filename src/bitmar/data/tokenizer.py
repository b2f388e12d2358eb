"""Byte-level BPE tokenizer trained from scratch on the BabyLM training text (BabyLM rules: nothing pretrained).

Special tokens: `<pad>` (id 0), `<s>` (BOS, id 1), `</s>` (EOS, id 2), `<unk>` (id 3). The post-processor prepends
BOS (`<s> $A`), so `tokenizer(text)["input_ids"]` starts with BOS, exactly what the BabyLM evaluation pipeline feeds a
causal LM. Image captions are trained as BOS + tokens + EOS (`encode_caption`).

The tokenizer is saved with `PreTrainedTokenizerFast.save_pretrained` into a directory (`tokenizer.json` +
`tokenizer_config.json`) and loads back as a `transformers.PreTrainedTokenizerFast` (`load_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from bitmar import fileio
from bitmar.data.errors import DataError

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0..3 in this order
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,  # decode(encode(x)) == x, " ." stays " ."
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it into `out_dir` (atomically: a tmp dir renamed into place).

    The vocabulary holds at most `vocab_size` entries; a small corpus may yield fewer merges (len(tokenizer) tells).
    """
    if vocab_size < _MIN_VOCAB:
        raise DataError(f"data.vocab_size={vocab_size} is too small for a byte-level BPE; use at least {_MIN_VOCAB}")
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    hf = _wrap(tok)
    save_tokenizer(hf, out_dir)
    return hf


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | os.PathLike) -> None:
    """`save_pretrained` into a temporary sibling directory, then swap it into place (`fileio.atomic_directory`)."""
    with fileio.atomic_directory(out_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))
        config_path = tmp / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        # A class name every transformers version knows (5.x writes its internal backend name).
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def load_tokenizer(path_or_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by `train_tokenizer`: a directory or its `tokenizer.json`."""
    path = Path(path_or_dir)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(
            f"tokenizer file {file} does not exist; point data.tokenizer_path at a tokenizer.json written by a "
            "BitMar run, or leave it unset to train one on the first run"
        )
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust library raises a plain Exception for any parse error
        raise DataError(
            f"tokenizer file {file} is corrupt or not a `tokenizers` JSON file ({err}); delete it to retrain"
        ) from err
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise DataError(f"tokenizer {file} lacks the special tokens {missing}; delete it to retrain a BitMar tokenizer")
    hf = _wrap(tok)
    probe = hf("a")["input_ids"]
    if not probe or probe[0] != hf.bos_token_id:
        raise DataError(f"tokenizer {file} does not prepend {BOS_TOKEN}; delete it to retrain a BitMar tokenizer")
    return hf


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of the full tokenizer definition (vocab, merges, normalization, post-processor)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def encode_caption(tokenizer: PreTrainedTokenizerFast, caption: str) -> list[int]:
    """BOS + tokens + EOS (the post-processor adds BOS)."""
    return [*tokenizer(caption)["input_ids"], tokenizer.eos_token_id]


def encode_batch(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """BOS + tokens + EOS for each text, through the Rust batch encoder (several times faster than __call__)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return [[bos, *e.ids, eos] for e in encodings]
