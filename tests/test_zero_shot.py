"""Zero-shot vision-language understanding (issue 17, part 3): what the sample world teaches, what it holds out, the
PMI columns of Winoground / VQA, and the hard-negative (word-swap) binding terms of the objective."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_model import TINY_MODEL, word_tokenizer
from transformers import PreTrainedTokenizerFast

from bitmar.config import BitMarConfig, SampleDataConfig
from bitmar.data import layout, sample
from bitmar.data.sample import (
    COLOURS,
    COUNT_WORDS,
    NOUNS,
    SETTINGS,
    Scene,
    SceneObject,
    normalize_sentence,
    question_answers,
    world_scenes,
)
from bitmar.evaluation.context import (
    CaptionSplit,
    EvalContext,
    caption_token_ids,
    score_sequences,
    token_log_probs,
)
from bitmar.evaluation.retrieval import (
    combined_scores,
    decoder_pmi_scores,
    evaluate_retrieval,
    latents,
    recall_at_k,
)
from bitmar.evaluation.scoring import evaluate_vqa, evaluate_winoground
from bitmar.model import BitMar
from bitmar.training.hard_negatives import WordSwapper, swap_token_classes
from bitmar.training.objective import TrainingObjective, binding_loss, word_order_alignment

WORLD = SampleDataConfig(seed=5, num_cc3m=600, num_local_narratives=40, num_text_lines=300, num_novel_episodes=8)

# ----------------------------------------------------------------------------------------------------------------
# The sample world: question forms in training, evaluation items held out
# ----------------------------------------------------------------------------------------------------------------


def _exchanges(caption: str) -> list[tuple[str, str]]:
    """(question, answer) turns at the start of a training caption: 'q? a. q? a. description'."""
    return re.findall(r"([a-z][a-z ]*\?) ([a-z ,]+)\.", caption)


def test_training_captions_ask_every_vqa_question_form_with_true_answers() -> None:
    scenes, captions = world_scenes(WORLD)["cc3m"]
    forms = {
        "colour": r"^what colou?r (is|are) the \w+\?$",
        "object": r"^what is (next to|on|under|behind|in front of|near) the \w+\?$",
        "count": r"^how many \w+ are there\?$",
        "where": r"^where (is|are) the \w+\?$",
    }
    seen = dict.fromkeys(forms, 0)
    with_qa = 0
    for scene, caption in zip(scenes, captions, strict=True):
        turns = _exchanges(caption)
        with_qa += bool(turns)
        truth = {(q, a) for _, q, short, sentence in question_answers(scene) for a in (short, sentence)}
        for question, answer in turns:
            assert (question, answer) in truth, (caption, question, answer)  # grounded in THIS picture
            for kind, pattern in forms.items():
                seen[kind] += bool(re.match(pattern, question))
    assert 0.25 < with_qa / len(captions) < 0.45  # a minority: most captions stay plain descriptions
    assert min(seen.values()) >= 15, seen
    # one-word answers (the VQA form) as well as sentences
    answers = [a for c in captions for _, a in _exchanges(c)]
    assert sum(a in COLOURS for a in answers) >= 10 and sum(a in SETTINGS for a in answers) >= 5
    assert sum(a in COUNT_WORDS for a in answers) >= 5 and sum(" " in a for a in answers) >= 50


def test_question_answers_are_true_of_the_scene_and_yes_no_come_in_true_false_pairs() -> None:
    scene = Scene((SceneObject("ball", "red", None, 2), SceneObject("box", None, None)), "on", "park")
    qa = {(kind, q): (short, sentence) for kind, q, short, sentence in question_answers(scene)}
    assert qa[("colour", "what color are the balls?")] == ("red", "they are red")
    assert qa[("count", "how many balls are there?")] == ("two", "there are two balls")
    assert qa[("count", "how many boxes are there?")] == ("one", "there is one box")
    assert qa[("object", "what is on the box?")] == ("balls", "two red balls")
    where = [(short, sentence) for _, q, short, sentence in question_answers(scene) if q == "where are the balls?"]
    assert where == [("park", "they are in the park"), ("on the box", "they are on the box")]
    yes_no = {q: short for kind, q, short, _ in question_answers(scene) if kind == "yes_no"}
    assert yes_no["are the balls red?"] == "yes" and yes_no["is the box on the balls?"] == "no"
    assert sum(v == "no" for v in yes_no.values()) >= 2 and sum(v == "yes" for v in yes_no.values()) >= 2
    assert not any(q.startswith("what color is the box") for _, q in qa)  # the box has no colour to ask about


def test_training_scenes_include_uncoloured_subjects_like_the_winoground_object_swaps() -> None:
    scenes, captions = world_scenes(WORLD)["cc3m"]
    bare = [c for s, c in zip(scenes, captions, strict=True) if len(s.objects) == 2 and s.objects[0].colour is None
            and s.objects[1].colour is None]  # fmt: skip
    assert len(bare) >= 10
    assert all(not any(w in COLOURS for w in c.split()) for c in bare if "?" not in c)


def test_evaluation_items_are_held_out_of_training(small_world: Path) -> None:
    # the session's world (tests/conftest.py), only read: every generated world holds its evaluation items out
    captions = json.loads((small_world / layout.CC3M_CAPTIONS).read_text(encoding="utf-8"))
    captions += json.loads((small_world / layout.LOCAL_NARR_CAPTIONS).read_text(encoding="utf-8"))
    index = sample.training_text_index(captions)
    wino = [json.loads(line) for line in (small_world / layout.WINOGROUND_FILE).read_text().splitlines()]
    for item in wino:  # not a training caption, nor a run of words inside one
        for key in ("caption_0", "caption_1"):
            assert f" {normalize_sentence(item[key])} " not in index, item[key]
    # the pictures are new: no evaluation feature row is a training row
    train_x = np.concatenate([np.load(small_world / name) for name in layout.CC3M_FEATURES]).astype(np.float32)
    for rel in (sample.WINOGROUND_FEATURES, sample.VQA_FEATURES):
        x = np.load(small_world / rel).astype(np.float32)
        nearest = ((x[:, None, :] - train_x[None, :200, :]) ** 2).sum(-1).min()
        assert nearest > 1.0
    vqa = [json.loads(line) for line in (small_world / layout.VQA_FILE).read_text().splitlines()]
    for q in vqa:  # questions are grammatical: "what color are the balls?"
        noun = q["question"].rstrip("?").split()[-1]
        if q["question_type"] in ("colour", "setting") and noun in NOUNS.values():
            assert " are the " in q["question"], q["question"]


def test_a_winoground_item_that_occurs_in_training_is_redrawn_without_changing_the_others() -> None:
    world = sample.SampleWorld(0, feature_dim=16)
    items, _ = sample.winoground_set(world, np.random.default_rng(7))
    first = items[0]["caption_0"]
    index = sample.training_text_index([f"look at {first} in the park"])
    redrawn, features = sample.winoground_set(world, np.random.default_rng(7), index)
    assert redrawn[0]["caption_0"] != first and first not in (redrawn[0]["caption_1"],)
    assert redrawn[1:] == items[1:]  # the evaluation stream drew the same numbers
    assert features.shape == (2 * len(items), 16)


# ----------------------------------------------------------------------------------------------------------------
# PMI columns on a toy model whose caption prior outweighs the picture
# ----------------------------------------------------------------------------------------------------------------

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "a", "b", "c", "d", "e", "f", "g", "h"]


def _tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS)


class PriorDominatedModel(torch.nn.Module):
    """Next-token distribution given the CURRENT token: a strong prior (the first word is 'a' 70% of the time, after
    the question word 'b' the answer 'c' is likely) plus, at position `picture_at`, a bonus of log 3 for the word the
    picture shows, vision_features[:, 0] (a token id). Without a picture: the prior alone."""

    def __init__(self, picture_at: int) -> None:
        super().__init__()
        self.picture_at = picture_at
        self.unused = torch.nn.Parameter(torch.zeros(1))
        prior = torch.full((len(WORDS), len(WORDS)), math.log(0.05))
        prior[:, :4] = -1e4
        prior[1, 4], prior[1, 5] = math.log(0.7), math.log(0.1)  # after BOS
        prior[5, 6] = math.log(0.5)  # after "b": "c"
        prior[4:, 2] = math.log(0.2)  # EOS
        self.register_buffer("prior", prior)

    def forward(self, input_ids: torch.Tensor, attention_mask=None, vision_features=None, **_: object):  # noqa: ANN001
        logits = self.prior[input_ids].clone()  # (B, T, V)
        if vision_features is not None:
            shown = vision_features[:, 0].long()  # (B,)
            logits[torch.arange(len(shown)), self.picture_at, shown] += math.log(3.0)
        return SimpleNamespace(logits=logits)

    def encode_text(self, input_ids: torch.Tensor, attention_mask=None):  # noqa: ANN001
        """Text latent: the one-hot of the caption's first word (the word after BOS)."""
        return None, torch.nn.functional.one_hot(input_ids[:, 1], len(WORDS)).float()

    def encode_vision(self, vision_features: torch.Tensor):
        """Vision latent: the one-hot of the word the picture shows."""
        return None, torch.nn.functional.one_hot(vision_features[:, 0].long(), len(WORDS)).float()


