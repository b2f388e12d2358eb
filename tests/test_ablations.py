"""Ablations over seeds: the statistics (t quantiles, mean ± 95% CI, paired differences, verdicts) on hand-made
per-seed results, the Markdown/JSON shape, run planning, reuse and parallelism without training, and one slow
end-to-end run of the command on a tiny sample world."""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bitmar.config import SampleDataConfig, load_config
from bitmar.data.sample import generate_sample_dataset
from bitmar.evaluation import ablations
from bitmar.evaluation.ablations import (
    QUICK_OVERRIDES,
    TRAIN_FIXED,
    VARIANTS,
    aggregate,
    better_direction,
    check_reusable,
    format_aggregate,
    main,
    markdown_table,
    mean_ci,
    metric_key,
    paired_difference,
    plan_runs,
    summarize,
    t_quantile,
    train_run,
    verdict,
)
from bitmar.infra.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (9, 2.262), (10, 2.228), (30, 2.042), (100, 1.984)],
)
def test_t_quantile_matches_the_printed_tables(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_other_levels_large_df_and_bad_arguments() -> None:
    assert t_quantile(0.95, 4) == pytest.approx(2.132, abs=5e-4)
    assert t_quantile(0.995, 10) == pytest.approx(3.169, abs=5e-4)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.960, abs=5e-4)
    assert t_quantile(0.975, 999) > t_quantile(0.975, 1001) > 1.959  # continuous at the switch to the normal
    for p, df in ((0.975, 0), (0.4, 3), (1.0, 3)):
        with pytest.raises(ValueError, match="t_quantile"):
            t_quantile(p, df)


def test_mean_ci_on_hand_values() -> None:
    ci = mean_ci([1.0, 2.0, 3.0])  # mean 2, sample std 1, half-width 4.303 / sqrt(3)
    assert ci["n"] == 3 and ci["mean"] == 2.0 and ci["std"] == pytest.approx(1.0)
    assert ci["ci95"] == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    assert (ci["low"], ci["high"]) == pytest.approx((2.0 - ci["ci95"], 2.0 + ci["ci95"]))
    one = mean_ci([0.25])
    assert one["mean"] == 0.25 and one["std"] is None and one["ci95"] is None
    assert mean_ci([0.5, 0.5, 0.5])["ci95"] == 0.0


def test_summarize_numbers_booleans_non_finite_and_text() -> None:
    numeric = summarize([0.1, 0.3, None, "nan"])  # results.json writes NaN as "nan"; None: seed without the value
    assert numeric["kind"] == "numeric" and numeric["n"] == 2 and numeric["non_finite"] == 1
    assert numeric["mean"] == pytest.approx(0.2) and numeric["std"] == pytest.approx(statistics.stdev([0.1, 0.3]))
    share = summarize([True, False, True])
    assert share == {"kind": "share_true", "n": 3, "true": 2, "share": pytest.approx(2 / 3)}
    assert summarize(["b", "a", "b"]) == {"kind": "values", "n": 3, "values": ["a", "b"]}
    assert summarize([]) is None and summarize([None]) is None
    assert format_aggregate(summarize([0.5, 0.6, 0.7])) == "0.600 ± 0.248 (3)"
    assert format_aggregate(summarize([0.5])) == "0.500 (1)"
    assert format_aggregate(share) == "67% true (3)"
    assert format_aggregate(numeric) == "0.200 ± 1.271 (2, 1 non-finite)"
    assert format_aggregate(None) == "—"


def test_paired_difference_uses_common_seeds_and_removes_shared_seed_variation() -> None:
    # Seeds move both variants together: unpaired the CIs overlap widely, paired the difference is clear.
    full = {0: 0.50, 1: 0.70, 2: 0.90, 3: 0.99}
    other = {0: 0.45, 1: 0.66, 2: 0.84, 5: 0.10}
    diff = paired_difference(full, other)
    assert diff["seeds"] == [0, 1, 2] and diff["n"] == 3 and diff["pairing"] == "paired by seed"
    assert diff["mean"] == pytest.approx(0.05) and diff["std"] == pytest.approx(0.01)
    assert diff["ci95"] == pytest.approx(4.3027 * 0.01 / math.sqrt(3), abs=1e-5)
    unpaired_full, unpaired_other = mean_ci([0.50, 0.70, 0.90]), mean_ci([0.45, 0.66, 0.84])
    assert unpaired_full["low"] < unpaired_other["high"]  # a Welch-style reading would see no difference
    assert verdict(diff, True) == "full better"
    assert verdict(diff, False) == "full worse"
    assert verdict(diff, None) == ""
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    assert paired_difference({0: "nan", 1: 2.0}, {0: 1.0, 1: 1.0})["seeds"] == [1]


