"""Runs that stay safe and exact: file modes, the run lock, orphaned temporaries, resume guards, gradient
accumulation at epoch ends, `--phase` with `--resume`, and signals during the post-training evaluation.

Training runs go through `train_bitmar.py`'s `main` in-process on the session's `small_world` (tests/conftest.py),
capped so that every epoch of every phase has 3 micro-batches (an odd number), which keeps each run to a few seconds.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from bitmar import fileio
from bitmar.config import config_to_dict, load_config, save_config
from bitmar.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from bitmar.infra.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bitmar.model import BitMar
from bitmar.pipeline import main
from bitmar.training.progress import Progress
from bitmar.training.resume import check_resumable_model, tokenizer_mismatch
from bitmar.training.rundir import LOCK_NAME, RunDirectoryBusy, RunLock, remove_orphaned_temp_files

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "bitmar_tiny.yaml")

# 3 phases x 1 epoch x 3 micro-batches of 8 (phase 1: 20 text blocks; phases 2-3: 2 caption + 1 text batch).
RUN = [
    "--config", TINY,
    "--max_epochs", "3",
    "--batch_size", "8",
    "--wandb", "disabled",
    "--set", "data.max_text_tokens=1408",
    "--set", "data.max_caption_samples=15",
    "--set", "data.validation_fraction=0.1",
    "--set", "training.warmup_steps=2",
    "--set", "training.validation_batches=1",
    "--set", "training.memory_episodes_per_write=8",
    "--set", "wandb.log_every_n_steps=1",
    "--set", "wandb.create_plots=false",
    "--set", "wandb.log_attention=false",
    "--set", "wandb.log_features=false",
    "--set", "attention_analysis.enabled=false",
    "--set", "evaluation.run_after_training=false",
]  # fmt: skip
ACCUM = ["--set", "training.gradient_accumulation_steps=2"]


def _train(world: Path, out: Path, *extra: str) -> int:
    return main([*RUN, "--set", f"data.data_dir={world}", "--output_dir", str(out), *extra])


def _records(out: Path) -> list[dict]:
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["Training/Loss"] for r in _records(out) if "Training/Loss" in r}


@contextmanager
def _bitmar_log() -> Iterator[list[str]]:
    """Messages of the `bitmar` logger (it does not propagate to pytest's caplog once main() set it up)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("bitmar")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------------------------------------------
# File modes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_writes_follow_the_umask(tmp_path: Path, mask: int, file_mode: int, dir_mode: int) -> None:
    from bitmar.infra.figures import save_figure

    with _umask(mask):
        assert fileio.current_umask() == mask
        text = fileio.atomic_write_text(tmp_path / "summary.json", "{}\n")
        ckpt = save_checkpoint({"model": {}, "config": {}, "progress": {}}, tmp_path / "checkpoints" / "last.pt")
        save_config(load_config(TINY), tmp_path / "config.yaml")
        folder = Path(fileio.mkdtemp(dir=tmp_path, prefix=".x.tmp-"))
        fd, tmp = fileio.mkstemp(dir=tmp_path, prefix=".y.", suffix=".tmp")
        os.close(fd)
        tok = train_tokenizer(["a b c d e f"] * 20, 300, tmp_path / "tok_a")
        save_tokenizer(tok, tmp_path / "tokenizer")  # through a temporary directory renamed into place
        import matplotlib.pyplot as plt

        plot = save_figure(plt.figure(), tmp_path / "plots" / "p.png")
    for path in (text, ckpt, tmp_path / "config.yaml", Path(tmp), tmp_path / "tokenizer" / "tokenizer.json", plot):
        assert _mode(path) == file_mode, path
    for path in (folder, tmp_path / "tokenizer"):
        assert _mode(path) == dir_mode, path


# ---------------------------------------------------------------------------------------------------------------
# Run lock
# ---------------------------------------------------------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from bitmar.training.rundir import RunLock
    RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
    """
)


@contextmanager
def _lock_holder(run_dir: Path) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_a_second_trainer_on_a_run_directory_fails_fast_naming_the_first(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    with _lock_holder(run) as holder:
        with pytest.raises(RunDirectoryBusy) as busy:
            RunLock(run).acquire()
        message = str(busy.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and "started 20" in message
        assert "--output_dir" in message
        started = time.time()
        no_data = ["--set", f"data.data_dir={tmp_path / 'none'}", "--set", "data.sample.generate_if_missing=false"]
        assert main(["--config", TINY, *no_data, "--output_dir", str(run)]) == 2
        assert time.time() - started < 10  # fails before building any data
        err = capsys.readouterr().err
        assert "in use by another trainer" in err and f"pid {holder.pid}" in err
    assert not (run / "tokenizer").exists() and not (run / "checkpoints").exists()


def test_a_stale_lock_from_a_killed_trainer_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with _lock_holder(run) as holder:
        holder.kill()  # SIGKILL: no chance to release; its record stays in the lock file
        holder.wait(timeout=30)
        dead_pid = holder.pid
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == dead_pid
    with _bitmar_log() as messages, RunLock(run):
        record = json.loads((run / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid()
    assert any("stale run lock" in m and f"pid {dead_pid}" in m for m in messages), messages
    assert (run / LOCK_NAME).read_text() == ""  # released cleanly: no record, no warning next time
    with _bitmar_log() as messages, RunLock(run):
        pass
    assert not any("stale" in m for m in messages)


def test_a_lock_recorded_on_another_host_is_not_taken_over(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 4242, "host": "elsewhere-node", "started": time.time()}))
    with pytest.raises(RunDirectoryBusy, match="another host.*pid 4242 on host elsewhere-node.*delete"):
        RunLock(tmp_path).acquire()


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path: Path, monkeypatch) -> None:
    import errno
    import fcntl

    def no_locks(*_args) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with _bitmar_log() as messages:
        lock = RunLock(tmp_path)
        lock.acquire()
        lock.release()
    assert any("no file locks" in m for m in messages), messages


# ---------------------------------------------------------------------------------------------------------------
# Orphaned temporary files
# ---------------------------------------------------------------------------------------------------------------


def test_orphaned_temporaries_are_removed_at_start_and_nothing_else(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "plots").mkdir()
    # What a SIGKILL during the atomic writes leaves: the writers' own temporary names.
    orphans = []
    for folder, prefix, suffix in (
        ("checkpoints", ".last.pt.", ".tmp"),
        ("checkpoints", ".bitmar_epoch_3.pt.", ".tmp"),
        ("", ".summary.json.", ".tmp"),
        ("", ".config.yaml.", ".tmp"),
        ("plots", ".loss_curves.", ".png"),
    ):
        fd, path = fileio.mkstemp(dir=run / folder, prefix=prefix, suffix=suffix)
        os.write(fd, b"x" * 1000)
        os.close(fd)
        orphans.append(Path(path))
    orphans.append(Path(fileio.mkdtemp(dir=run, prefix=".tokenizer.tmp-")))
    (orphans[-1] / "tokenizer.json").write_text("{}")
    keep = [run / "checkpoints" / "last.pt", run / "notes.tmp", run / ".keep.tmp", run / "checkpoints" / "my.pt.tmp"]
    keep += [run / "plots" / "loss_curves.png", run / ".tokenizer.lock"]
    for path in keep:
        path.write_text("user data")
    # A run that then stops on a config error still cleaned up first (under the lock).
    assert main(["--config", TINY, "--set", "model.memroy_size=3", "--output_dir", str(run)]) == 2
    assert not any(p.exists() for p in orphans), [p for p in orphans if p.exists()]
    assert all(p.read_text() == "user data" for p in keep)
    removed = [m for m in capsys.readouterr().err.splitlines() if "left behind by an interrupted write" in m]
    assert len(removed) == len(orphans)
    assert remove_orphaned_temp_files(run) == []


# ---------------------------------------------------------------------------------------------------------------
# Resume guards (no training needed)
# ---------------------------------------------------------------------------------------------------------------


def _fake_checkpoint(path: Path, world: Path) -> Path:
    cfg = load_config(TINY, [f"data.data_dir={world}"])
    torch.manual_seed(0)
    model = BitMar(cfg.model)
    payload = {"model": model.state_dict(), "config": config_to_dict(cfg), "progress": Progress().as_dict()}
    return save_checkpoint(payload, path)


def test_resume_with_a_shape_changing_set_is_refused_listing_the_keys(
    small_world: Path, tmp_path: Path, capsys
) -> None:
    ckpt = _fake_checkpoint(tmp_path / "ckpt.pt", small_world)
    out = tmp_path / "run"
    tiny = load_config(TINY).model
    argv = ["--resume", str(ckpt), "--output_dir", str(out), "--set", f"model.mlp_ratio={tiny.mlp_ratio / 2}"]
    assert main([*argv, "--set", f"model.memory_size={tiny.memory_size // 2}"]) == 2
    err = capsys.readouterr().err
    assert f"model.mlp_ratio: {tiny.mlp_ratio} -> {tiny.mlp_ratio / 2}" in err
    assert f"model.memory_size: {tiny.memory_size} -> {tiny.memory_size // 2}" in err
    assert "Drop those --set overrides" in err and "Traceback" not in err
    assert not (out / "tokenizer").exists()  # refused before any data work
    payload = load_checkpoint(ckpt)
    from bitmar.config import config_from_dict

    check_resumable_model(payload, config_from_dict(payload["config"], ["model.dropout=0.1"]))  # not a shape
    more = tiny.vision_num_tokens + 2
    with pytest.raises(CheckpointError, match=f"model.vision_num_tokens: {tiny.vision_num_tokens} -> {more}"):
        check_resumable_model(payload, config_from_dict(payload["config"], [f"model.vision_num_tokens={more}"]))


def test_tokenizer_mismatch_ignores_call_settings_and_counts_kept_ids(tmp_path: Path) -> None:
    a = train_tokenizer(["the cat sat on the mat"] * 30 + ["a dog ran"] * 20, 300, tmp_path / "a")
    b = train_tokenizer(["zebras quietly graze"] * 30, 300, tmp_path / "b")
    text = a.backend_tokenizer.to_str()
    a("some words", truncation=True, max_length=4)  # sets truncation on the backend: not a different tokenizer
    assert tokenizer_mismatch(text, a.backend_tokenizer.to_str()) is None
    difference = tokenizer_mismatch(text, b.backend_tokenizer.to_str())
    assert difference is not None and f"checkpoint's {len(a)}" in difference and "ids are kept" in difference


# ---------------------------------------------------------------------------------------------------------------
# Training runs: accumulation at epoch ends, exact resume, tokenizer on resume, --phase with --resume, signals
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted reference: accumulation 2 over 3 micro-batches per epoch, three phases."""
    out = tmp_path_factory.mktemp("full") / "run"
    assert _train(small_world, out, *ACCUM) == 0
    return out


@pytest.mark.slow
def test_a_partial_accumulation_at_an_epoch_end_is_stepped_not_leaked(full_run: Path) -> None:
    records = [r for r in _records(full_run) if "Training/Loss" in r]
    # 3 micro-batches with accumulation 2: one full step and one step on the last micro-batch, per epoch.
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["Training/Phase"] for r in records] == [1, 1, 2, 2, 3, 3]
    payload = load_checkpoint(full_run / "checkpoints" / "bitmar_epoch_1.pt")
    assert payload["progress"]["global_step"] == 2 and payload["schedule"]["step_count"] == 2
    assert all(state["step"] == 2 for state in payload["optimizer"]["state"].values())


