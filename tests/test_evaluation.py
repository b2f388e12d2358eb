"""Evaluation suite: metric definitions on hand-made inputs, and every task on one tiny model trained in-process.

The trained model (session fixture) runs 99 optimizer steps of phases 2-3 on a small sample world: enough for
retrieval, grounding, minimal pairs and memory recall to clear their baselines by a wide margin.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer
from tiny_model import word_tokenizer
from transformers import PreTrainedTokenizerFast

from bitmar.config import EVALUATION_TASKS, SampleDataConfig, config_from_dict, config_to_dict, load_config
from bitmar.data.datasets import build_data
from bitmar.data.sample import generate_sample_dataset
from bitmar.evaluation import TASKS, CaptionSplit, EvaluationError, evaluate_after_training, run_evaluation, runner
from bitmar.evaluation.captioning import caption_metrics
from bitmar.evaluation.context import read_jsonl, score_sequences, sentence_token_ids
from bitmar.evaluation.recall import resolve_recall_sizes
from bitmar.evaluation.retrieval import ranks_of_diagonal, recall_at_k
from bitmar.evaluation.runner import flat_metrics, main, markdown_report
from bitmar.evaluation.scoring import (
    load_minimal_pairs,
    minimal_pair_accuracy,
    multiple_choice_accuracy,
    winoground_outcomes,
)
from bitmar.model import BitMar
from bitmar.training.distributed import DistInfo
from bitmar.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------------------
# Hand-made inputs
# ----------------------------------------------------------------------------------------------------------------

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "a", "b", "c", "d"]
PROBS = {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1}  # every position predicts the next token with these probabilities


def words_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS)


class FixedLogitsModel(torch.nn.Module):
    """A 'language model' whose next-token distribution is PROBS at every position (special tokens ~0)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # scorers look up the device from the parameters
        logp = torch.full((len(WORDS),), -1e4)
        for word, p in PROBS.items():
            logp[WORDS.index(word)] = math.log(p)
        self.register_buffer("row", logp)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object):
        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1).clone())  # (B, T, V)


def test_sentence_score_is_the_sum_of_token_log_probs_after_bos_without_eos() -> None:
    tok = words_tokenizer()
    seqs = sentence_token_ids(tok, ["a b", "d", "c c c a"])
    assert seqs[0] == [1, 4, 5]  # BOS + tokens, no EOS
    scores, counts = score_sequences(FixedLogitsModel(), seqs, pad_id=0, batch_size=2, device=torch.device("cpu"))
    expected = [math.log(0.4) + math.log(0.3), math.log(0.1), 3 * math.log(0.2) + math.log(0.4)]
    assert scores.tolist() == pytest.approx(expected, rel=1e-5)
    assert counts.tolist() == [2, 1, 4]
    alone = [score_sequences(FixedLogitsModel(), [s], pad_id=0, batch_size=1, device=torch.device("cpu"))[0].item()
             for s in seqs]  # fmt: skip
    assert scores.tolist() == pytest.approx(alone, rel=1e-6)  # padding in a batch changes nothing