def test_verdicts_no_difference_lower_is_better_and_single_pairs() -> None:
    noisy = paired_difference({0: 0.5, 1: 0.7, 2: 0.4}, {0: 0.6, 1: 0.5, 2: 0.45})
    assert noisy["low"] < 0 < noisy["high"]
    assert verdict(noisy, True) == "no difference (CI includes 0)"
    loss = paired_difference({0: 1.0, 1: 1.1, 2: 1.2}, {0: 1.5, 1: 1.6, 2: 1.8})  # full's loss is lower
    assert verdict(loss, better_direction("training", "final validation loss")) == "full better"
    assert verdict(paired_difference({0: 0.9}, {0: 0.1}), True) == "n=1: no CI"
    same = paired_difference({0: 3, 1: 3}, {0: 3, 1: 3})
    assert same["ci95"] == 0.0 and verdict(same, True) == "no difference (CI includes 0)"


@pytest.mark.parametrize(
    ("task", "metric", "hint", "expected"),
    [
        ("retrieval", "image→text R@1", None, True),
        ("captioning", "BLEU-4", None, True),
        ("captioning", "ROUGE-L F1", None, True),
        ("vqa", "accuracy", None, True),
        ("episodic_recall", "N=16: exact match", None, True),
        ("episodic_recall", "forgetting: kept episodes, nonce-word recall (reference: before forgetting)", None, True),
        ("grounding", "caption NLL/token, true image", None, False),
        ("episodic_recall", "forget 8 of 16: readout error vs never written", None, False),
        ("training", "final validation loss", None, False),
        ("minimal_pairs", "UID word_order", None, True),
        ("winoground", "group score", None, True),
        # controls and unknowns: no verdict
        ("episodic_recall", "forgetting: forgotten episodes, nonce-word recall", None, None),
        ("vqa", "accuracy without image", None, None),
        ("grounding", "caption NLL/token, no image", None, None),
        ("efficiency", "model size packed (MiB)", None, None),
        ("episodic_recall", "N=16: readout cosine to its value", None, None),
        # an explicit hint wins over the name
        ("episodic_recall", "forgetting: forgotten episodes, nonce-word recall", False, False),
        ("efficiency", "parameters", True, True),
    ],
)
def test_better_direction(task: str, metric: str, hint: Any, expected: bool | None) -> None:
    assert better_direction(task, metric, hint) is expected


def test_metric_key_drops_timings_but_keeps_other_parentheses() -> None:
    assert (
        metric_key("slow learning, N=16, 10 decoder step(s): nonce-word recall (1.93 s vs memory write 0.004 s)")
        == "slow learning, N=16, 10 decoder step(s): nonce-word recall"
    )
    assert metric_key("N=64 (asked -1): exact match") == "N=64 (asked -1): exact match"
    assert metric_key("LRU store (capacity 10): evicts the least recently used") == (
        "LRU store (capacity 10): evicts the least recently used"
    )


# ----------------------------------------------------------------------------------------------------------------
# Aggregation and report on hand-made per-seed results
# ----------------------------------------------------------------------------------------------------------------


def _run(status: str, tasks: dict[str, Any] | None, loss: float | None = None, evaluation: str = "ok") -> dict:
    run: dict[str, Any] = {"training": {"status": status, "seconds": 60.0, "log": "train.log"}}
    if status == "failed":
        run["training"]["error"] = ["ValueError: boom"]
        return run
    run["summary"] = {"final_validation_loss": loss}
    run["evaluation"] = {"status": evaluation, "seconds": 30.0, "log": "eval.log"}
    if evaluation == "failed":
        run["evaluation"]["error"] = ["EvaluationError: no data"]
        run["results"] = None
    else:
        run["results"] = {"tasks": tasks}
    return run