def _context(tmp_path: Path, picture_at: int) -> EvalContext:
    cfg = BitMarConfig()
    cfg.model.vision_encoder_dim = 2
    cfg.model.use_memory = False  # the toy has no memory (no support-memory rows)
    return EvalContext(PriorDominatedModel(picture_at), _tokenizer(), cfg, tmp_path, torch.device("cpu"))


def test_winoground_pmi_column_removes_the_caption_prior(tmp_path: Path) -> None:
    # image 0 shows "a" (caption "a b"), image 1 shows "b" (caption "b a"); the prior prefers "a ..." either way
    (tmp_path / "eval").mkdir()
    item = {"id": 0, "caption_0": "a b", "caption_1": "b a", "image_0": 0, "image_1": 1, "tag": "object_swap"}
    (tmp_path / layout.WINOGROUND_FILE).write_text(json.dumps(item) + "\n", encoding="utf-8")
    np.save(tmp_path / sample.WINOGROUND_FEATURES, np.array([[4, 0], [5, 0]], dtype=np.float32))
    out = evaluate_winoground(_context(tmp_path, picture_at=0))["metrics"]
    assert (out["text_score"], out["image_score"], out["group_score"]) == (0.0, 1.0, 0.0)  # the reported score
    assert (out["text_score_pmi"], out["image_score_pmi"], out["group_score_pmi"]) == (1.0, 1.0, 1.0)
    # image-text matching cos(z_t, z_v): each caption's latent names its first word, each picture's the word shown
    assert (out["text_score_matching"], out["image_score_matching"], out["group_score_matching"]) == (1.0, 1.0, 1.0)
    assert out["latent_cosine"]["caption_pair"] == 0.0 and out["latent_cosine"]["image_pair"] == 0.0  # orthogonal