def test_minimal_pair_accuracy_of_a_hand_made_model_counts_ties_as_wrong(tmp_path: Path) -> None:
    lines_x = [
        {"sentence_good": "a", "sentence_bad": "b", "UID": "x", "field": "syntax"},  # 0.4 > 0.3: right
        {"sentence_good": "a b", "sentence_bad": "b a", "UID": "x", "field": "syntax"},  # equal: a tie is wrong
        {"sentence_good": "c", "sentence_bad": "a", "UID": "x", "field": "syntax"},  # 0.2 < 0.4: wrong
    ]
    lines_y = [{"sentence_good": "a a", "sentence_bad": "a d"}]  # no UID: the file name; 0.16 > 0.04: right
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines_x), encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "y.jsonl").write_text(json.dumps(lines_y[0]) + "\n\n", encoding="utf-8")
    pairs = load_minimal_pairs(tmp_path, configured=True)
    result = minimal_pair_accuracy(FixedLogitsModel(), words_tokenizer(), pairs, 3, torch.device("cpu"))
    assert result["pairs"] == 4 and result["ties"] == 1
    assert result["per_uid"] == {"x": pytest.approx(1 / 3), "y": 1.0}
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["macro_accuracy"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert result["per_field"] == {"syntax": pytest.approx(1 / 3), "unknown": 1.0}


def test_minimal_pair_scores_match_the_hf_export_scorer() -> None:
    from bitmar.export.hf_export import score_sentences

    tok, model = words_tokenizer(), FixedLogitsModel()
    sentences = ["a b c", "d", "b b a d c"]
    ours, _ = score_sequences(model, sentence_token_ids(tok, sentences), pad_id=0, batch_size=2, device="cpu")
    assert ours.tolist() == pytest.approx(score_sentences(model, tok, sentences, batch_size=2).tolist(), rel=1e-6)


def test_caption_metrics_agree_with_sacrebleu_and_rouge_score() -> None:
    refs = ["the cat sat on the mat", "a red ball next to a dog", "two small birds in the park"]
    hyps = ["the cat on the mat", "a red ball next to a cat", "three birds at the beach"]
    ours = caption_metrics(hyps, refs)
    assert ours["bleu4"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = sum(scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps, strict=True)) / 3
    assert ours["rouge_l"] == pytest.approx(expected)
    # ROUGE-L by hand for the first pair: LCS 5 tokens, precision 5/5, recall 5/6
    assert scorer.score(refs[0], hyps[0])["rougeL"].fmeasure == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))
    assert caption_metrics(refs, refs) == {"bleu4": pytest.approx(100.0), "rouge_l": pytest.approx(1.0)}
    assert caption_metrics(["x y z"], ["a b c"]) == {"bleu4": 0.0, "rouge_l": 0.0}


def test_retrieval_ranks_are_pessimistic_on_ties() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.5, 0.1], [0.3, 0.8, 0.4]])
    assert ranks_of_diagonal(scores).tolist() == [0, 1, 1]  # row 1 ties with column 0: counted below it
    recall = recall_at_k(scores, (1, 2))
    assert recall["R@1"] == pytest.approx(1 / 3) and recall["R@2"] == 1.0 and recall["median_rank"] == 2.0


def test_a_nan_score_never_counts_as_a_hit() -> None:
    # NaN compares false with everything: unguarded, a NaN on the true item would rank it first
    scores = torch.tensor([[float("nan"), 5.0], [float("nan"), 1.0]])
    assert ranks_of_diagonal(scores).tolist() == [1, 0]  # query 0 misses; query 1's NaN rival ranks below it


def test_winoground_scores_follow_thrush_et_al() -> None:
    s = torch.tensor(
        [
            [[2.0, 0.0], [1.0, 3.0]],  # text: 2>1 and 3>0; image: 2>0 and 3>1 -> group
            [[2.0, 3.0], [1.0, 4.0]],  # text: 2>1, 4>3; image: 2<3 -> text only
            [[1.0, 0.0], [2.0, 3.0]],  # text: 1<2 fails; image: 1>0, 3>2 -> image only
            [[1.0, 1.0], [0.0, 2.0]],  # image: tie 1 == 1 fails; text: 1>0, 2>1 -> text only
        ]
    )
    out = winoground_outcomes(s)
    assert out["text"].tolist() == [True, True, False, True]
    assert out["image"].tolist() == [True, False, True, False]
    assert out["group"].tolist() == [True, False, False, False]
    mc = multiple_choice_accuracy(torch.tensor([[1.0, 0.0, 0.5], [1.0, 1.0, 0.0], [0.0, 1.0, -1.0]]))
    assert mc.tolist() == [True, False, False]  # a tie with a distractor is wrong


def test_recall_sizes_are_capped_and_the_cap_reported() -> None:
    sizes = resolve_recall_sizes([1, 16, 128, -1], memory_size=64, episode_dim=128, available=128)
    assert [s["written"] for s in sizes] == [1, 16, 64, 64]
    assert [s["capped_by"] for s in sizes] == [None, None, "exact-recall bound min(K, C)", None]
    few = resolve_recall_sizes([1, 128], memory_size=512, episode_dim=768, available=100)
    assert [s["written"] for s in few] == [1, 100] and few[1]["capped_by"] == "episodes available"