def _retrieval(r1: float) -> dict[str, Any]:
    return {"status": "ok", "headline": [{"metric": "image→text R@1", "value": r1, "reference": 0.02}]}


def _recall(exact: float, lru: bool, seconds: float) -> dict[str, Any]:
    return {
        "status": "ok",
        "headline": [
            {"metric": "N=16: exact match", "value": exact, "reference": 0.0},
            {"metric": f"slow learning: recall ({seconds:.2f} s vs write 0.003 s)", "value": 0.1, "reference": 0},
            {"metric": "LRU store: evicts the least recently used", "value": lru, "reference": True},
            {"metric": "write time", "value": seconds, "reference": None, "higher_is_better": False},
        ],
    }


SKIPPED = {"status": "skipped", "reason": "model.use_memory=false: the model has no episodic memory"}


def hand_made_runs() -> dict[str, dict[int, dict[str, Any]]]:
    return {
        "full": {
            0: _run("trained", {"retrieval": _retrieval(0.50), "episodic_recall": _recall(0.9, True, 1.0)}, 1.20),
            1: _run("reused", {"retrieval": _retrieval(0.70), "episodic_recall": _recall(0.8, True, 2.0)}, 1.10),
            2: _run("trained", {"retrieval": _retrieval(0.90), "episodic_recall": _recall(0.7, False, 3.0)}, 1.00),
        },
        "no_memory": {
            0: _run("trained", {"retrieval": _retrieval(0.45), "episodic_recall": SKIPPED}, 1.55),
            1: _run("trained", {"retrieval": _retrieval(0.66), "episodic_recall": SKIPPED}, 1.50),
            2: _run("trained", {"retrieval": _retrieval(0.84), "episodic_recall": SKIPPED}, 1.40),
        },
        "no_vision": {
            0: _run("failed", None),
            1: _run("trained", {"retrieval": SKIPPED}, 1.3, evaluation="failed"),
            2: _run("trained", {"retrieval": {"status": "skipped", "reason": "no vision"}}, 1.4),
        },
    }


def test_aggregate_lines_up_seeds_variants_and_comparisons() -> None:
    table = aggregate(hand_made_runs(), ["full", "no_memory", "no_vision"])
    rows = {(r["task"], r["metric"]): r for r in table}
    assert list(rows) == [  # first-seen order; the timing in the slow-learning name no longer splits the row
        ("retrieval", "image→text R@1"),
        ("episodic_recall", "N=16: exact match"),
        ("episodic_recall", "slow learning: recall"),
        ("episodic_recall", "LRU store: evicts the least recently used"),
        ("episodic_recall", "write time"),
        ("training", "final validation loss"),
    ]
    r1 = rows[("retrieval", "image→text R@1")]
    assert r1["per_seed"] == {"full": {"0": 0.5, "1": 0.7, "2": 0.9}, "no_memory": {"0": 0.45, "1": 0.66, "2": 0.84}}
    assert r1["aggregate"]["full"]["mean"] == pytest.approx(0.7) and r1["aggregate"]["no_vision"] is None
    assert r1["reference"]["mean"] == pytest.approx(0.02)
    assert r1["comparisons"]["no_memory"]["verdict"] == "full better"
    assert "no_vision" not in r1["comparisons"]
    assert rows[("episodic_recall", "LRU store: evicts the least recently used")]["aggregate"]["full"]["share"] == (
        pytest.approx(2 / 3)
    )
    assert rows[("episodic_recall", "write time")]["higher_is_better"] is False  # the row's hint
    loss = rows[("training", "final validation loss")]
    assert loss["aggregate"]["no_vision"]["n"] == 2  # the run whose evaluation failed still trained
    assert loss["comparisons"]["no_memory"]["verdict"] == "full better"
    assert loss["comparisons"]["no_vision"]["n"] == 2 and loss["comparisons"]["no_vision"]["seeds"] == [1, 2]
    json.dumps(table)  # the JSON record holds it as is