@pytest.mark.slow
def test_resume_with_accumulation_reproduces_the_uninterrupted_run(
    small_world: Path, full_run: Path, tmp_path: Path
) -> None:
    expected = _losses(full_run)
    reference = load_checkpoint(full_run / "checkpoints" / "last.pt")["model"]
    # From the epoch checkpoint at the end of phase 1, into a new run directory.
    from_epoch = tmp_path / "from_epoch"
    assert _train(small_world, from_epoch, *ACCUM, "--resume", str(full_run / "checkpoints" / "bitmar_epoch_1.pt")) == 0
    # Mid-epoch: stop after step 3 (phase 2, after its first full accumulation), then continue.
    mid = tmp_path / "mid"
    assert _train(small_world, mid, *ACCUM, "--stop_after_steps", "3") == 0
    progress = load_checkpoint(mid / "checkpoints" / "last.pt")["progress"]
    assert (progress["phase"], progress["batch"], progress["global_step"]) == (2, 2, 3)
    assert _train(small_world, mid, *ACCUM, "--resume", "auto") == 0
    for out, first in ((from_epoch, 3), (mid, 1)):
        got = _losses(out)
        assert sorted(got) == list(range(first, 7)), out.name
        for step in got:
            assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"{out.name} step {step}"
        model = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
        assert all(torch.allclose(model[k], reference[k], rtol=1e-5, atol=1e-6) for k in reference), out.name