def test_vqa_pmi_column_removes_the_answer_prior(tmp_path: Path) -> None:
    (tmp_path / "eval").mkdir()
    rows = [{"id": 0, "question": "b", "answer": "d", "distractors": list("acefgh") + ["b"], "image": 0}]
    (tmp_path / layout.VQA_FILE).write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    np.save(tmp_path / sample.VQA_FEATURES, np.array([[7, 0]], dtype=np.float32))  # the picture shows "d"
    out = evaluate_vqa(_context(tmp_path, picture_at=1))["metrics"]
    assert out["accuracy"] == 0.0 and out["accuracy_no_image"] == 0.0  # "c" (prior 0.5) beats "d" (0.05 * 3)
    assert out["accuracy_pmi"] == 1.0


def test_decoder_pmi_retrieval_removes_the_caption_prior(tmp_path: Path) -> None:
    ctx = _context(tmp_path, picture_at=0)
    captions, features = ["a", "d", "e"], torch.tensor([[4.0, 0.0], [7.0, 0.0], [8.0, 0.0]])  # picture j shows word j
    pmi = decoder_pmi_scores(ctx, captions, features)  # (captions, images)
    seqs = caption_token_ids(ctx.tokenizer, captions, ctx.max_len)
    raw, _ = score_sequences(ctx.model, seqs[1:2] * 3, pad_id=0, batch_size=8, device=ctx.device,
                             vision_features=features)  # fmt: skip
    assert int(raw.argmax()) == 1  # caption "d" is most likely under its own picture ...
    conditional, _ = score_sequences(ctx.model, seqs, pad_id=0, batch_size=8, device=ctx.device,
                                     vision_features=features[1:2].repeat(3, 1))  # fmt: skip
    assert int(conditional.argmax()) == 0  # ... but under picture "d" the prior's "a" outscores it
    assert pmi.argmax(dim=0).tolist() == [0, 1, 2]  # PMI ranks each picture's own caption first
    assert recall_at_k(pmi.T, [1])["R@1"] == 1.0 and recall_at_k(pmi, [1])["R@1"] == 1.0