def test_markdown_table_shape() -> None:
    runs = hand_made_runs()
    md = markdown_table(runs, ["full", "no_memory", "no_vision"], [0, 1, 2], quick=True, wall_seconds=600, jobs=2)
    lines = md.splitlines()
    assert lines[0] == "# BitMar ablations (quick: 10 steps per epoch, smoke-test numbers)"
    header = lines.index("| Task | Metric | full | no_memory | no_vision | Reference (full) |")
    assert lines[header + 1] == "|---|---|---:|---:|---:|---:|"
    assert "| retrieval | image→text R@1 | 0.700 ± 0.497 (3) | 0.650 ± 0.485 (3) | — | 0.020 |" in lines
    assert "| episodic_recall | N=16: exact match | 0.800 ± 0.248 (3) | — | — | 0.000 |" in lines
    assert "| episodic_recall | LRU store: evicts the least recently used | 67% true (3) | — | — | yes |" in lines
    # every metric row of the first table has one cell per variant plus the reference
    first = lines[header + 2 : lines.index("## full vs each variant") - 1]
    assert len(first) == 6 and all(line.count("|") == 7 for line in first)
    comp = lines.index("| Task | Metric | Better | full − no_memory | verdict | full − no_vision | verdict |")
    assert lines[comp + 1] == "|---|---|:-:|---:|---|---:|---|"
    assert "| retrieval | image→text R@1 | ↑ | +0.050 ± 0.025 (3) | full better | — |  |" in lines
    assert (
        "| training | final validation loss | ↓ | -0.383 ± 0.072 (3) | full better "
        "| -0.300 ± 1.271 (2) | no difference (CI includes 0) |"
    ) in lines
    assert "| no_vision | 0 | failed | 1.0 min |  |  |  |" in lines
    assert "| no_vision | 1 | trained | 1.0 min | failed | 0.5 min | 1.300 |" in lines
    assert "Wall time: 10.0 min for 9 runs, 2 at a time." in lines
    assert "- **no_vision/seed_0** training failed: `ValueError: boom` (log: train.log)" in lines
    assert "- **no_vision/seed_1** evaluation failed: `EvaluationError: no data` (log: eval.log)" in lines
    assert "- episodic_recall skipped for no_memory: model.use_memory=false: the model has no episodic memory" in lines
    assert "- retrieval skipped for no_vision: no vision" in lines


def test_one_seed_gives_no_interval_and_no_verdict() -> None:
    runs = {v: {0: by_seed[0]} for v, by_seed in hand_made_runs().items() if v != "no_vision"}
    md = markdown_table(runs, ["full", "no_memory"], [0], quick=False)
    assert "| retrieval | image→text R@1 | 0.500 (1) | 0.450 (1) | 0.020 |" in md
    assert "| retrieval | image→text R@1 | ↑ | +0.050 (1) | n=1: no CI |" in md


# ----------------------------------------------------------------------------------------------------------------
# Runs without training
# ----------------------------------------------------------------------------------------------------------------


def test_plan_runs_gives_one_directory_and_seed_per_variant_and_only_the_switch_differs(tmp_path: Path) -> None:
    specs = plan_runs(tmp_path, ["full", "no_memory"], [5, 6], QUICK_OVERRIDES)
    assert [(s.variant, s.seed, s.run_dir) for s in specs] == [
        ("full", 5, tmp_path / "full" / "seed_5"),
        ("no_memory", 5, tmp_path / "no_memory" / "seed_5"),
        ("full", 6, tmp_path / "full" / "seed_6"),
        ("no_memory", 6, tmp_path / "no_memory" / "seed_6"),
    ]
    assert specs[0].training_overrides == [*TRAIN_FIXED, *QUICK_OVERRIDES, "training.seed=5"]
    assert specs[1].training_overrides == ["model.use_memory=false", *TRAIN_FIXED, *QUICK_OVERRIDES, "training.seed=5"]
    # each variant is the base config plus its one switch
    switched = {"full": None, "no_memory": "use_memory", "no_vision": "use_vision", "full_precision": "quantize"}
    assert set(VARIANTS) == set(switched)
    for name, switch in VARIANTS.items():
        model = load_config(REPO / ablations.BASE_CONFIG, switch).model
        flags = {k: getattr(model, k) for k in ("use_memory", "use_vision", "quantize")}
        assert flags == {k: k != switched[name] for k in flags}, name


def _finish(run_dir: Path) -> None:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"x")
    (run_dir / "summary.json").write_text("{}")