@pytest.mark.slow
def test_resume_into_a_new_directory_uses_the_checkpoints_tokenizer(
    small_world: Path, full_run: Path, tmp_path: Path
) -> None:
    ckpt = full_run / "checkpoints" / "bitmar_epoch_1.pt"
    stored = load_checkpoint(ckpt)["tokenizer"]
    # A vocabulary override would have trained another tokenizer here; the checkpoint's is restored instead.
    out = tmp_path / "new"
    assert (
        _train(small_world, out, "--resume", str(ckpt), "--set", "data.vocab_size=300", "--stop_after_steps", "4") == 0
    )
    restored = load_tokenizer(out / "tokenizer").backend_tokenizer.to_str()
    assert tokenizer_mismatch(stored, restored) is None
    assert tokenizer_mismatch(stored, load_checkpoint(out / "checkpoints" / "last.pt")["tokenizer"]) is None


@pytest.mark.slow
def test_resume_refuses_a_different_tokenizer_in_the_run_directory_or_at_tokenizer_path(
    small_world: Path, full_run: Path, tmp_path: Path, capsys
) -> None:
    ckpt = str(full_run / "checkpoints" / "bitmar_epoch_1.pt")
    other = train_tokenizer(["zebras quietly graze on the plain"] * 40, 300, tmp_path / "other" / "tokenizer")
    before = (tmp_path / "other" / "tokenizer" / "tokenizer.json").read_bytes()
    assert _train(small_world, tmp_path / "other", "--resume", ckpt) == 2
    err = capsys.readouterr().err
    assert "holds another tokenizer than the checkpoint's" in err and f"{len(other)} tokens" in err
    assert (tmp_path / "other" / "tokenizer" / "tokenizer.json").read_bytes() == before  # never retrained
    assert not (tmp_path / "other" / "checkpoints").exists()
    path = tmp_path / "other" / "tokenizer"
    assert _train(small_world, tmp_path / "third", "--resume", ckpt, "--set", f"data.tokenizer_path={path}") == 2
    assert "is not the tokenizer this checkpoint was trained with" in capsys.readouterr().err


