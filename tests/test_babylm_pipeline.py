"""The BabyLM 2025 evaluation pipeline on a BitMar export: Hugging Face conventions, every pipeline path, the runner.

The pipeline's own code (babylm/evaluation-pipeline-2025, commit bf55c11) comes from the shared archive
(../shared/third_party/) or a checkout named by BITMAR_BABYLM_PIPELINE; its modules run in this process (what
`python -m MODULE ARGS` runs, with the arguments scripts/run_babylm_pipeline.py builds) on tiny synthetic data in
each task's format, against one tiny export with a DINOv2 backbone. Zero-shot choices are compared with the
evaluation suite's scorer (`score_sequences`, `score_sentences`) on the same items.

The separate-environment run (transformers 4.51.3, no bitmar, a process per task: 5-7 minutes) is the slow test at
the end; it runs when BITMAR_BABYLM_PIPELINE_VENV names that environment (scripts/run_babylm_pipeline.py --setup).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from test_export import make_checkpoint, training_model

from bitmar.evaluation.context import score_sequences
from bitmar.export import export_checkpoint, score_sentences

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "third_party" / "babylm-evaluation-pipeline-2025-bf55c11.tar.gz"
SCRIPT = REPO / "scripts" / "run_babylm_pipeline.py"
PIPELINE_DEPS = ("datasets", "pandas", "scipy", "sklearn", "statsmodels", "nlopt", "aiohttp")


def load_script() -> Any:
    spec = importlib.util.spec_from_file_location("run_babylm_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_babylm_pipeline"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


runner = load_script()


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny packed float32 export with a tiny random DINOv2 (32-d features), its training model and loaders."""
    root = tmp_path_factory.mktemp("babylm_export")
    torch.manual_seed(1)
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=224, patch_size=14
    )
    transformers.Dinov2Model(config).save_pretrained(root / "dinov2")
    ckpt = make_checkpoint(root / "run", ("model.vision_encoder_dim=32",))
    path = export_checkpoint(
        ckpt, root / "bitmar_tiny", packed=True, vision_backbone=str(root / "dinov2"), dtype="float32"
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    processor = transformers.AutoProcessor.from_pretrained(path, trust_remote_code=True)
    return {"path": path, "reference": training_model(ckpt), "model": model, "processor": processor}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the pipeline with BitMar's DevBench class installed and sample data in every format."""
    missing = [name for name in PIPELINE_DEPS if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the pipeline's dependencies {missing} are not installed here (pip install -r requirements.txt)")
    target = tmp_path_factory.mktemp("babylm") / "pipeline"
    source = os.environ.get("BITMAR_BABYLM_PIPELINE")
    if source:
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(".venv", "results", "evaluation_data", ".git"))
    elif ARCHIVE.is_file():
        runner.extract_pipeline(ARCHIVE, target)
    else:
        pytest.skip(f"no BabyLM 2025 pipeline: neither {ARCHIVE} nor BITMAR_BABYLM_PIPELINE=<checkout> is there")
    runner.check_pipeline(target)
    runner.install_devbench(target)
    runner.write_sample_data(target / "evaluation_data" / "full_eval")
    yield target
    for name in [m for m in sys.modules if m == "evaluation_pipeline" or m.startswith("evaluation_pipeline.")]:
        del sys.modules[name]  # the next module's pipeline copy must not reuse these


@pytest.fixture
def run_pipeline(pipeline: Path, export: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Run one task's commands in this process, from the checkout, as `python -m MODULE ARGS` would."""
    import datasets

    monkeypatch.chdir(pipeline)
    monkeypatch.syspath_prepend(str(pipeline))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setenv("PYTHONHASHSEED", os.environ.get("PYTHONHASHSEED", "0"))  # finetune's seed_everything sets it
    states = (torch.random.get_rng_state(), random.getstate(), np.random.get_state())
    opts = runner.Options(
        export=export["path"],
        eval_dir=pipeline / "evaluation_data" / "full_eval",
        batch_size=4,
        images={
            task: str(pipeline / "evaluation_data" / "full_eval" / runner.SAMPLE_IMAGES / task)
            for task in ("vqa", "winoground")
        },
        finetune_epochs=1,
        finetune_batch_size=4,
        aoa_debug=True,
    )

    def run(task: str) -> runner.Options:
        for module, *args in runner.task_commands(task, opts):
            monkeypatch.setattr(sys, "argv", [module, *args])
            try:
                with torch.no_grad() if task not in runner.FINETUNE else torch.enable_grad():
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as stop:
                assert stop.code in (None, 0), f"{module} exited with {stop.code}"
        return opts

    yield run
    torch.random.set_rng_state(states[0])
    random.setstate(states[1])
    np.random.set_state(states[2])


def results_dir(pipeline: Path) -> Path:
    return pipeline / "results" / "bitmar_tiny" / "main"


def pipeline_items(pipeline: Path, task: str, data_path: Path, images: str | None = None) -> list[dict[str, Any]]:
    """The items as the pipeline decodes them (same files, same order)."""
    from evaluation_pipeline.sentence_zero_shot.read_files import read_files

    args = argparse.Namespace(
        data_path=data_path,
        task=task,
        full_sentence_scores=False,
        images_path=images,
        image_split={"vqa": "validation", "winoground": "test"}.get(task),
    )
    return read_files(args)


def completion_start(tokenizer: Any, sentence: str, completion: str) -> tuple[list[int], int]:
    """Token ids of `sentence` (BOS first) and the first position whose token overlaps `completion` (its suffix)."""
    enc = tokenizer(sentence, return_offsets_mapping=True)
    start_char = len(sentence) - len(completion)
    first = next(i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > start_char)
    return enc["input_ids"], max(first, 1)


def reference_choices(export: dict[str, Any], items: list[dict[str, Any]]) -> list[int]:
    """argmax over each item's candidates of the summed log-probability of the completion's tokens, by the evaluation
    suite's scorer on the training model (pictures through the export's DINOv2, as its pixel_values path)."""
    tokenizer = export["processor"].tokenizer
    choices = []
    for item in items:
        pairs = zip(item["sentences"], item["completions"], strict=True)
        seqs, starts = zip(*(completion_start(tokenizer, s, c) for s, c in pairs), strict=True)
        features = None
        if "image" in item:
            pixels = export["processor"](images=item["image"], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                features = export["model"].image_features(pixels).expand(len(seqs), -1)
        scores, _ = score_sequences(
            export["reference"],
            list(seqs),
            pad_id=tokenizer.pad_token_id,
            batch_size=8,
            device=torch.device("cpu"),
            vision_features=features,
            score_from=list(starts),
        )
        choices.append(int(scores.argmax()))
    return choices


def check_choices(pipeline: Path, export: dict[str, Any], task: str, folder: str, images: str | None = None) -> None:
    """The pipeline finished, wrote its report and predictions, and chose what the evaluation suite chooses."""
    out = results_dir(pipeline) / "zero_shot" / "causal" / task / folder
    assert (out / "best_temperature_report.txt").read_text().strip()
    predictions = json.loads((out / "predictions.json").read_text())
    items = pipeline_items(pipeline, task, pipeline / "evaluation_data" / "full_eval" / folder, images)
    expected: dict[str, list[str]] = {}
    for item, choice in zip(items, reference_choices(export, items), strict=True):
        chosen = item["sentences" if task == "comps" else "completions"][choice]
        expected.setdefault(item["UID"], []).append(chosen)
    got = {uid: [p["pred"] for p in value["predictions"]] for uid, value in predictions.items()}
    assert got == expected


# ------------------------------------------------------------------------------------------------- HF conventions


def test_export_follows_hf_conventions(export: dict[str, Any]) -> None:
    """AutoModel (last_hidden_state), hidden states, return_dict, labels -> loss, config names, token types."""
    path, model, processor = export["path"], export["model"], export["processor"]
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=True)
    reference = export["reference"]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        reference.config.hidden_size,
        len(reference.decoder.blocks),
        reference.decoder.blocks[0].attn.num_heads,
    )
    base = transformers.AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    assert type(base).__name__ == "BitMarModel"
    enc = processor(text=["the cat sat on the mat", "a dog"], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pixels = processor(images=[_picture(0), _picture(1)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids, output_hidden_states=True)
        hidden = base(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_hidden_states=True)
        # The base model is the causal LM without its head (and without the vision copy path, which adds to the
        # logits); hidden states: embeddings + one per decoder block.
        head = reference.lm_logits(hidden.last_hidden_state)
        if reference.vision_pointer is not None:
            vision_tokens, _ = reference.encode_vision(model.image_features(pixels))
            head = head + reference.vision_copy_log_probs(hidden.last_hidden_state, vision_tokens)
        assert torch.equal(head, out.logits)
        assert len(out.hidden_states) == len(reference.decoder.blocks) + 1 == len(hidden.hidden_states)
        assert all(h.shape == (2, ids.shape[1], config.hidden_size) for h in out.hidden_states)
        assert torch.equal(out.hidden_states[-1], hidden.last_hidden_state)
        assert torch.equal(out.hidden_states[0], reference.embed_tokens(ids))
        assert torch.allclose(out.loss, reference_loss(out.logits, ids, mask))
        loss, logits, states = model(
            input_ids=ids, attention_mask=mask, labels=ids, output_hidden_states=True, return_dict=False
        )
        assert torch.equal(logits, model(input_ids=ids, attention_mask=mask).logits) and len(states) == len(
            out.hidden_states
        )
        assert isinstance(base(input_ids=ids, attention_mask=mask, return_dict=False), tuple)
        # The fine-tuning path's --causal mask (B, T, T) means the same as the padding mask; other 3-d masks refused.
        causal = mask[:, None, :].repeat(1, ids.shape[1], 1).tril()
        plain = base(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.equal(base(input_ids=ids, attention_mask=causal).last_hidden_state, plain)
        with pytest.raises(ValueError, match="causal"):
            base(input_ids=ids, attention_mask=mask[:, None, :].repeat(1, ids.shape[1], 1))
        # Processor outputs with token types (what GIT-style callers ask for) are accepted as they come.
        typed = processor(text=["the cat"], images=[_picture(2)], return_token_type_ids=True, return_tensors="pt")
        assert "token_type_ids" in typed
        model(**typed, labels=typed["input_ids"])


def reference_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _picture(seed: int) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 50, 3)).astype("uint8"))


# ------------------------------------------------------------------------------------------------- pipeline paths


@pytest.mark.parametrize("task", list(runner.ZERO_SHOT))
def test_zero_shot_text_tasks_choose_as_the_evaluation_suite(
    task: str, run_pipeline: Any, pipeline: Path, export: dict[str, Any]
) -> None:
    run_pipeline(task)
    name, folder = runner.ZERO_SHOT[task]
    check_choices(pipeline, export, name, folder)
    if task == "blimp":  # whole sentences: the export's minimal-pair scorer agrees too
        tokenizer = export["processor"].tokenizer
        items = pipeline_items(pipeline, "blimp", pipeline / "evaluation_data" / "full_eval" / folder)
        good = score_sentences(export["model"], tokenizer, [i["sentences"][0] for i in items])
        bad = score_sentences(export["model"], tokenizer, [i["sentences"][1] for i in items])
        assert [0 if g >= b else 1 for g, b in zip(good, bad, strict=True)] == reference_choices(export, items)


@pytest.mark.parametrize("task", list(runner.MULTIMODAL))
def test_vqa_and_winoground_with_pictures(task: str, run_pipeline: Any, pipeline: Path, export: dict[str, Any]) -> None:
    opts = run_pipeline(task)
    check_choices(pipeline, export, task, runner.MULTIMODAL[task][0], images=opts.images[task])


def test_reading(run_pipeline: Any, pipeline: Path, export: dict[str, Any]) -> None:
    run_pipeline("reading")
    out = results_dir(pipeline) / "zero_shot" / "causal" / "reading"
    assert "EYE TRACKING SCORE" in (out / "report.txt").read_text()
    rows = [json.loads(line) for line in (out / "prediction.jsonl").read_text().splitlines()]
    tokenizer, checked = export["processor"].tokenizer, 0
    for row in rows:
        target = tokenizer(row["Word"], add_special_tokens=False)["input_ids"]
        if len(target) != 1:
            continue  # multi-token words chain several calls; single-token ones pin the surprisal down
        ids = torch.tensor([tokenizer(row["Sentence"])["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(export["reference"](ids, return_latents=False).logits[0, -1].float(), dim=-1)
        assert row["Logprob"] == pytest.approx(-float(logp[target[0]]), rel=1e-4, abs=1e-4)
        checked += 1
    assert checked >= 5


def test_age_of_acquisition(run_pipeline: Any, pipeline: Path, export: dict[str, Any]) -> None:
    run_pipeline("aoa")
    data = json.loads((results_dir(pipeline) / "zero_shot" / "causal" / "AoA_word" / "surprisal.json").read_text())
    results = data["results"]
    assert data["metadata"]["completed_steps"] == 5 and len(results) == 5 * 9  # 5 checkpoint names (--debug) x 9
    tokenizer = export["processor"].tokenizer
    for row in results[:9]:
        context = row["context"].strip() + " "
        ids, start = completion_start(tokenizer, context + row["target_word"], row["target_word"])
        score, _ = score_sequences(
            export["reference"],
            [ids],
            pad_id=tokenizer.pad_token_id,
            batch_size=1,
            device=torch.device("cpu"),
            score_from=[start],
        )
        assert row["surprisal"] == pytest.approx(-float(score[0]), rel=1e-4, abs=1e-4)  # NaN when scoring failed


def test_devbench_with_the_bitmar_model_class(run_pipeline: Any, pipeline: Path, export: dict[str, Any]) -> None:
    run_pipeline("devbench")
    out = results_dir(pipeline) / "zero_shot" / "devbench"
    text = (out / "results.txt").read_text()
    assert "Visual Vocabulary Accuracy" in text and "TROG Accuracy" in text and "Things Spearman" in text
    sims = np.load(out / "lex-viz_vocab.npy")
    assert sims.shape == (2, 4, 1)
    # Each score is the GIT/Flamingo class's: minus the mean loss of the caption prompt given the picture.
    from PIL import Image

    assets = pipeline / "evaluation_data" / "full_eval" / "devbench" / "assets" / "lex-viz_vocab"
    manifest = (assets / "manifest.csv").read_text().splitlines()[1].split(",")
    prompt = f"The caption for this image is: {manifest[4]}."
    processor, model = export["processor"], export["model"]
    for k in range(4):
        enc = processor(images=Image.open(assets / manifest[k]).convert("RGB"), text=prompt, return_tensors="pt")
        with torch.no_grad():
            loss = model(**enc, labels=enc["input_ids"]).loss
        assert sims[0, k, 0] == pytest.approx(-float(loss), rel=1e-4, abs=1e-5)
    things = np.load(out / "sem-things.npy")
    assert things.shape == (4, export["reference"].config.hidden_size) and np.isfinite(things).all()


def test_finetuning_one_epoch(run_pipeline: Any, pipeline: Path) -> None:
    run_pipeline("rte")
    out = results_dir(pipeline) / "finetune" / "rte"
    metrics = dict(line.split(": ") for line in (out / "results.txt").read_text().splitlines())
    assert set(metrics) == {"accuracy", "f1", "mcc"}
    predictions = json.loads((out / "predictions.json").read_text())["rte"]["predictions"]
    assert len(predictions) == 4 and {p["pred"] for p in predictions} <= {0, 1}


# ------------------------------------------------------------------------------------------------- the runner script


def test_runner_plans_every_task_and_refuses_what_cannot_work(tmp_path: Path, export: dict[str, Any]) -> None:
    assert runner.expand_tasks(["all"]) == runner.GROUPS["all"] and set(runner.GROUPS["all"]) == set(runner.TASKS)
    assert runner.expand_tasks(["zero_shot", "blimp", "rte"]) == [*runner.GROUPS["zero_shot"], "rte"]
    with pytest.raises(runner.UsageError, match="unknown task"):
        runner.expand_tasks(["glue"])
    opts = runner.Options(export=export["path"], eval_dir=tmp_path)
    (finetune,) = runner.task_commands("rte", opts)
    assert finetune[0] == "evaluation_pipeline.finetune.run" and "--take_final" in finetune and "left" in finetune
    (vqa,) = runner.task_commands("vqa", opts)
    assert "--images_path=HuggingFaceM4/VQAv2" in vqa and "--batch_size=1" in vqa
    # An export without pictures cannot run the multimodal paths; a directory that is no export is refused.
    blind = tmp_path / "blind"
    blind.mkdir()
    config = json.loads((export["path"] / "config.json").read_text())
    (blind / "config.json").write_text(json.dumps({**config, "vision_backbone_config": None}))
    runner.check_export(blind, ["blimp", "rte"])
    with pytest.raises(runner.UsageError, match="--vision_backbone"):
        runner.check_export(blind, ["winoground"])
    (blind / "config.json").write_text(json.dumps({**config, "auto_map": {}}))
    with pytest.raises(runner.UsageError, match="AutoModel"):
        runner.check_export(blind, ["boolq"])
    with pytest.raises(runner.UsageError, match="not a checkout"):
        runner.check_pipeline(tmp_path)
    assert runner.main(["--pipeline", str(tmp_path), "--export", str(blind)]) == 2
    with pytest.raises(runner.UsageError, match="not empty"):
        runner.write_sample_data(blind)


@pytest.mark.slow
def test_every_path_in_the_pipelines_own_environment(tmp_path: Path, export: dict[str, Any]) -> None:
    """scripts/run_babylm_pipeline.py end to end: every task, a process each, in the pipeline's venv (transformers
    4.51.3, no bitmar). 5-7 min on 2 cores; set BITMAR_BABYLM_PIPELINE_VENV to that venv to run it, or to `auto`: a
    venv cached under ~/.cache/bitmar/ per pipeline archive, created (--setup, this torch version) when missing."""
    venv = os.environ.get("BITMAR_BABYLM_PIPELINE_VENV")
    if not venv:
        pytest.skip(
            "BITMAR_BABYLM_PIPELINE_VENV is not set (a venv made by scripts/run_babylm_pipeline.py --setup, or auto)"
        )
    if not ARCHIVE.is_file() and not os.environ.get("BITMAR_BABYLM_PIPELINE"):
        pytest.skip(f"no BabyLM 2025 pipeline: neither {ARCHIVE} nor BITMAR_BABYLM_PIPELINE=<checkout> is there")
    setup: list[str] = []
    if venv == "auto":
        key = hashlib.sha256(ARCHIVE.read_bytes()).hexdigest()[:12] if ARCHIVE.is_file() else "checkout"
        venv = str(Path.home() / ".cache" / "bitmar" / f"babylm-pipeline-venv-{key}")
        if not runner.venv_python(Path(venv)).exists():  # the pipeline's requirements, this machine's torch build
            setup = ["--setup", "--torch", f"torch=={torch.__version__.split('+')[0]}"]
    pipeline = tmp_path / "pipeline"
    source = ["--archive", str(ARCHIVE)] if ARCHIVE.is_file() else []
    if not source:
        shutil.copytree(
            os.environ["BITMAR_BABYLM_PIPELINE"], pipeline, ignore=shutil.ignore_patterns(".venv", "results", ".git")
        )
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--pipeline",
        str(pipeline),
        *source,
        "--venv",
        venv,
        "--export",
        str(export["path"]),
        "--write_sample_data",
        "--tasks",
        "all",
        "--batch_size",
        "4",
        "--finetune_epochs",
        "1",
        "--finetune_batch_size",
        "4",
        "--aoa_debug",
        *setup,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(runner.TASKS)} tasks finished, 0 failed" in result.stdout
    out = pipeline / "results" / "bitmar_tiny" / "main"
    for task, (name, folder) in runner.ZERO_SHOT.items():
        assert (out / "zero_shot" / "causal" / name / folder / "predictions.json").is_file(), task
    for task, (folder, _, _) in runner.MULTIMODAL.items():
        assert (out / "zero_shot" / "causal" / task / folder / "predictions.json").is_file(), task
    assert (out / "zero_shot" / "causal" / "reading" / "report.txt").is_file()
    surprisals = json.loads((out / "zero_shot" / "causal" / "AoA_word" / "surprisal.json").read_text())["results"]
    assert surprisals and all(np.isfinite(row["surprisal"]) for row in surprisals)  # AoA turns errors into NaN
    assert (out / "zero_shot" / "devbench" / "results.txt").is_file()
    for task in runner.FINETUNE:
        assert (out / "finetune" / task / "predictions.json").is_file(), task
