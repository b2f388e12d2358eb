"""End-to-end runs of train_bitmar.py on the session's small sample world (`small_world`, tests/conftest.py; CPU).

Each run is a real subprocess of the user-facing command, shrunk with --set overrides so the file stays fast.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bitmar.infra.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = [
    "--config", "configs/bitmar_tiny.yaml",
    "--max_epochs", "3",
    "--batch_size", "8",
    "--set", "training.max_steps_per_epoch=4",
    "--set", "training.validation_batches=2",
    "--set", "training.warmup_steps=2",
    "--set", "training.memory_episodes_per_write=8",
    "--set", "wandb.log_every_n_steps=1",
    "--set", "attention_analysis.log_every_n_steps=2",
    "--set", "attention_analysis.viz_every_n_epochs=1",
    "--set", "data.validation_fraction=0.1",
    "--set", "evaluation.run_after_training=false",
]  # fmt: skip


def _env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "WANDB_SILENT": "true", "WANDB_MODE": "offline"})
    env.pop("WANDB_API_KEY", None)
    return env


def _train(data_dir: Path, out: Path, *extra: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "train_bitmar.py",
        *SMALL_RUN,
        "--set",
        f"data.data_dir={data_dir}",
        "--output_dir",
        str(out),
    ]
    return subprocess.run(
        [*cmd, *extra], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def _records(out: Path) -> list[dict]:
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["Training/Loss"] for r in _records(out) if "Training/Loss" in r}


@pytest.fixture(scope="module")
def tiny_run(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The module's one uninterrupted run (3 phases x 4 steps), wandb offline, evaluated after training. The artifact
    test checks what it writes; the resume test takes its losses and weights as the reference (neither the logging
    mode nor the evaluation after training touches training), so the file trains it once, not twice."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    result = _train(
        small_world,
        out,
        "--wandb",
        "offline",
        "--set",
        "evaluation.run_after_training=true",
        "--set",
        "evaluation.tasks=[retrieval,grounding,minimal_pairs]",
    )
    return out, result


@pytest.mark.slow
def test_tiny_run_writes_every_artifact(tiny_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = out / "checkpoints"
    for name in ("bitmar_epoch_1.pt", "bitmar_epoch_2.pt", "bitmar_epoch_3.pt", "best.pt", "last.pt"):
        assert (checkpoints / name).is_file(), name
    payload = load_checkpoint(checkpoints / "last.pt")
    for key in ("model", "optimizer", "schedule", "progress", "rng", "memory_store", "config", "tokenizer"):
        assert key in payload, key
    assert payload["progress"]["global_step"] == 12 and payload["progress"]["epochs_done"] == 3
    keys = {k for r in _records(out) for k in r}
    for category in ("Training/", "Validation/", "Memory/", "Attention/", "Features/", "Quantization/", "Gradients/"):
        assert any(k.startswith(category) for k in keys), f"no {category} metric"
    for key in ("Training/Loss", "Training/Learning_Rate", "Training/Tokens_per_s", "Validation/Perplexity",
                "Memory/Usage_Mean", "Memory/Active_Slots_Percentage", "Quantization/Compression_Ratio",
                "Gradients/Total_Norm"):  # fmt: skip
        assert key in keys, key
    _check_metric_names_and_values(out)
    plots = {p.name for p in (out / "plots").iterdir()}
    assert "loss_curves.png" in plots and "gradient_norms.png" in plots and "compression_ratio.png" in plots
    assert any(p.startswith("memory_slots_step_") for p in plots)
    assert any(p.startswith("quantization_step_") for p in plots)
    assert any(p.startswith("attention_decoder_step_") for p in plots)
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run directory missing"
    assert (out / "config.yaml").is_file() and (out / "logs" / "training.log").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_validation_loss"] < summary["initial_validation_loss"]
    assert "BitMar training summary" in result.stdout
    results = json.loads((out / "evaluation" / "results.json").read_text())
    for task in ("retrieval", "grounding", "minimal_pairs"):
        assert results["tasks"][task]["status"] == "ok", task


# The names of BitMar's original description (dashboards and scripts are built on them); the run logs more.
ORIGINAL_METRIC_NAMES = (
    "Training/Loss", "Training/Learning_Rate", "Training/Epoch", "Training/Step",
    "Memory/Usage_Mean", "Memory/Active_Slots_Percentage", "Memory/Analysis_Avg_Similarity",
    "Memory/Top_5_Slot_Access",
    "Attention/CrossModal_layer_0_Entropy", "Attention/Memory_Mean", "Attention/Memory_Entropy",
    "Features/Text_Mean", "Features/Text_Std", "Features/Text_Norm",
    "Features/Vision_Mean", "Features/Vision_Std", "Features/Vision_Norm", "Features/CrossModal_Similarity",
    "Quantization/Compression_Ratio",
    "Gradients/Total_Norm", "Gradients/Encoder_Norm", "Gradients/Decoder_Norm", "Gradients/Fusion_Norm",
)  # fmt: skip


def documented_name(key: str) -> str:
    """A logged metric name as the logging table of docs/training-and-logging.md writes it (layer names and ranks as
    placeholders)."""
    if key.startswith(("Summary/", "Evaluation/")):  # open-ended families, documented as one line each
        return {"Summary": "Summary/<key>", "Evaluation": "Evaluation/<task>/<metric>"}[key.split("/")[0]]
    key = re.sub(r"^Quantization/(WeightScale|Sparsity)_.+$", r"Quantization/\1_<layer>", key)
    key = re.sub(r"_layer_\d+_", "_layer_X_", key)
    return re.sub(r"_\d+$", "_N", key)


def _check_metric_names_and_values(out: Path) -> None:
    """Every original name is in metrics.jsonl, the metrics move as documented, and docs/training-and-logging.md
    lists every name."""
    records = _records(out)
    keys = {k for r in records for k in r if k != "step"}
    missing = [k for k in ORIGINAL_METRIC_NAMES if k not in keys]
    assert not missing, f"original metric names not logged: {missing}"
    config = load_checkpoint(out / "checkpoints" / "last.pt")["config"]
    from bitmar.bitnet import BitLinear
    from bitmar.config import config_from_dict
    from bitmar.model import BitMar

    cfg = config_from_dict(config)
    ternary = [n for n, m in BitMar(cfg.model).named_modules() if isinstance(m, BitLinear) and m.quantize]
    for layer in ternary:  # per-layer scale and sparsity of every ternary layer
        assert f"Quantization/WeightScale_{layer}" in keys and f"Quantization/Sparsity_{layer}" in keys, layer
    phase_of = {r["step"]: r["Training/Phase"] for r in records if "Training/Phase" in r}
    series = {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}
    # memory attention only with a readout (phase 3); the vision prefix from phase 2
    assert {phase_of[s] for s, _ in series["Attention/Memory_Mean"]} == {3}
    assert {phase_of[s] for s, _ in series["Attention/Vision_Prefix_Mean"]} >= {2, 3}
    # fusion: 0 before phase 3 (nothing reads its output), trained in phase 3
    fusion = dict(series["Gradients/Fusion_Norm"])
    assert all(v == 0.0 for s, v in fusion.items() if phase_of[s] < 3)
    assert any(v > 0.0 for s, v in fusion.items() if phase_of[s] == 3)  # caption batches (text ones: 0)
    # usage moves with what the memory does (not pinned at 1/K and 100%)
    usage = [v for _, v in series["Memory/Usage_Mean"]]
    assert len(set(usage)) > 1 and all(0 < v <= 1 for v in usage)
    assert all(0 < v <= 100 for _, v in series["Memory/Active_Slots_Percentage"])
    assert all(0 < v < 1 for _, v in series["Memory/Top_5_Slot_Access"])
    # whole-model compression ratio (as the evaluation reports), ternary layers alone under their own name
    whole = {v for _, v in series["Quantization/Compression_Ratio"]}
    assert len(whole) == 1 and 1.0 < whole.pop() < 16.0
    assert all(v == pytest.approx(16.0) for _, v in series["Quantization/Ternary_Compression_Ratio"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compression_ratio"] == pytest.approx(series["Quantization/Compression_Ratio"][0][1])
    # the logging section of the training docs names every metric the run wrote
    page = (REPO / "docs" / "training-and-logging.md").read_text()
    section = page[page.index("### Logged metrics") :]
    section = section[: section.index("\n## ")]
    undocumented = sorted({documented_name(k) for k in keys} - set(re.findall(r"`([^`]+)`", section)))
    assert not undocumented, f"metrics missing from docs/training-and-logging.md: {undocumented}"


@pytest.mark.slow
def test_resume_mid_epoch_reproduces_the_uninterrupted_loss_sequence(
    small_world: Path, tiny_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    (full, first), split = tiny_run, tmp_path / "split"
    assert first.returncode == 0, first.stderr[-3000:]
    # Step 6 is in the middle of phase 2's epoch (4 steps per epoch): stop there, then continue.
    stopped = _train(small_world, split, "--wandb", "disabled", "--stop_after_steps", "6")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    progress = load_checkpoint(split / "checkpoints" / "last.pt")["progress"]
    assert (progress["phase"], progress["batch"], progress["global_step"]) == (2, 2, 6)
    resumed = _train(small_world, split, "--wandb", "disabled", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    expected, got = _losses(full), _losses(split)
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"step {step}"
    a = load_checkpoint(full / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(split / "checkpoints" / "last.pt")["model"]
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(small_world: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "train_bitmar.py", *SMALL_RUN, "--set", f"data.data_dir={small_world}",
           "--set", "training.max_steps_per_epoch=400", "--output_dir", str(out), "--wandb", "disabled"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and "Training/Loss" in metrics.read_text()):
        time.sleep(0.5)
    assert proc.poll() is None, "training ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Continue with --resume auto" in stderr
    progress = load_checkpoint(out / "checkpoints" / "last.pt")["progress"]
    assert progress["global_step"] >= 1
    assert not list((out / "checkpoints").glob(".*.tmp")), "a temporary checkpoint file was left behind"


@pytest.mark.slow
def test_repeated_nonfinite_losses_stop_with_a_checkpoint(small_world: Path, tmp_path: Path, monkeypatch) -> None:
    import bitmar.training.objective as objective
    from bitmar.pipeline import main

    calls = {"n": 0}
    real_lm_loss = objective.lm_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_lm_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(objective, "lm_loss", poisoned)
    out = tmp_path / "run"
    argv = [*SMALL_RUN, "--set", f"data.data_dir={small_world}", "--set", "training.max_consecutive_nonfinite=3",
            "--output_dir", str(out), "--wandb", "disabled"]  # fmt: skip
    assert main(argv) == 1
    progress = load_checkpoint(out / "checkpoints" / "last.pt")["progress"]
    assert progress["consecutive_nonfinite"] == 3 and progress["skipped_nonfinite"] == 3
    assert progress["global_step"] == 2  # the two finite steps were taken, the poisoned ones skipped
    log = (out / "logs" / "training.log").read_text()
    assert "non-finite losses in a row" in log and "learning_rate" in log


@pytest.mark.slow
def test_a_single_nonfinite_loss_is_skipped_and_training_continues(
    small_world: Path, tmp_path: Path, monkeypatch
) -> None:
    import bitmar.training.objective as objective
    from bitmar.pipeline import main

    calls = {"n": 0}
    real_lm_loss = objective.lm_loss

    def poisoned_once(*args, **kwargs):
        calls["n"] += 1
        loss = real_lm_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(objective, "lm_loss", poisoned_once)
    out = tmp_path / "run"
    argv = [*SMALL_RUN, "--max_epochs", "1", "--set", f"data.data_dir={small_world}", "--set",
            "wandb.create_plots=false", "--set", "training.phase2_alignment.enabled=false",  # phase 1 alone
            "--set", "training.phase3_memory.enabled=false",
            "--output_dir", str(out), "--wandb", "disabled"]  # fmt: skip
    assert main(argv) == 0
    progress = load_checkpoint(out / "checkpoints" / "last.pt")["progress"]
    assert progress["skipped_nonfinite"] == 1 and progress["global_step"] == 3
    for value in load_checkpoint(out / "checkpoints" / "last.pt")["model"].values():
        assert torch.isfinite(value.float()).all()


def test_bad_config_and_missing_checkpoint_give_clear_errors(tmp_path: Path, capsys) -> None:
    from bitmar.pipeline import main

    assert main(["--config", "configs/bitmar_tiny.yaml", "--set", "model.memroy_size=3",
                 "--output_dir", str(tmp_path)]) == 2  # fmt: skip
    assert "did you mean 'model.memory_size'" in capsys.readouterr().err
    assert main(["--config", "configs/bitmar_tiny.yaml", "--resume", str(tmp_path / "nope.pt"),
                 "--output_dir", str(tmp_path)]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes_agree_and_log_once(small_world: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train_bitmar.py", *SMALL_RUN, "--max_epochs", "3", "--set", f"data.data_dir={small_world}",
           "--set", "training.max_steps_per_epoch=2", "--output_dir", str(out), "--wandb", "disabled",
           "--device", "cpu"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "parameters and memory identical on 2 ranks" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks_agree"] is True
    steps = [r["step"] for r in _records(out) if "Training/Loss" in r]
    assert steps == sorted(set(steps)) and len(steps) == 6  # one record per step: only rank 0 logs
    assert result.stdout.count("BitMar training summary") == 1