def test_finished_runs_are_reused_and_stopped_ones_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []

    def fake_run(command: list[str], **kwargs: Any) -> Any:
        commands.append(command)
        assert kwargs["env"]["OMP_NUM_THREADS"] == "1" and kwargs["cwd"] == ablations.REPO_ROOT
        _finish_missing(Path(command[command.index("--output_dir") + 1]))
        return type("Done", (), {"returncode": 0})()

    def _finish_missing(run_dir: Path) -> None:
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        (run_dir / "checkpoints" / "last.pt").write_bytes(b"x")
        (run_dir / "summary.json").write_text("{}")

    monkeypatch.setattr(ablations.subprocess, "run", fake_run)
    env = ablations.subprocess_env(1)
    done = tmp_path / "done"
    _finish(done)
    assert train_run("full", done, ["training.seed=0"], "cpu", retrain=False, env=env)["status"] == "reused"
    assert commands == []
    # a run stopped half-way with the same settings resumes; a fresh directory starts from scratch
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / ablations.RECORD).write_text(json.dumps({"overrides": ["model.use_memory=false", "training.seed=0"]}))
    assert train_run("no_memory", stopped, ["training.seed=0"], "cpu", retrain=False, env=env)["status"] == "trained"
    assert commands[-1][commands[-1].index("--resume") + 1] == "auto"
    assert commands[-1][-4:] == ["--set", "model.use_memory=false", "--set", "training.seed=0"]
    assert train_run("full", tmp_path / "fresh", ["training.seed=1"], "cpu", retrain=False, env=env)["status"] == (
        "trained"
    )
    assert "--resume" not in commands[-1]
    record = json.loads((tmp_path / "fresh" / ablations.RECORD).read_text())
    assert record == {"variant": "full", "overrides": ["training.seed=1"]}
    # --retrain trains a finished run again, from scratch
    assert train_run("full", done, ["training.seed=0"], "cpu", retrain=True, env=env)["status"] == "trained"
    assert "--resume" not in commands[-1]


def test_a_training_failure_is_reported_not_raised(tmp_path: Path) -> None:
    outcome = train_run("full", tmp_path / "full", ["training.no_such_key=1"], "cpu", retrain=False)
    assert outcome["status"] == "failed" and outcome["exit_code"] == 2
    assert any("no_such_key" in line for line in outcome["error"])
    assert not (tmp_path / "full" / "summary.json").exists()


