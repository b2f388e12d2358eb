"""What every evaluation task receives (`EvalContext`) and the shared pieces: eval-file readers, the validation
caption split, tokenization, batched log-likelihood scoring and greedy decoding.

Scoring convention (the same as `bitmar.export.hf_export.score_sentences` and BabyLM's causal backend): the score of
a token sequence is the summed float32 log-probability of every real token after BOS, each given its prefix
(`bitmar.training.losses.sequence_log_probs`). Sentences (BLiMP) are scored as the tokenizer returns them: BOS +
tokens, no EOS. Captions are scored as the model was trained on them: BOS + tokens + EOS (`encode_batch`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bitmar.config import BitMarConfig
from bitmar.data.datasets import SPLIT_SEED, open_caption_store, split_indices
from bitmar.data.errors import DataError
from bitmar.data.features import open_feature_file
from bitmar.data.tokenizer import encode_batch
from bitmar.training.losses import sequence_log_probs

EVAL_SEED = 0  # fixed choice of evaluation subsets: every run of the suite scores the same items


class EvaluationError(ValueError):
    """A problem the user can fix (missing or malformed evaluation data, bad arguments); the message says how."""


class TaskSkipped(Exception):
    """A task cannot run for this model or data (e.g. no vision encoder, no eval file); the message says why.

    `missing_data` marks a missing evaluation file: an error when the user asked for the task explicitly."""

    def __init__(self, message: str, missing_data: bool = False) -> None:
        super().__init__(message)
        self.missing_data = missing_data


# ----------------------------------------------------------------------------------------------------------------
# Evaluation files
# ----------------------------------------------------------------------------------------------------------------


def read_jsonl(path: Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a missing file raises TaskSkipped, a malformed line EvaluationError."""
    if not path.is_file():
        raise TaskSkipped(f"{path} does not exist (the sample world writes it: download_babylm_data.py --test)", True)
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvaluationError(
                    f"{path}:{line_no} is not valid JSON ({err.msg}); fix or regenerate the file"
                ) from None
            if not isinstance(record, dict):
                raise EvaluationError(f"{path}:{line_no} holds {type(record).__name__}, expected a JSON object")
            missing = [k for k in required if k not in record]
            if missing:
                raise EvaluationError(f"{path}:{line_no} lacks the keys {missing} (required: {list(required)})")
            records.append(record)
    if not records:
        raise EvaluationError(f"{path} holds no records")
    return records


def read_features(path: Path, feature_dim: int, rows_needed: int) -> np.ndarray:
    """(N, D) float32 features of an eval set; checks that every referenced row exists."""
    if not path.is_file():
        raise TaskSkipped(f"{path} does not exist (the sample world writes it: download_babylm_data.py --test)", True)
    try:
        array = open_feature_file(path, feature_dim)
    except DataError as err:
        raise EvaluationError(str(err)) from None
    if array.shape[0] < rows_needed:
        raise EvaluationError(
            f"{path} has {array.shape[0]} rows but the eval records reference row {rows_needed - 1}; "
            "regenerate the eval set (download_babylm_data.py --test)"
        )
    features = np.asarray(array, dtype=np.float32)
    if not np.isfinite(features).all():
        raise EvaluationError(f"{path} holds NaN/inf feature rows; regenerate it")
    return features


# ----------------------------------------------------------------------------------------------------------------
# Validation captions
# ----------------------------------------------------------------------------------------------------------------