def test_combined_retrieval_score_corrects_each_experts_own_mistakes() -> None:
    # (captions, images). The contrastive logits put caption 1 first for image 0; the decoder's PMI puts caption 1
    # first for image 2; each is confident where it is right, so the sum ranks every picture's own caption first.
    contrastive = torch.tensor([[3.0, 0.0, 0.0], [3.5, 3.0, 0.0], [0.0, 0.0, 3.0]])
    pmi = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 1.5], [0.0, 0.0, 1.0]])
    assert recall_at_k(contrastive.T, [1])["R@1"] == pytest.approx(2 / 3)
    assert recall_at_k(pmi.T, [1])["R@1"] == pytest.approx(2 / 3)
    assert recall_at_k(combined_scores(contrastive, pmi, 1.0).T, [1])["R@1"] == 1.0
    assert torch.equal(combined_scores(contrastive, pmi, 0.5), contrastive + 0.5 * pmi)
    # weight 0 is the contrastive score alone, even where the decoder cannot produce a caption at all (-inf)
    impossible = torch.full_like(pmi, -math.inf)
    assert torch.equal(combined_scores(contrastive, impossible, 0.0), contrastive)


class _Gallery:
    """A caption store of (caption, picture) pairs: the interface CaptionSplit reads."""

    def __init__(self, captions: list[str], shown: list[int]) -> None:
        self.texts, self.shown = captions, shown

    def __len__(self) -> int:
        return len(self.texts)

    def caption(self, i: int) -> str:
        return self.texts[i]

    def feature_batch(self, rows: np.ndarray) -> np.ndarray:
        return np.array([[self.shown[int(i)], 0.0] for i in rows], dtype=np.float32)