def test_a_run_trained_with_other_settings_is_refused_before_any_training(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = plan_runs(tmp_path, ["full"], [0], [])[0]
    spec.run_dir.mkdir(parents=True)
    quick = [*TRAIN_FIXED, *QUICK_OVERRIDES, "training.seed=0"]
    (spec.run_dir / ablations.RECORD).write_text(json.dumps({"variant": "full", "overrides": quick}))
    with pytest.raises(ablations.ConfigError, match=r"other settings \(-training.max_steps_per_epoch=10, .*--retrain"):
        check_reusable(spec, retrain=False)
    check_reusable(spec, retrain=True)
    monkeypatch.setattr(ablations, "run_all", lambda *a, **k: pytest.fail("trained although the settings differ"))
    assert main(["--output_root", str(tmp_path), "--runs", "full", "--seeds", "1"]) == 2
    assert "was trained with other settings" in capsys.readouterr().err
    assert not (tmp_path / "ablations.md").exists()


def test_a_run_of_an_older_base_config_is_refused_and_a_bad_override_stops_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = plan_runs(tmp_path, ["no_memory"], [2], [], resolve=True)[0]
    assert spec.config["training"]["seed"] == 2 and spec.config["model"]["use_memory"] is False
    assert "evaluation" not in spec.config and "wandb" not in spec.config  # they do not change the weights
    older = json.loads(json.dumps(spec.config))
    older["model"]["hidden_size"] += 32  # the base config was edited since the run was trained
    spec.run_dir.mkdir(parents=True)
    record = {"variant": "no_memory", "overrides": spec.training_overrides, "config": older}
    (spec.run_dir / ablations.RECORD).write_text(json.dumps(record))
    with pytest.raises(ablations.ConfigError, match=r"configs/bitmar_tiny.yaml changed: model.hidden_size\)"):
        check_reusable(spec, retrain=False)
    record["config"] = json.loads(json.dumps(spec.config))
    (spec.run_dir / ablations.RECORD).write_text(json.dumps(record))
    check_reusable(spec, retrain=False)  # same settings: reused
    monkeypatch.setattr(ablations, "run_all", lambda *a, **k: pytest.fail("trained with a bad override"))
    assert main(["--output_root", str(tmp_path / "bad"), "--set", "training.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0"], "expected a positive integer"),
        (["--jobs", "0"], "expected a positive integer"),
        (["--seed_base", "-1"], "seeds must lie in 0..4294967295"),
        (["--set", "training.seed=3"], "the seeds come from --seeds / --seed_base"),
        (["--set", "training.max_epochs"], "expected KEY=VALUE"),
        (["--runs", "no_such"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_unwritable_output_root_and_unknown_device_exit_2(
    unwritable_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["--output_root", str(unwritable_dir / "abl"), "--seeds", "1"]) == 2
    assert "--output_root" in capsys.readouterr().err
    assert main(["--output_root", str(tmp_path), "--device", "tpu"]) == 2
    assert "--device" in capsys.readouterr().err


def test_run_all_runs_jobs_at_once_and_keys_results_by_variant_and_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    active, peak, lock = [0], [0], threading.Lock()

    def fake_run_one(spec: Any, *args: Any) -> dict[str, Any]:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return {"training": {"status": "trained"}, "label": spec.label}

    monkeypatch.setattr(ablations, "run_one", fake_run_one)
    specs = plan_runs(tmp_path, ["full", "no_memory", "no_vision"], [0, 1], [])
    runs = ablations.run_all(specs, 2, "cpu", False, [])
    assert peak[0] == 2
    assert {v: sorted(r) for v, r in runs.items()} == {"full": [0, 1], "no_memory": [0, 1], "no_vision": [0, 1]}
    assert runs["no_vision"][1]["label"] == "no_vision/seed_1"


# ----------------------------------------------------------------------------------------------------------------
# End to end: the command on a tiny sample world
# ----------------------------------------------------------------------------------------------------------------

SMALL = [
    "data.sample.generate_if_missing=false",
    "data.use_local_narratives=false",
    "training.max_steps_per_epoch=3",  # after --quick's 10: the later override wins
    "training.max_epochs=3",
    "training.phase1_text.epochs=1",
    "training.phase2_alignment.epochs=1",
    "training.phase3_memory.epochs=1",
    "training.warmup_steps=2",
    "training.validation_batches=1",
    "wandb.log_every_n_steps=1000",
    "evaluation.tasks=[retrieval,minimal_pairs,episodic_recall]",
    "evaluation.retrieval_gallery_size=16",
    "evaluation.recall_sizes=[1,4]",
    "evaluation.batch_size=32",
]


@pytest.mark.slow
def test_two_seeds_of_two_variants_in_parallel_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = tmp_path / "data"
    generate_sample_dataset(
        data_dir,
        SampleDataConfig(seed=0, num_cc3m=300, num_local_narratives=2, num_text_lines=400, num_novel_episodes=8),
    )
    root = tmp_path / "ablations"
    argv = ["--quick", "--seeds", "2", "--seed_base", "3", "--runs", "full", "no_memory", "--jobs", "2"]
    argv += ["--output_root", str(root), "--set", f"data.data_dir={data_dir}"]
    argv += [a for o in SMALL for a in ("--set", o)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    md = (root / "ablations.md").read_text()
    assert md in printed
    record = json.loads((root / "ablations.json").read_text())
    assert record["seeds"] == [3, 4] and record["jobs"] == 2 and record["wall_seconds"] > 0
    for variant in ("full", "no_memory"):
        for seed in (3, 4):
            run = record["runs"][variant][str(seed)]
            assert run["training"]["status"] == "trained" and run["evaluation"]["status"] == "ok", run
            run_dir = root / variant / f"seed_{seed}"
            assert (run_dir / "evaluation" / "results.json").is_file()
            cfg = load_checkpoint(run_dir / "checkpoints" / "last.pt")["config"]
            assert cfg["training"]["seed"] == seed and cfg["training"]["max_steps_per_epoch"] == 3
            assert cfg["model"]["use_memory"] is (variant == "full")
    rows = {(r["task"], r["metric"]): r for r in record["table"]}
    r1 = rows[("retrieval", "image→text R@1")]
    assert set(r1["per_seed"]) == {"full", "no_memory"} and all(len(v) == 2 for v in r1["per_seed"].values())
    assert r1["aggregate"]["full"]["n"] == 2 and r1["aggregate"]["full"]["ci95"] is not None
    assert r1["comparisons"]["no_memory"]["n"] == 2 and r1["comparisons"]["no_memory"]["verdict"]
    assert rows[("episodic_recall", "N=4: exact match")]["aggregate"]["full"]["n"] == 2
    loss = rows[("training", "final validation loss")]
    assert loss["higher_is_better"] is False and loss["comparisons"]["no_memory"]["seeds"] == [3, 4]
    assert "| Task | Metric | full | no_memory | Reference (full) |" in md
    assert "| Task | Metric | Better | full − no_memory | verdict |" in md
    assert "| full | 4 | trained |" in md and "Wall time: " in md


# ----------------------------------------------------------------------------------------------------------------
# Two settings of one variant, paired by seed (ablation_compare)
# ----------------------------------------------------------------------------------------------------------------


def _evaluated_run(root: Path, seed: int, score: float, loss: float) -> None:
    run = root / "full" / f"seed_{seed}"
    (run / "evaluation").mkdir(parents=True)
    results = {"tasks": {"winoground": {"status": "ok", "headline": [
        {"metric": "group score", "value": score, "reference": 1 / 6},
    ]}}}  # fmt: skip
    (run / "evaluation" / "results.json").write_text(json.dumps(results))
    (run / "summary.json").write_text(json.dumps({"final_validation_loss": loss}))


def test_compare_pairs_two_settings_by_seed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bitmar.evaluation import ablation_compare

    a, b = tmp_path / "ordered", tmp_path / "bag"
    for seed, (sa, sb) in enumerate([(0.18, 0.01), (0.17, 0.01), (0.18, 0.00), (0.50, None)]):
        _evaluated_run(a, seed, sa, 1.16)
        if sb is not None:  # seed 3 only in A: not paired
            _evaluated_run(b, seed, sb, 1.16 + 0.01 * seed)
    rows, seeds = ablation_compare.compare(a, b)
    assert seeds == [0, 1, 2]
    group = next(r for r in rows if r["metric"] == "group score")
    diff = group["comparisons"]["B"]
    assert diff["n"] == 3 and diff["mean"] == pytest.approx((0.17 + 0.16 + 0.18) / 3)
    assert diff["verdict"] == "full better"  # printed as "A better"
    loss = next(r for r in rows if r["metric"] == "final validation loss")
    assert loss["comparisons"]["B"]["mean"] == pytest.approx(-0.01)
    out = tmp_path / "compare.md"
    assert ablation_compare.main([str(a), str(b), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text() and "| winoground | group score |" in printed and "A better" in printed
    assert "seeds 0, 1, 2" in printed


def test_compare_errors_name_the_root_and_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bitmar.evaluation import ablation_compare

    _evaluated_run(tmp_path / "a", 0, 0.1, 1.0)
    _evaluated_run(tmp_path / "b", 1, 0.1, 1.0)
    assert ablation_compare.main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert ablation_compare.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "share no seed" in capsys.readouterr().err
    (tmp_path / "empty" / "full").mkdir(parents=True)
    assert ablation_compare.main([str(tmp_path / "a"), str(tmp_path / "empty")]) == 2
    assert "holds no evaluated run" in capsys.readouterr().err
    _evaluated_run(tmp_path / "c", 0, 0.1, 1.0)
    taken = tmp_path / "a"  # --output names a directory: cannot be written as a file
    assert ablation_compare.main([str(tmp_path / "a"), str(tmp_path / "c"), "--output", str(taken)]) == 2
    assert "--output" in capsys.readouterr().err
    (tmp_path / "c" / "full" / "seed_0" / "evaluation" / "results.json").write_text("[]")
    assert ablation_compare.main([str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert "not a BitMar results object" in capsys.readouterr().err