def test_malformed_eval_file_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "vqa.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(EvaluationError, match=r"vqa.jsonl:2 is not valid JSON"):
        read_jsonl(path, ("question",))
    with pytest.raises(EvaluationError, match=r"vqa.jsonl:1 lacks the keys \['image'\]"):
        read_jsonl(path, ("question", "image"))


def test_cli_missing_checkpoint_and_unknown_task_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert "nope.pt does not exist" in err and "checkpoints/last.pt" in err
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), "--tasks", "retrival"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'retrival'" in err and "did you mean 'retrieval'" in err
    assert all(name in err for name in TASKS)


def test_task_names_of_the_config_and_the_registry_agree() -> None:
    assert tuple(TASKS) == EVALUATION_TASKS  # config validation checks names against EVALUATION_TASKS


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("tpu", r"--device 'tpu' is not a device name; use --device auto, cpu, cuda or cuda:N"),
        ("gpu0", r"--device 'gpu0' is not a device name"),
        ("meta", r"--device meta: BitMar evaluates on CPU or CUDA GPUs, not meta"),
    ],
)
def test_cli_unknown_device_exits_2(device: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), "--device", device]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_cuda_device_that_is_not_there_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["--checkpoint", str(tmp_path / "nope.pt"), "--device"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*args, "cuda"]) == 2
    assert "CUDA is not available on this machine; use --device cpu" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main([*args, "cuda:3"]) == 2
    assert "this machine has 1 CUDA device(s) (cuda:0..cuda:0)" in capsys.readouterr().err