# (captions, images) for the task-level test: cosines with unit-norm caption rows (the vision latents are the identity,
# so cos = these rows), and decoder PMIs. Contrastive alone misses picture 0 (caption 1 scores 0.8 > 0.6) by
# 0.2 / tau = 2.9 logits, where the decoder prefers the right caption by 4 nats; the decoder alone misses picture 2
# (caption 1's 2 nats > 0), where the contrastive score prefers the right caption by 1.0 / tau = 14.3 logits. So the
# sum ranks all three first for decoder weights between 2.9 / 4 and 14.3 / 2, and no expert alone does.
EXPERT_COSINES = torch.tensor([[0.6, 0.0, 0.8], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
EXPERT_PMI = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 2.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize(("weight", "expected_r1"), [(0.0, 2 / 3), (0.1, 2 / 3), (1.0, 1.0), (2.5, 1.0), (10.0, 2 / 3)])
def test_retrieval_headline_is_the_weighted_sum_of_the_experts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weight: float, expected_r1: float
) -> None:
    import bitmar.evaluation.retrieval as retrieval

    ctx = _context(tmp_path, picture_at=0)
    ctx.cfg.evaluation.retrieval_decoder_weight = weight
    ctx.cfg.training.contrastive_temperature = 0.07
    ctx.caption_split = CaptionSplit(_Gallery(["a", "d", "e"], shown=[4, 7, 8]), np.arange(3))
    monkeypatch.setattr(retrieval, "latents", lambda ctx, captions, features: (EXPERT_COSINES, torch.eye(3)))
    monkeypatch.setattr(retrieval, "decoder_pmi_scores", lambda ctx, captions, features: EXPERT_PMI)
    out = evaluate_retrieval(ctx)
    m = out["metrics"]
    assert m["image_to_text"]["R@1"] == pytest.approx(expected_r1)
    assert m["image_to_text_contrastive"]["R@1"] == pytest.approx(2 / 3)
    assert m["image_to_text_decoder_pmi"]["R@1"] == pytest.approx(2 / 3)
    rows = {h["metric"]: h["value"] for h in out["headline"]}
    assert rows["image→text R@1"] == m["image_to_text"]["R@1"]
    assert rows["image→text R@1, contrastive cos (extra)"] == m["image_to_text_contrastive"]["R@1"]
    assert rows["image→text R@1, decoder PMI (extra)"] == m["image_to_text_decoder_pmi"]["R@1"]
    assert m["decoder_weight"] == weight and any(f"{weight:g} x decoder PMI" in n for n in out["notes"])


def test_retrieval_scores_the_gallerys_own_captions_and_pictures(tmp_path: Path) -> None:
    """The task feeds the gallery to the real latents and decoder: its rows equal the experts recomputed here."""
    ctx = _context(tmp_path, picture_at=0)
    store = _Gallery(["a", "d", "a d", "a e"], shown=[4, 7, 7, 8])
    ctx.caption_split = CaptionSplit(store, np.arange(4))
    m = evaluate_retrieval(ctx)["metrics"]
    positions = ctx.caption_split.subset(4)
    captions = ctx.caption_split.captions(positions)
    features = torch.tensor(ctx.caption_split.features(positions))
    t, v = latents(ctx, captions, features)
    sim = torch.nn.functional.normalize(t, dim=-1) @ torch.nn.functional.normalize(v, dim=-1).T
    pmi = decoder_pmi_scores(ctx, captions, features)
    expected = combined_scores(sim / ctx.cfg.training.contrastive_temperature, pmi, 1.0)
    assert m["image_to_text"] == recall_at_k(expected.T, [1]) and m["text_to_image"] == recall_at_k(expected, [1])
    assert m["image_to_text_contrastive"] == recall_at_k(sim.T, [1])
    assert m["text_to_image_decoder_pmi"] == recall_at_k(pmi, [1])


def test_grounding_token_log_probs_add_up_to_the_sequence_scores(tmp_path: Path) -> None:
    ctx = _context(tmp_path, picture_at=0)
    ctx.cfg.evaluation.batch_size = 2  # chunks of different widths are padded to one
    seqs = [[1, 4, 5, 2], [1, 5, 2], [1, 6, 7, 8, 2]]
    vf = torch.tensor([[4.0, 0.0], [5.0, 0.0], [6.0, 0.0]])
    logp, targets, valid = token_log_probs(ctx, seqs, vf)
    assert logp.shape == targets.shape == valid.shape == (3, 4)
    assert valid.sum(1).tolist() == [3, 2, 4] and targets[1, :2].tolist() == [5, 2]
    expected, _ = score_sequences(
        ctx.model, seqs, pad_id=0, batch_size=3, device=torch.device("cpu"), vision_features=vf
    )
    assert logp.sum(1).tolist() == pytest.approx(expected.tolist(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Hard negatives
# ----------------------------------------------------------------------------------------------------------------


def test_word_swapper_exchanges_two_words_of_one_class_everywhere() -> None:
    swapper = WordSwapper([[10, 11, 12], [20, 21]])
    ids = torch.tensor([[1, 10, 20, 5, 11, 2], [1, 10, 5, 10, 2, 0], [1, 20, 7, 21, 20, 2]])
    mask = torch.tensor([[1] * 6, [1] * 5 + [0], [1] * 6])
    neg, has = swapper(ids, mask, torch.Generator().manual_seed(0))
    assert has.tolist() == [True, False, True]
    assert neg[1].tolist() == ids[1].tolist()  # one colour word, twice: nothing to swap
    assert neg[2].tolist() == [1, 21, 7, 20, 21, 2]  # every occurrence swapped
    assert sorted(neg[0].tolist()) == sorted(ids[0].tolist()) and neg[0].tolist() != ids[0].tolist()
    assert ((neg[0] != ids[0]).sum() == 2) and neg[0, 3] == 5  # only the two class words moved


def test_swap_classes_keep_single_token_words_of_the_tokenizer() -> None:
    tok = _tokenizer()
    classes = swap_token_classes(tok, {"letters": ["a", "b", "zz"], "one": ["c"], "pair": ["d", "e"]})
    assert classes == [[4, 5], [7, 8]]  # "zz" is not one token; a class of one word cannot swap


def test_requested_hard_negatives_without_swappable_words_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    from bitmar.config import TrainingConfig
    from bitmar.training.hard_negatives import requested_swap_classes

    training = TrainingConfig()
    assert requested_swap_classes(_tokenizer(), training) is None  # nothing requested: no classes, no message
    training.contrastive_hard_negatives = True
    with caplog.at_level("WARNING", logger="bitmar"):
        assert requested_swap_classes(_tokenizer(), training) == []  # the toy vocabulary has no colour or noun
    assert "no caption gets a negative" in caplog.text


def test_word_order_alignment_sends_early_words_to_early_tokens() -> None:
    is_word = torch.tensor(
        [[False, True, True, False, True, True, False], [True, False, False, False, False, False, False]]
    )
    align = word_order_alignment(is_word, 4)  # (B, N, T)
    assert align.shape == (2, 4, 7) and torch.allclose(align.sum(dim=1), torch.ones(2, 7))
    words = [1, 2, 4, 5]  # positions 1/8, 3/8, 5/8, 7/8 of the caption: the centres of tokens 0, 1, 2, 3
    assert align[0, :, words].argmax(dim=0).tolist() == [0, 1, 2, 3]
    assert align[1, :, 0].argmax() in (1, 2)  # a lone word sits in the middle of its caption
    assert torch.equal(word_order_alignment(is_word, 1), torch.ones(2, 1, 7))


def test_ordered_visual_words_care_which_token_says_what_and_the_bag_does_not() -> None:
    objective, batch = _objective(visual_words=1.0)
    model = objective.model
    table = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    n, c = TINY_MODEL.vision_num_tokens, TINY_MODEL.hidden_size
    tokens = torch.zeros(4, n, c)
    for j, word in ((0, 10), (-1, 20)):  # picture 0: its first token says "10" (logit 10), its last "20"
        tokens[0, j] = 10 * table[word].detach() / table[word].detach().norm() ** 2
    model.encode_vision = lambda features: (tokens, None)
    rows = [[1, 30, 31, 2], [1, 32, 33, 2], [1, 34, 35, 2]]
    in_order = torch.tensor([[1, 10, 20, 2], *rows])  # caption 0 names 10 first, as the tokens do
    reversed_ = torch.tensor([[1, 20, 10, 2], *rows])
    mask = torch.ones_like(in_order)
    ordered = [
        objective._visual_words_loss(ids, mask, batch["vision_features"]).item() for ids in (in_order, reversed_)
    ]
    assert ordered[0] < ordered[1] - 0.1
    objective.training_cfg.visual_words_alignment = "bag"
    bag = [objective._visual_words_loss(ids, mask, batch["vision_features"]).item() for ids in (in_order, reversed_)]
    assert bag[0] == pytest.approx(bag[1])


def test_patch_token_features_pool_whatever_the_alignment() -> None:
    # patch tokens are image regions in raster order: no caption order to align with, so "ordered" pools like "bag"
    objective, batch = _objective(visual_words=1.0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    patches = torch.randn(4, 5, TINY_MODEL.vision_encoder_dim, generator=torch.Generator().manual_seed(3))
    ordered = objective._visual_words_loss(ids, mask, patches).item()
    objective.training_cfg.visual_words_alignment = "bag"
    assert objective._visual_words_loss(ids, mask, patches).item() == ordered


def test_bag_visual_words_are_the_pooled_term_of_before() -> None:
    # the term as it was before visual_words_alignment existed, written out: the mean token predicts every word
    objective, batch = _objective(visual_words=1.0)
    objective.training_cfg.visual_words_alignment = "bag"
    ids, mask, features = batch["input_ids"], batch["attention_mask"], batch["vision_features"]
    tokens, _ = objective.model.encode_vision(features)
    words = mask.bool() & (ids > 2)  # special ids 0, 1, 2
    vocab = torch.unique(ids[words])
    logits = objective.model.lm_logits(tokens.mean(dim=1))[:, vocab].float()  # (B, W)
    column = torch.searchsorted(vocab, ids).clamp(max=vocab.numel() - 1)
    present = torch.zeros_like(logits).scatter_add_(1, column, words.float()) > 0
    idf = torch.log(ids.shape[0] / present.sum(dim=0).clamp(min=1))
    log_probs = torch.log_softmax(logits.masked_fill(~(idf > 0), float("-inf")), dim=-1)
    weight = idf[column] * words
    picked = torch.where(weight > 0, log_probs.gather(1, column), torch.zeros_like(weight))
    expected = -((picked * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1e-6)).mean()
    assert objective._visual_words_loss(ids, mask, features).item() == expected.item()  # bit for bit


def test_binding_loss_ranks_the_caption_above_its_negative() -> None:
    pos = torch.tensor([-3.0, -2.0], requires_grad=True)
    neg = torch.tensor([-3.0, -6.0], requires_grad=True)
    loss = binding_loss(pos, neg)
    assert loss.shape == () and loss.item() == pytest.approx((math.log(2) + math.log1p(math.exp(-4))) / 2)
    loss.backward()
    assert pos.grad[0] < 0 < neg.grad[0] and abs(pos.grad[1]) < abs(pos.grad[0])  # a solved pair pulls less


def _objective(hard_negatives: bool = False, **weights: float) -> tuple[TrainingObjective, dict[str, torch.Tensor]]:
    cfg = BitMarConfig()
    cfg.model = dataclasses.replace(TINY_MODEL)
    cfg.training.contrastive_hard_negatives = hard_negatives
    for key, value in weights.items():
        setattr(cfg.training.loss_weights, key, value)
    torch.manual_seed(0)
    model = BitMar(cfg.model).eval()  # no dropout: the same inputs give the same loss
    swaps = [[10, 11, 12, 13], [20, 21]] if weights.get("hard_negative") or hard_negatives else None
    batch = {
        "kind": "caption",
        "input_ids": torch.tensor([[1, 5, 10, 20, 2], [1, 5, 11, 21, 2], [1, 5, 12, 2, 0], [1, 5, 13, 10, 2]]),
        "attention_mask": torch.tensor([[1] * 5, [1] * 5, [1] * 4 + [0], [1] * 5]),
        "vision_features": torch.randn(4, TINY_MODEL.vision_encoder_dim),
    }
    return TrainingObjective.from_config(model, cfg, 3, [0, 1, 2], swaps), batch


def test_visual_words_loss_counts_content_words_and_trains_the_vision_encoder() -> None:
    objective, batch = _objective(visual_words=1.0)
    ids, mask, features = batch["input_ids"], batch["attention_mask"], batch["vision_features"]
    base = objective._visual_words_loss(ids, mask, features)
    common = ids.clone()
    common[:, 1] = 6  # the word every caption holds changes: idf 0, the loss does not move
    assert objective._visual_words_loss(common, mask, features).item() == pytest.approx(base.item())
    content = ids.clone()
    content[0, 2] = 30  # a content word changes: the loss does
    assert objective._visual_words_loss(content, mask, features).item() != pytest.approx(base.item())
    model = objective.model
    table = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    objective._visual_words_loss(ids, mask, features).backward()
    assert table.grad[40].abs().sum() == 0  # a word outside the batch (a pseudo-word's piece) keeps its embedding
    assert table.grad[10].abs().sum() > 0 and table.grad[5].abs().sum() == 0  # informative word vs one in every caption
    model.zero_grad()
    total, metrics = objective(batch, 2)
    assert "Loss_visual_words" in metrics
    total.backward()
    assert objective.model.vision_encoder.expand.weight.grad.abs().sum() > 0
    off, _ = _objective(visual_words=0.0)
    assert "Loss_visual_words" not in off(batch, 2)[1]


def test_hard_negative_term_reports_binding_and_reaches_the_decoder() -> None:
    objective, batch = _objective(visual_words=0.0, hard_negative=1.0)
    total, metrics = objective(batch, 2)
    assert metrics["Loss_binding"] > 0 and 0.0 <= metrics["Binding_accuracy"] <= 1.0
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.model.decoder.parameters())


def test_features_carry_the_binding_that_winoground_asks_for() -> None:
    """Which noun is the subject and which the reference object, and the reference object's colour, are readable
    from a picture's features by a ridge probe: a model that fails Winoground lacks binding, the data does not."""
    world = sample.SampleWorld(0)
    rng = np.random.default_rng(7)
    scenes = [sample.sample_scene(rng, p_two=1.0) for _ in range(2400)]
    x = world.features(scenes, rng).astype(np.float64)
    nouns = list(NOUNS)
    train, test = slice(0, 2000), slice(2000, None)
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    x = np.hstack([(x - mu) / sd, np.ones((len(x), 1))])
    gram = x[train].T @ x[train] + 30.0 * np.eye(x.shape[1])

    def probe(labels: list[int], classes: int) -> float:
        y = np.asarray(labels)
        w = np.linalg.solve(gram, x[train].T @ np.eye(classes)[y[train]])
        return float(((x[test] @ w).argmax(1) == y[test]).mean())

    subject = probe([nouns.index(s.objects[0].noun) for s in scenes], len(nouns))
    reference = probe([nouns.index(s.objects[1].noun) for s in scenes], len(nouns))
    uncoloured = len(COLOURS)
    colour_of_reference = probe(
        [COLOURS.index(s.objects[1].colour) if s.objects[1].colour else uncoloured for s in scenes], uncoloured + 1
    )
    assert subject > 0.95 and reference > 0.95, (subject, reference)  # chance 1/14
    assert colour_of_reference > 0.4, colour_of_reference  # chance 1/9; a 1-hidden-layer probe reaches 0.82


def test_winoground_effects_decompose_the_scores_exactly() -> None:
    from bitmar.evaluation.scoring import winoground_effects, winoground_outcomes

    s = torch.randn(500, 2, 2, dtype=torch.float64)
    effects = winoground_effects(s)
    outcome = winoground_outcomes(s)
    mean = s.mean(dim=(1, 2))
    rebuilt = torch.stack(
        [
            torch.stack([mean + (effects["caption"] + effects["image"] + effects["interaction"]) / 2,
                         mean + (effects["caption"] - effects["image"] - effects["interaction"]) / 2], 1),
            torch.stack([mean + (-effects["caption"] + effects["image"] - effects["interaction"]) / 2,
                         mean + (-effects["caption"] - effects["image"] + effects["interaction"]) / 2], 1),
        ], 1,
    )  # fmt: skip
    assert torch.allclose(rebuilt, s)
    assert torch.equal(outcome["text"], effects["interaction"] > effects["caption"].abs())
    assert torch.equal(outcome["image"], effects["interaction"] > effects["image"].abs())
    prior = torch.randn(500, 2, 1, dtype=torch.float64)  # PMI-style: subtract a per-caption prior
    assert torch.allclose(winoground_effects(s - prior)["interaction"], effects["interaction"])
    bound = effects["interaction"] > 0
    assert not (winoground_outcomes(s - prior)["text"] & ~bound).any()  # no prior correction passes a non-binding item


def test_interaction_splits_over_the_two_swapped_words_and_adds_up() -> None:
    from bitmar.evaluation.scoring import interaction_by_swapped_word, winoground_effects

    # item 0: "a [dog] on a [box]" / "a [box] on a [dog]" (5 tokens, two runs of one token); item 1: captions of
    # different lengths (not analysed); item 2: one run only ("[b a]" vs "[a b]": adjacent words, not two words)
    targets = torch.zeros(3, 2, 2, 5, dtype=torch.long)
    targets[0, 0] = torch.tensor([4, 10, 6, 4, 11])
    targets[0, 1] = torch.tensor([4, 11, 6, 4, 10])
    targets[1, 0], targets[1, 1] = torch.tensor([4, 10, 6, 11, 0]), torch.tensor([4, 11, 6, 4, 10])
    targets[2, 0], targets[2, 1] = torch.tensor([10, 11, 2, 0, 0]), torch.tensor([11, 10, 2, 0, 0])
    valid = targets != 0
    valid[0] = True
    logp = -torch.rand(3, 2, 2, 5, generator=torch.Generator().manual_seed(0)) * valid
    parts = interaction_by_swapped_word(logp, targets, valid)
    assert parts["analysed"].tolist() == [True, False, False]
    interaction = winoground_effects(logp.sum(-1))["interaction"]
    assert float(parts["first"][0] + parts["second"][0] + parts["rest"][0]) == pytest.approx(
        float(interaction[0]), abs=1e-5
    )
    per_position = (logp[0, 0, 0] + logp[0, 1, 1] - logp[0, 0, 1] - logp[0, 1, 0]) / 2
    assert float(parts["first"][0]) == pytest.approx(float(per_position[1]))
    assert float(parts["second"][0]) == pytest.approx(float(per_position[4]))


def test_winoground_reports_where_the_binding_comes_from(tmp_path: Path) -> None:
    # the toy reads the picture at the first word only: the first swapped word binds (log 3), the second not at all
    (tmp_path / "eval").mkdir()
    item = {"id": 0, "caption_0": "a c b", "caption_1": "b c a", "image_0": 0, "image_1": 1, "tag": "object_swap"}
    (tmp_path / layout.WINOGROUND_FILE).write_text(json.dumps(item) + "\n", encoding="utf-8")
    np.save(tmp_path / sample.WINOGROUND_FEATURES, np.array([[4, 0], [5, 0]], dtype=np.float32))
    result = evaluate_winoground(_context(tmp_path, picture_at=0))
    split = result["metrics"]["binding"]["by_swapped_word"]
    assert split["items"] == 1
    assert split["first"] == {"mean_interaction": pytest.approx(math.log(3.0)), "positive": 1.0}
    assert split["second"] == {"mean_interaction": pytest.approx(0.0, abs=1e-6), "positive": 0.0}
    assert result["metrics"]["binding"]["by_swapped_word_per_tag"]["object_swap"]["items"] == 1
    rows = {r["metric"]: r["value"] for r in result["headline"]}
    assert rows["binding at the first swapped word: share > 0"] == 1.0
    assert rows["binding at the second swapped word: mean interaction (nats)"] == pytest.approx(0.0, abs=1e-6)


def test_word_swapped_captions_join_the_contrastive_loss_as_negatives() -> None:
    plain, batch = _objective(hard_negatives=False)
    negclip, _ = _objective(hard_negatives=True)  # same seed: the same model
    without = plain(batch, 2)[1]["Loss_contrastive"]
    with_negatives = negclip(batch, 2)[1]["Loss_contrastive"]
    assert with_negatives > without  # the last caption has a swappable pair (13, 10): one more column per image
    swapped_only, _ = _objective(hard_negatives=True)
    swapped_only.swapper = None  # no word classes: nothing to swap, the plain loss
    assert swapped_only(batch, 2)[1]["Loss_contrastive"].item() == pytest.approx(without.item())
