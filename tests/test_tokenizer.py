"""Byte-level BPE tokenizer: BOS handling, round trips, save/load, errors, and no validation caption in training."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from bitmar.config import load_config
from bitmar.data import datasets as datasets_module
from bitmar.data import layout
from bitmar.data.errors import DataError
from bitmar.data.sample import generate_sample_dataset
from bitmar.data.tokenizer import encode_batch, encode_caption, load_tokenizer, train_tokenizer

TEXTS = [
    "look at the red ball .",
    "The dogs run in the park.",
    "*CHI:\twhere is the cup ?",
    "a small blue box next to two cats",
] * 50


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(iter(TEXTS), 400, out)
    return out


def test_special_tokens_and_bos(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token] == ["<pad>", "<s>", "</s>", "<unk>"]
    ids = tok("the red ball")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:] and tok.eos_token_id not in ids
    assert len(tok) <= 400
    caption = encode_caption(tok, "the red ball")
    assert caption == [*ids, tok.eos_token_id]
    assert encode_batch(tok, ["the red ball", "two cats"]) == [caption, encode_caption(tok, "two cats")]


@pytest.mark.parametrize(
    "text", ["look at the red ball .", "  two  spaces ", "The dogs run.", "café ☕ naïve", "*CHI:\twhere ?", ""]
)
def test_round_trip(tokenizer_dir: Path, text: str) -> None:
    tok = load_tokenizer(tokenizer_dir)
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.unk_token_id not in ids  # byte level: nothing is unknown


def test_file_and_directory_and_auto_tokenizer_agree(tokenizer_dir: Path) -> None:
    by_dir = load_tokenizer(tokenizer_dir)
    by_file = load_tokenizer(tokenizer_dir / "tokenizer.json")
    auto = AutoTokenizer.from_pretrained(str(tokenizer_dir))  # how the exported model's users load it
    text = "a small blue box next to two cats"
    assert by_dir(text)["input_ids"] == by_file(text)["input_ids"] == auto(text)["input_ids"]
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not [p for p in tokenizer_dir.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_retraining_replaces_the_directory(tmp_path: Path) -> None:
    out = tmp_path / "tokenizer"
    first = train_tokenizer(iter(TEXTS), 300, out)
    second = train_tokenizer(iter(["completely different words here"] * 20), 300, out)
    assert load_tokenizer(out).get_vocab() == second.get_vocab() != first.get_vocab()


def test_load_errors(tmp_path: Path, tokenizer_dir: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nope" / "tokenizer.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "trunc', encoding="utf-8")
    with pytest.raises(DataError, match="corrupt"):
        load_tokenizer(bad)
    # a valid tokenizers file without the BOS post-processor is rejected
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    spec["post_processor"] = None
    no_bos = tmp_path / "no_bos.json"
    no_bos.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(DataError, match="does not prepend <s>"):
        load_tokenizer(no_bos)
    with pytest.raises(DataError, match="vocab_size=100 is too small"):
        train_tokenizer(iter(TEXTS), 100, tmp_path / "small")


def test_build_data_trains_on_training_captions_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    cfg = load_config(
        None,
        [
            f"data.data_dir={data_dir}",
            "data.vocab_size=600",
            "data.validation_fraction=0.2",
            "data.text_block_length=32",
            "data.sample.num_cc3m=60",
            "data.sample.num_local_narratives=10",
            "data.sample.num_text_lines=200",
            "data.sample.num_novel_episodes=4",
        ],
    )
    generate_sample_dataset(data_dir, cfg.data.sample)
    # every caption unique, so "seen by the tokenizer" is decidable caption by caption
    captions = [f"caption number {i} a red ball" for i in range(60)]
    (data_dir / layout.CC3M_CAPTIONS).write_text(json.dumps(captions), encoding="utf-8")
    seen: list[str] = []
    real_train = datasets_module.train_tokenizer

    def spying_train(texts: Iterable[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
        texts = list(texts)
        seen.extend(texts)
        return real_train(iter(texts), vocab_size, out_dir)

    monkeypatch.setattr(datasets_module, "train_tokenizer", spying_train)
    data = datasets_module.build_data(cfg, tmp_path / "run")
    assert data.caption_val is not None and data.caption_train is not None
    val = {data.caption_val.caption(i) for i in range(len(data.caption_val))}
    train = {data.caption_train.caption(i) for i in range(len(data.caption_train))}
    assert len(val) >= 10 and val.isdisjoint(train)
    assert val.isdisjoint(seen)
    assert train <= set(seen)
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    # the second run loads the saved tokenizer instead of training again
    seen.clear()
    again = datasets_module.build_data(cfg, tmp_path / "run")
    assert seen == [] and again.tokenizer.get_vocab() == data.tokenizer.get_vocab()
    # a changed split warns: the old tokenizer may have seen this split's validation captions
    changed = load_config(
        None, [*(f"{k}={v}" for k, v in [("data.data_dir", data_dir)]), "data.validation_fraction=0.3"]
    )
    changed.data.sample = cfg.data.sample
    changed.data.text_block_length = 32
    with pytest.warns(UserWarning, match="validation_fraction"):
        datasets_module.build_data(changed, tmp_path / "run")