def test_cli_unwritable_output_exits_2_before_loading_anything(
    tmp_path: Path, unwritable_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"never read: the output is checked first")
    loaded: list[str] = []
    monkeypatch.setattr(runner, "load_run", lambda *a, **k: loaded.append("load_run"))
    out = unwritable_dir / "eval" / "results.json"
    assert main(["--checkpoint", str(checkpoint), "--output", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the evaluation results to {out}" in err and "cannot create files in" in err
    assert "pass --output PATH.json in a directory you can write to" in err and not loaded
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["--checkpoint", str(checkpoint), "--output", str(a_file / "r.json"), "--device", "cpu"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err and not loaded


def test_evaluation_after_training_checks_the_run_directory_first(unwritable_dir: Path) -> None:
    cfg = load_config(None, ["evaluation.run_after_training=true"])
    with pytest.raises(EvaluationError, match=r"cannot write the evaluation results to .*results.json"):
        evaluate_after_training(None, None, cfg, data_dir=unwritable_dir, output_dir=unwritable_dir / "run")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# One tiny model, trained once
# ----------------------------------------------------------------------------------------------------------------

TRAIN_OVERRIDES = [
    "data.sample.generate_if_missing=false",
    "data.use_local_narratives=false",
    "data.validation_fraction=0.1",
    "training.max_steps_per_epoch=33",
    "training.max_epochs=3",
    "training.phase1_text.epochs=0",  # phases 2-3 keep training the LM on text batches (data.text_ratio)
    # Retrieval needs the 66 alignment steps; one memory epoch is plenty (one-shot recall ~1.0 vs 0.0 empty) and a
    # phase-3 step costs ~2 phase-2 steps, so the second memory epoch (a third of the suite's slowest fixture) went.
    # Measured against the 132-step run this replaced: same R@1 (4/32 both ways), minimal pairs 0.67 vs 0.73.
    "training.phase2_alignment.epochs=2",
    "training.phase3_memory.epochs=1",
    "training.memory_episodes_per_write=16",  # the memory losses' cost halves; recall is measured on 32 episodes
    "training.warmup_steps=5",
    "training.validation_batches=1",
    "wandb.create_plots=false",
    "wandb.log_every_n_steps=1000",
    "wandb.log_attention=false",
    "wandb.log_features=false",
    "wandb.log_gradients=false",
    "wandb.log_quantization=false",
    "wandb.log_memory=false",
    "attention_analysis.enabled=false",
    "evaluation.run_after_training=false",
    "evaluation.retrieval_gallery_size=32",
    "evaluation.caption_samples=8",
    "evaluation.caption_max_new_tokens=12",
    "evaluation.recall_sizes=[1,8,-1]",
    "evaluation.batch_size=64",
]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("evaluation")
    data_dir = root / "data"
    generate_sample_dataset(
        data_dir,
        SampleDataConfig(seed=0, num_cc3m=800, num_local_narratives=2, num_text_lines=1500, num_novel_episodes=32),
    )
    cfg = load_config(REPO / "configs" / "bitmar_tiny.yaml", [f"data.data_dir={data_dir}", *TRAIN_OVERRIDES])
    run_dir = root / "run"
    data = build_data(cfg, run_dir)
    cfg.model.vocab_size = len(data.tokenizer)  # settled before the model is built (as train_bitmar.py does)
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    trainer = Trainer(cfg, run_dir, cpu, data, wandb_mode="disabled")
    trainer.train()
    model = trainer.model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = run_evaluation(
        model, data.tokenizer, cfg, data_dir=data_dir, caption_split=CaptionSplit.from_dataset(data.caption_val)
    )
    return SimpleNamespace(
        model=model, tokenizer=data.tokenizer, cfg=cfg, data=data, data_dir=data_dir, run_dir=run_dir,
        results=results, before=before,
    )  # fmt: skip


def _metrics(trained: SimpleNamespace, task: str) -> dict:
    result = trained.results["tasks"][task]
    assert result["status"] == "ok", result
    return result["metrics"]


@pytest.mark.slow
def test_every_task_runs_with_numbers_in_range_and_leaves_the_model_alone(trained: SimpleNamespace) -> None:
    assert set(trained.results["tasks"]) == set(TASKS)
    assert all(t["status"] == "ok" for t in trained.results["tasks"].values())
    assert all(torch.equal(v, trained.before[k]) for k, v in trained.model.state_dict().items())
    assert not trained.model.training
    unit = lambda x: 0.0 <= x <= 1.0  # noqa: E731
    r = _metrics(trained, "retrieval")
    assert r["gallery_size"] == 32 and r["chance"]["R@10"] == pytest.approx(10 / 32)
    assert all(unit(v) for d in ("image_to_text", "text_to_image") for k, v in r[d].items() if k.startswith("R@"))
    c = _metrics(trained, "captioning")
    assert 0.0 <= c["bleu4"] <= 100.0 and unit(c["rouge_l"]) and c["samples"] == 8 and len(c["examples"]) == 3
    assert 0.0 <= c["with_memory"]["bleu4"] <= 100.0 and unit(c["with_memory"]["rouge_l"])  # support memory
    g = _metrics(trained, "grounding")
    assert all(g[k] > 0 for k in ("nll_true_image", "nll_shuffled_image", "nll_no_image"))
    m = _metrics(trained, "minimal_pairs")
    assert m["pairs"] == 400 and set(m["per_uid"]) == {
        "adjective_order", "determiner_noun_agreement", "subject_verb_agreement", "word_order"
    }  # fmt: skip
    w = _metrics(trained, "winoground")
    assert w["items"] == 100 and all(unit(w[f"{k}_score"]) for k in ("text", "image", "group"))
    assert w["group_score"] <= min(w["text_score"], w["image_score"])
    v = _metrics(trained, "vqa")
    assert v["questions"] == 200 and v["choices"] == 8 and unit(v["accuracy"]) and v["chance"] == 0.125
    e = _metrics(trained, "efficiency")
    assert 0.9 < e["ternary_fraction"] < 1.0 and e["model_bytes_packed"] < e["model_bytes_float32"] / 4
    assert e["speed"]["packed_tokens_per_s"] > 0 and e["speed"]["token_agreement"] > 0.95
    flat = flat_metrics(trained.results)
    assert flat["Evaluation/retrieval/gallery_size"] == 32.0 and all(math.isfinite(x) for x in flat.values())
    report = markdown_report(trained.results)
    assert "| Task | Metric | Value | Reference |" in report and "## Caption examples" in report


@pytest.mark.slow
def test_trained_model_beats_chance_on_retrieval_and_minimal_pairs(trained: SimpleNamespace) -> None:
    r = _metrics(trained, "retrieval")
    for direction in ("image_to_text", "text_to_image"):
        # 32 items: one hit is 0.03 of R@1, so R@1 only has to beat chance and the margins are asserted at R@5/R@10
        assert r[direction]["R@1"] > r["chance"]["R@1"], r
        assert r[direction]["R@5"] > 2 * r["chance"]["R@5"], r
        assert r[direction]["R@10"] > 1.5 * r["chance"]["R@10"], r
    assert r["mean_matched_cosine"] > r["mean_unmatched_cosine"]
    m = _metrics(trained, "minimal_pairs")
    # 400 pairs: 0.55 is two standard errors above chance (0.5). The 99-step run measured 0.585 once the visual-words
    # weight became 3 (0.6+ at weight 1); the 538-step default run gives 0.82 (docs/evaluation-and-ablations.md).
    assert m["accuracy"] > 0.55, m
    assert m["per_uid"]["word_order"] > 0.9, m


@pytest.mark.slow
def test_grounding_gain_is_positive(trained: SimpleNamespace) -> None:
    g = _metrics(trained, "grounding")
    assert g["gain_vs_shuffled"] > 0.02, g
    # > 0.2, not more: the visual-words loss also teaches the blind decoder which words captions use (its no-image
    # NLL drops ~0.4 nats in this 99-step run) while the true-image NLL stays where it was
    assert g["gain_vs_no_image"] > 0.2, g


@pytest.mark.slow
def test_one_shot_recall_from_memory_is_far_above_the_empty_memory(trained: SimpleNamespace) -> None:
    rec = _metrics(trained, "episodic_recall")
    assert rec["episodes_available"] == 32 and rec["exact_recall_bound"] == 256
    assert [s["written"] for s in rec["sizes"]] == [1, 8, 32]
    assert [s["groups"] for s in rec["sizes"]] == [8, 4, 1]  # disjoint groups of N, each in its own memory
    largest = rec["sizes"][-1]
    memory, empty = largest["memory"], largest["empty_memory"]
    # held-out pseudo-words come back from one write; never from an empty memory, nor by captioning the picture
    assert memory["nonce_word_recall"] > empty["nonce_word_recall"] + 0.3, largest
    assert empty["nonce_word_recall"] == 0.0 and rec["vision_only_no_memory"]["nonce_word_recall"] == 0.0
    assert {(s["episodes"], s["steps"]) for s in rec["slow_learning"]} == {(1, 1), (1, 10), (16, 1), (16, 10)}
    for size in rec["sizes"]:  # the memory returns the written episode; an empty memory returns something unrelated
        assert size["memory"]["readout_cosine"] > 0.9 and size["empty_memory"]["readout_cosine"] < 0.5, size
    assert memory["token_accuracy"] > 2 * empty["token_accuracy"] and memory["token_accuracy"] > 0.1, largest
    assert memory["nll_per_token"] < empty["nll_per_token"] - 0.5, largest
    forgetting = rec["forgetting"]
    assert forgetting["written"] == 32 and forgetting["forgotten"] == 16
    assert forgetting["relative_readout_difference_vs_fresh_write"] < 1e-3  # exact forgetting
    assert forgetting["kept"]["token_accuracy"] > forgetting["forgotten_episodes"]["token_accuracy"]
    lru = rec["lru_eviction"]
    assert lru["evicted_as_expected"], lru
    assert lru["held"]["token_accuracy"] > lru["evicted"]["token_accuracy"], lru


@pytest.mark.slow
def test_cli_evaluates_the_saved_checkpoint_like_the_in_process_model(
    trained: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "eval" / "results.json"
    args = ["--checkpoint", str(trained.run_dir), "--data_dir", str(trained.data_dir), "--device", "cpu"]
    assert main([*args, "--tasks", "minimal_pairs", "winoground", "--output", str(out)]) == 0
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["checkpoint"].endswith("last.pt") and set(saved["tasks"]) == {"minimal_pairs", "winoground"}
    compared = {"minimal_pairs": ("accuracy", "macro_accuracy"), "winoground": ("text_score", "group_score")}
    for task, keys in compared.items():
        for key in keys:
            assert saved["tasks"][task]["metrics"][key] == pytest.approx(trained.results["tasks"][task]["metrics"][key])
    assert saved["tasks"]["minimal_pairs"]["metrics"]["per_uid"] == pytest.approx(
        trained.results["tasks"]["minimal_pairs"]["metrics"]["per_uid"]
    )
    assert "| minimal_pairs | accuracy (macro over UIDs) |" in out.with_suffix(".md").read_text(encoding="utf-8")
    capsys.readouterr()
    assert main([*args, "--tasks", "vqa", "--output", str(tmp_path / "x.txt")]) == 2
    assert "must end in .json" in capsys.readouterr().err

    def disk_full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "write_results", disk_full)  # a write that fails after the work: numbers kept
    assert main([*args, "--tasks", "minimal_pairs", "--output", str(tmp_path / "full" / "results.json")]) == 2
    captured = capsys.readouterr()
    assert "| minimal_pairs | accuracy (macro over UIDs) |" in captured.out
    assert "No space left on device" in captured.err and "the report is printed above" in captured.err


@pytest.mark.slow
def test_missing_eval_data_is_skipped_by_default_and_an_error_when_asked_for(
    trained: SimpleNamespace, tmp_path: Path
) -> None:
    args = (trained.model, trained.tokenizer, trained.cfg)
    results = run_evaluation(*args, data_dir=tmp_path, tasks=["vqa", "minimal_pairs"])
    vqa = results["tasks"]["vqa"]
    assert vqa["status"] == "skipped" and "vqa.jsonl does not exist" in vqa["reason"]
    assert results["tasks"]["minimal_pairs"]["status"] == "skipped"
    with pytest.raises(EvaluationError, match="task vqa: .*vqa.jsonl does not exist"):
        run_evaluation(*args, data_dir=tmp_path, tasks=["vqa"], strict=True)
    configured = config_from_dict(config_to_dict(trained.cfg), [f"evaluation.blimp_dir={tmp_path / 'blimp'}"])
    with pytest.raises(EvaluationError, match="fix evaluation.blimp_dir"):
        run_evaluation(trained.model, trained.tokenizer, configured, data_dir=tmp_path, tasks=["minimal_pairs"])


@pytest.mark.slow
def test_a_blind_model_skips_vision_tasks_and_fails_winoground_by_ties(trained: SimpleNamespace) -> None:
    cfg = config_from_dict(config_to_dict(trained.cfg), ["model.use_vision=false"])
    blind = BitMar(cfg.model).eval()
    tasks = ["retrieval", "grounding", "episodic_recall", "winoground"]
    results = run_evaluation(blind, trained.tokenizer, cfg, data_dir=trained.data_dir, tasks=tasks)
    for name in ("retrieval", "grounding", "episodic_recall"):
        assert results["tasks"][name]["status"] == "skipped" and "use_vision=false" in results["tasks"][name]["reason"]
    wino = results["tasks"]["winoground"]["metrics"]
    assert not wino["conditioned_on_image"] and wino["image_score"] == 0.0 and wino["group_score"] == 0.0
    assert "retrieval** skipped: model.use_vision=false" in markdown_report(results)


@pytest.mark.slow
def test_evaluate_after_training_writes_files_and_logs(trained: SimpleNamespace, tmp_path: Path) -> None:
    overrides = ["evaluation.tasks=[minimal_pairs]", "evaluation.run_after_training=true"]
    cfg = config_from_dict(config_to_dict(trained.cfg), overrides)
    logged: list[tuple[dict, int]] = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((metrics, step)))
    results = evaluate_after_training(
        trained.model, trained.tokenizer, cfg, trained.data_dir, tmp_path, trained.data.caption_val, logger, step=7
    )
    assert (tmp_path / "evaluation" / "results.json").is_file() and (tmp_path / "evaluation" / "results.md").is_file()
    assert results["tasks"]["minimal_pairs"]["status"] == "ok"
    ((metrics, step),) = logged
    accuracy = results["tasks"]["minimal_pairs"]["metrics"]["accuracy"]
    assert step == 7 and metrics["Evaluation/minimal_pairs/accuracy"] == accuracy
    off = config_from_dict(config_to_dict(cfg), ["evaluation.run_after_training=false"])
    assert evaluate_after_training(trained.model, trained.tokenizer, off, trained.data_dir, tmp_path / "off") is None
    assert not (tmp_path / "off").exists()