class CaptionSplit:
    """The caption VALIDATION split (store indices), with captions and float32 features by position."""

    def __init__(self, store: Any, indices: np.ndarray) -> None:
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)

    @classmethod
    def from_dataset(cls, dataset: Any) -> CaptionSplit:
        """From the trainer's `BabyLMData.caption_val` (an ImageCaptionDataset: `.store`, `.indices`)."""
        return cls(dataset.store, dataset.indices)

    @classmethod
    def from_data_dir(cls, cfg: BitMarConfig, data_dir: Path) -> CaptionSplit:
        """The same store and split as `build_data`: same sources, row filter and `split_indices(..., SPLIT_SEED)`."""
        d = cfg.data
        if not (d.use_cc3m or d.use_local_narratives):
            raise TaskSkipped("the run used no caption data (data.use_cc3m and data.use_local_narratives are false)")
        try:
            store = open_caption_store(cfg, data_dir)
        except DataError as err:
            raise EvaluationError(f"{err} (evaluation reads the captions of data_dir={data_dir})") from None
        _, val = split_indices(len(store), d.validation_fraction, SPLIT_SEED)
        return cls(store, val)

    def __len__(self) -> int:
        return int(self.indices.size)

    def captions(self, positions: np.ndarray) -> list[str]:
        return [self.store.caption(int(self.indices[p])) for p in positions]

    def features(self, positions: np.ndarray) -> np.ndarray:  # (B, D) float32
        return np.asarray(self.store.feature_batch(self.indices[np.asarray(positions, dtype=np.int64)]), np.float32)

    def subset(self, n: int) -> np.ndarray:
        """Up to n positions with pairwise distinct captions, in a fixed random order (EVAL_SEED).

        Distinct captions keep retrieval well posed: two gallery items with the same text are indistinguishable."""
        order = np.random.default_rng(EVAL_SEED).permutation(len(self))
        seen: set[str] = set()
        chosen = []
        for pos in order:
            text = " ".join(self.store.caption(int(self.indices[pos])).lower().split())
            if text in seen:
                continue
            seen.add(text)
            chosen.append(int(pos))
            if len(chosen) == n:
                break
        return np.asarray(chosen, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Context
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvalContext:
    model: nn.Module  # BitMar in eval mode
    tokenizer: Any  # PreTrainedTokenizerFast (BOS prepended)
    cfg: BitMarConfig
    data_dir: Path
    device: torch.device
    caption_split: CaptionSplit | None = None  # the trainer passes its validation split; else built lazily
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def ecfg(self) -> Any:
        return self.cfg.evaluation

    @property
    def max_len(self) -> int:
        """Longest token sequence fed to the model: the training caption length, within the model's window."""
        return min(self.cfg.data.max_caption_length, self.cfg.model.max_seq_len)

    @property
    def has_vision(self) -> bool:
        return bool(self.cfg.model.use_vision)

    @property
    def has_memory(self) -> bool:
        return bool(self.cfg.model.use_memory)

    def support_memory(self) -> Any:
        """The support memory of memory-at-inference evaluation (cached), or None when off / no memory.

        `evaluation.memory_support_episodes` TRAINING episodes (the first ones of the training split: never an
        evaluation item) are written once: key = memory_key(picture), value = episode_latent(caption, picture)."""
        if "support_memory" in self._cache:
            return self._cache["support_memory"]
        state = None
        want = self.ecfg.memory_support_episodes
        if self.has_memory and self.has_vision and want != 0:
            n = self.cfg.model.memory_size if want == -1 else min(want, self.cfg.model.memory_size)
            store = self.captions().store
            train, _ = split_indices(len(store), self.cfg.data.validation_fraction, SPLIT_SEED)
            rows = train[:n]
            support = CaptionSplit(store, rows)
            positions = np.arange(len(rows))
            seqs = caption_token_ids(self.tokenizer, support.captions(positions), self.max_len)
            features = self.tensor(support.features(positions))
            keys, values = [], []
            for s in range(0, len(rows), self.ecfg.batch_size):
                ids, mask = pad_sequences(seqs[s : s + self.ecfg.batch_size], self.tokenizer.pad_token_id)
                f = features[s : s + self.ecfg.batch_size]
                keys.append(self.model.memory_key(f).float())
                values.append(self.model.episode_latent(ids.to(self.device), mask.to(self.device), f).float())
            state = self.model.write_memory(torch.cat(keys), torch.cat(values))
            self._cache["support_episodes"] = len(rows)
        self._cache["support_memory"] = state
        return state

    def memory_readout(self, vision_features: Tensor) -> Tensor | None:
        """Readout (N, R * E) of the support memory for each picture, or None when memory is off."""
        state = self.support_memory()
        if state is None:
            return None
        out = []
        for s in range(0, vision_features.shape[0], self.ecfg.batch_size):
            readout, _ = self.model.read_memory(state, vision_features=vision_features[s : s + self.ecfg.batch_size])
            out.append(readout)
        return torch.cat(out)

    def captions(self) -> CaptionSplit:
        if self.caption_split is None:
            self.caption_split = CaptionSplit.from_data_dir(self.cfg, self.data_dir)
        if len(self.caption_split) == 0:
            raise TaskSkipped("the caption validation split is empty (data.validation_fraction is 0)")
        return self.caption_split

    def eval_path(self, relative: str) -> Path:
        return self.data_dir / relative

    def tensor(self, array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)


# ----------------------------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------------------------


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad: ids (B, T) long, mask (B, T) long."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for b, seq in enumerate(seqs):
        ids[b, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[b, : len(seq)] = 1
    return ids, mask


def caption_token_ids(tokenizer: Any, captions: Sequence[str], max_len: int) -> list[list[int]]:
    """BOS + tokens + EOS per caption (training format), cut to max_len (a cut caption loses its EOS, as training)."""
    return [seq[:max_len] for seq in encode_batch(tokenizer, list(captions))]


def sentence_token_ids(tokenizer: Any, sentences: Sequence[str]) -> list[list[int]]:
    """BOS + tokens (what the tokenizer returns; no EOS), the BabyLM minimal-pair format."""
    ids = tokenizer(list(sentences))["input_ids"]
    bos = tokenizer.bos_token_id
    for seq, text in zip(ids, sentences, strict=True):
        if not seq or seq[0] != bos:
            raise EvaluationError(f"the tokenizer does not prepend BOS (sentence {text!r}); use the run's tokenizer")
    return ids


def decode_generated(tokenizer: Any, tokens: Tensor) -> list[str]:
    """Generated ids (B, S) -> text per row, cut at the first EOS, special tokens dropped."""
    eos = tokenizer.eos_token_id
    texts = []
    for row in tokens.tolist():
        if eos in row:
            row = row[: row.index(eos)]
        texts.append(" ".join(tokenizer.decode(row, skip_special_tokens=True).split()))
    return texts


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


# ----------------------------------------------------------------------------------------------------------------
# Scoring and decoding
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def score_sequences(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    vision_features: Tensor | None = None,  # (N, D), row i conditions sequence i
    memory_readout: Tensor | None = None,  # (N, E)
    score_from: Sequence[int] | None = None,  # per sequence: first position whose token is scored (default 1)
) -> tuple[Tensor, Tensor]:
    """Summed log-probability (float32, (N,)) of each sequence's tokens from `score_from` on, and their counts (N,).

    Calls `model(input_ids=, attention_mask=, vision_features=, memory_readout=, return_latents=False).logits`, so
    any object with that interface (e.g. a stub with fixed logits) can be scored."""
    totals, counts = [], []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids, mask = pad_sequences(chunk, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        target = mask.clone()  # (B, T): which tokens count
        if score_from is not None:
            first = torch.as_tensor(list(score_from[start : start + batch_size]), device=device)  # (B,)
            target &= (torch.arange(ids.shape[1], device=device)[None, :] >= first[:, None]).long()
        vf = None if vision_features is None else vision_features[start : start + batch_size]
        mr = None if memory_readout is None else memory_readout[start : start + batch_size]
        logits = model(input_ids=ids, attention_mask=mask, vision_features=vf, memory_readout=mr, return_latents=False)
        logits = logits.logits  # (B, T, V)
        totals.append(sequence_log_probs(logits, ids, target).float().cpu())
        counts.append(target[:, 1:].sum(dim=1).cpu())
    if not totals:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(totals), torch.cat(counts)


@torch.no_grad()
def token_log_probs(
    ctx: EvalContext, seqs: Sequence[Sequence[int]], vision_features: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """log p of every token after BOS given its prefix (N, T - 1) float32 (0 at padding), the tokens (N, T - 1) and
    which are real (N, T - 1) bool; T is the longest sequence."""
    longest = max(len(seq) for seq in seqs)
    out = []
    for start in range(0, len(seqs), ctx.ecfg.batch_size):
        ids, mask = pad_sequences(seqs[start : start + ctx.ecfg.batch_size], ctx.tokenizer.pad_token_id)
        ids = torch.nn.functional.pad(ids, (0, longest - ids.shape[1]), value=ctx.tokenizer.pad_token_id)
        mask = torch.nn.functional.pad(mask, (0, longest - mask.shape[1]))
        ids, mask = ids.to(ctx.device), mask.to(ctx.device)
        vf = None if vision_features is None else vision_features[start : start + ctx.ecfg.batch_size]
        logits = ctx.model(input_ids=ids, attention_mask=mask, vision_features=vf, return_latents=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T - 1)
        valid = mask[:, 1:].bool()
        out.append((logp.masked_fill(~valid, 0.0).cpu(), ids[:, 1:].cpu(), valid.cpu()))
    return tuple(torch.cat(parts) for parts in zip(*out, strict=True))  # type: ignore[return-value]


@torch.no_grad()
def teacher_forced_accuracy(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    vision_features: Tensor | None = None,
    memory_readout: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per sequence: tokens after BOS whose greedy prediction given the true prefix is right (N,), and counts (N,)."""
    hits, counts = [], []
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_sequences(seqs[start : start + batch_size], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        vf = None if vision_features is None else vision_features[start : start + batch_size]
        mr = None if memory_readout is None else memory_readout[start : start + batch_size]
        logits = model(input_ids=ids, attention_mask=mask, vision_features=vf, memory_readout=mr, return_latents=False)
        pred = logits.logits[:, :-1].argmax(dim=-1)  # (B, T-1)
        valid = mask[:, 1:].bool()
        hits.append(((pred == ids[:, 1:]) & valid).sum(dim=1).cpu())
        counts.append(valid.sum(dim=1).cpu())
    return torch.cat(hits), torch.cat(counts)


@torch.no_grad()
def greedy_captions(
    ctx: EvalContext,
    n: int,
    *,
    vision_features: Tensor | None = None,  # (n, D)
    memory_readout: Tensor | None = None,  # (n, E)
    max_new_tokens: int | None = None,
) -> list[str]:
    """Greedy decoding from BOS (conditioned on what is given; nothing = the unconditional LM), one text per row."""
    tok = ctx.tokenizer
    steps = max_new_tokens or ctx.ecfg.caption_max_new_tokens
    texts: list[str] = []
    bs = ctx.ecfg.batch_size
    for start in range(0, n, bs):
        stop = min(n, start + bs)
        prompt = torch.full((stop - start, 1), tok.bos_token_id, dtype=torch.long, device=ctx.device)
        out = ctx.model.generate(
            input_ids=prompt,
            vision_features=None if vision_features is None else vision_features[start:stop],
            memory_readout=None if memory_readout is None else memory_readout[start:stop],
            max_new_tokens=steps,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        texts.extend(decode_generated(tok, out))
    return texts


def batched(fn: Any, inputs: Tensor, batch_size: int) -> Tensor:
    """Apply fn to row chunks of `inputs` and concatenate (keeps memory flat for big galleries)."""
    return torch.cat([fn(inputs[i : i + batch_size]) for i in range(0, inputs.shape[0], batch_size)])