@pytest.mark.slow
def test_phase_with_resume_starts_that_phase_from_the_checkpoints_weights(
    small_world: Path, full_run: Path, tmp_path: Path, capsys
) -> None:
    ckpt = full_run / "checkpoints" / "bitmar_epoch_1.pt"  # end of phase 1
    out = tmp_path / "phase3"
    # --max_epochs 1: phase 3 gets one epoch, as a fresh run started at phase 3 would.
    assert _train(small_world, out, *ACCUM, "--phase", "3", "--resume", str(ckpt), "--max_epochs", "1") == 0
    assert "starting phase 3 from the weights of" in capsys.readouterr().err
    records = _records(out)
    assert {r["Training/Phase"] for r in records if "Training/Phase" in r} == {3}
    # The weights are the checkpoint's: the run's first validation equals the reference's after epoch 1.
    initial = next(r for r in records if "Validation/loss" in r)
    after_epoch_1 = [r for r in _records(full_run) if "Validation/loss" in r][1]
    assert initial["Validation/loss"] == pytest.approx(after_epoch_1["Validation/loss"], rel=1e-6)
    payload = load_checkpoint(out / "checkpoints" / "last.pt")
    progress = payload["progress"]
    assert (progress["phase"], progress["global_step"], progress["epochs_done"]) == (3, 4, 2)
    assert payload["schedule"]["step_count"] == 2  # a fresh schedule: only this run's two steps
    assert all(state["step"] == 2 for state in payload["optimizer"]["state"].values())  # a fresh optimizer
    assert (out / "checkpoints" / "bitmar_epoch_2.pt").is_file()  # epoch numbering continues


@pytest.mark.slow
def test_sigterm_during_the_post_training_evaluation_stops_it(
    small_world: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import bitmar.evaluation

    finished = tmp_path / "evaluation_finished"

    def slow_evaluation(*_args, **_kwargs) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 60
        while time.time() < deadline:  # work that would otherwise run to the end
            time.sleep(0.05)
        finished.write_text("done")

    monkeypatch.setattr(bitmar.evaluation, "evaluate_after_training", slow_evaluation)
    out = tmp_path / "run"
    handler_before = signal.getsignal(signal.SIGTERM)
    started = time.time()
    code = _train(
        small_world, out, "--max_epochs", "1", "--set", "evaluation.run_after_training=true",
        "--set", "training.phase2_alignment.enabled=false", "--set", "training.phase3_memory.enabled=false",
    )  # fmt: skip
    assert code == 128 + signal.SIGTERM
    assert time.time() - started < 50 and not finished.exists()
    err = capsys.readouterr().err
    assert "during the post-training evaluation" in err and "checkpoints/last.pt and summary.json are saved" in err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["progress"]["epochs_done"] == 1
    assert (out / "summary.json").is_file()
    assert signal.getsignal(signal.SIGTERM) == handler_before
    assert (out / LOCK_NAME).read_text() == ""  # the lock was released on the way out


def test_a_run_directory_where_the_post_training_step_cannot_write_is_refused_before_training(
    unwritable_dir: Path,
) -> None:
    from bitmar.config import ConfigError
    from bitmar.pipeline import check_end_of_run_outputs

    cfg = load_config(None, ["evaluation.run_after_training=true"])
    with pytest.raises(ConfigError, match=r"post-training step writes into .*evaluation"):
        check_end_of_run_outputs(cfg, unwritable_dir / "run")
    cfg = load_config(None, ["evaluation.run_after_training=false", "export.after_training=true"])
    with pytest.raises(ConfigError, match=r"hf_export"):
        check_end_of_run_outputs(cfg, unwritable_dir / "run")
    check_end_of_run_outputs(load_config(None, ["evaluation.run_after_training=false"]), unwritable_dir / "run")
