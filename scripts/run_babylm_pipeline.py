"""Run the BabyLM 2025 evaluation pipeline (babylm/evaluation-pipeline-2025) on a BitMar export.

    python scripts/run_babylm_pipeline.py --pipeline PIPELINE_DIR --export EXPORT_DIR --tasks zero_shot multimodal
        [--venv DIR] [--setup [--torch SPEC]] [--eval_dir DIR] [--archive TAR.GZ] [--dry_run]

Every task runs the pipeline's own module in the pipeline's own environment (a venv with its requirements.txt:
transformers 4.51.3, no `bitmar` package), from the checkout's root, with the arguments its shell scripts use:

    zero_shot   = blimp supplement ewok entity_tracking wug_adj wug_past comps reading   (eval_zero_shot.sh)
    multimodal  = vqa winoground devbench                                                 (eval_multimodal.sh)
    finetune    = boolq multirc rte wsc mrpc qqp mnli                                     (eval_finetuning.sh)
    aoa         = the age-of-acquisition surprisals                                        (eval_aoa.sh)
    all         = every task above

Environment: `--venv` (default PIPELINE_DIR/.venv) is checked before anything runs: its transformers must be the
version the pipeline pins, and `import bitmar` should fail there (a warning otherwise: a participant's environment
does not have it). `--setup` creates or completes it (`python -m venv` + `pip install -r requirements.txt`);
`--torch SPEC` replaces the pipeline's torch pin (torch==2.7.0, the CUDA build on Linux) for example with
`torch==2.13.0` on a CPU-only machine whose index serves the CPU build.

Data: the pipeline's evaluation data under --eval_dir (default PIPELINE_DIR/evaluation_data/full_eval, where the
pipeline's README puts it; DevBench reads it from there whatever --eval_dir says). `--write_sample_data` writes tiny
synthetic files in every task's format there instead (a smoke test; refused if the directory holds anything), so
every path can be exercised offline; VQA and Winoground then read their pictures from local image datasets written
next to the data instead of HuggingFaceM4/VQAv2 and facebook/winoground.

BitMar specifics: DevBench runs with `--model_type bitmar`, a model class shipped in scripts/babylm2025/ that this
script installs into the checkout (see `install_devbench`); fine-tuning reads the LAST real token's hidden state
(`--take_final --padding_side left`): BitMar's decoder is causal, so the first token (BOS, the pipeline's default)
has seen nothing of the input. Results land where the pipeline writes them: PIPELINE_DIR/results/<export name>/.
Exit status: 0 when every task finished, 1 when one failed (the rest still run), 2 for unusable arguments.

One module because it runs without the bitmar package and `--write_sample_data` runs this very file by path in the
pipeline's venv (runpy), so the task table, the checks and the sample writer travel together.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEVBENCH_CLASS = HERE / "babylm2025" / "bitmar_devbench.py"
DEVBENCH_MARKER = "# BitMar: added by scripts/run_babylm_pipeline.py"
DEVBENCH_BRANCH = f"""    elif args.model_type == "bitmar":  {DEVBENCH_MARKER}
        from evaluation_pipeline.devbench.model_classes.bitmar import BitMarEvalModel
        from transformers import AutoProcessor, AutoModelForCausalLM

        eval_model = BitMarEvalModel(
            model=AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True),
            processor=AutoProcessor.from_pretrained(args.model, trust_remote_code=True),
        )

"""
DEVBENCH_ANCHOR = '    model_name = args.model.split("/")[-1]\n'

ZERO_SHOT = {  # task name -> (the pipeline's --task, data folder under eval_dir), as eval_zero_shot.sh runs them
    "blimp": ("blimp", "blimp_filtered"),
    "supplement": ("blimp", "supplement_filtered"),
    "ewok": ("ewok", "ewok_filtered"),
    "entity_tracking": ("entity_tracking", "entity_tracking"),
    "wug_adj": ("wug_adj", "wug_adj_nominalization"),
    "wug_past": ("wug_past", "wug_past_tense"),
    "comps": ("comps", "comps"),
}
MULTIMODAL = {  # task -> (data folder, image dataset, split), as eval_multimodal.sh runs them
    "vqa": ("vqa_filtered", "HuggingFaceM4/VQAv2", "validation"),
    "winoground": ("winoground_filtered", "facebook/winoground", "test"),
}
FINETUNE = {  # task -> (num_labels, batch size, epochs, metric_for_valid, metrics), as eval_finetuning.sh runs them
    "boolq": (2, 16, 10, "accuracy", ("accuracy", "f1", "mcc")),
    "multirc": (2, 16, 10, "accuracy", ("accuracy", "f1", "mcc")),
    "rte": (2, 32, 10, "accuracy", ("accuracy", "f1", "mcc")),
    "wsc": (2, 32, 30, "accuracy", ("accuracy", "f1", "mcc")),
    "mrpc": (2, 32, 10, "f1", ("accuracy", "f1", "mcc")),
    "qqp": (2, 32, 10, "f1", ("accuracy", "f1", "mcc")),
    "mnli": (3, 32, 10, "accuracy", ("accuracy",)),
}
GROUPS = {
    "zero_shot": [*ZERO_SHOT, "reading"],
    "multimodal": [*MULTIMODAL, "devbench"],
    "finetune": list(FINETUNE),
    "aoa": ["aoa"],
}
GROUPS["all"] = [task for group in ("zero_shot", "multimodal", "aoa", "finetune") for task in GROUPS[group]]
TASKS = [*ZERO_SHOT, "reading", "aoa", *MULTIMODAL, "devbench", *FINETUNE]
SAMPLE_IMAGES = "sample_images"  # under eval_dir: the local image datasets of the sample data


class UsageError(ValueError):
    """Arguments, directories or an environment that cannot work; the message says what to do (exit 2)."""


@dataclass
class Options:
    """What the pipeline's commands need besides the task (see build_parser for each field's meaning)."""

    export: Path
    eval_dir: Path
    batch_size: int | None = None  # zero-shot text tasks: the pipeline's default (64) when None
    images: dict[str, str] = field(default_factory=dict)  # task -> image dataset (path or hub name)
    finetune_epochs: int | None = None  # None: the pipeline's (10, WSC 30)
    finetune_batch_size: int | None = None
    sequence_length: int = 512
    learning_rate: float = 3e-5
    seed: int = 42
    aoa_track: str = "non-strict-small"
    aoa_debug: bool = False


def expand_tasks(names: Sequence[str]) -> list[str]:
    """Task and group names -> tasks in a stable order, each once."""
    tasks: list[str] = []
    for name in names:
        members = GROUPS.get(name, [name])
        for task in members:
            if task not in TASKS:
                raise UsageError(f"unknown task {name!r}; choose from {TASKS} or the groups {sorted(GROUPS)}")
            if task not in tasks:
                tasks.append(task)
    return tasks


def task_commands(task: str, opts: Options) -> list[list[str]]:
    """The `python -m MODULE ARGS...` argument lists (module first) that run `task`, cwd = the pipeline checkout."""
    export = str(opts.export)
    if task in ZERO_SHOT:
        name, folder = ZERO_SHOT[task]
        cmd = ["evaluation_pipeline.sentence_zero_shot.run", "--model_path_or_name", export, "--backend", "causal"]
        cmd += ["--task", name, "--data_path", str(opts.eval_dir / folder), "--save_predictions"]
        return [cmd + (["--batch_size", str(opts.batch_size)] if opts.batch_size else [])]
    if task in MULTIMODAL:
        folder, images, split = MULTIMODAL[task]
        cmd = ["evaluation_pipeline.sentence_zero_shot.run", "--model_path_or_name", export, "--backend", "causal"]
        cmd += ["--task", task, "--data_path", str(opts.eval_dir / folder), "--save_predictions"]
        return [cmd + [f"--images_path={opts.images.get(task, images)}", f"--image_split={split}", "--batch_size=1"]]
    if task == "reading":
        data = str(opts.eval_dir / "reading" / "reading_data.csv")
        return [
            ["evaluation_pipeline.reading.run", "--model_path_or_name", export, "--backend", "causal"]
            + ["--data_path", data]
        ]
    if task == "aoa":
        cmd = ["evaluation_pipeline.AoA_word.run", "--model_name", export, "--backend", "causal"]
        cmd += ["--track_name", opts.aoa_track, "--word_path", str(opts.eval_dir / "cdi_childes" / "cdi_childes.json")]
        return [cmd + (["--debug"] if opts.aoa_debug else [])]
    if task == "devbench":
        return [["evaluation_pipeline.devbench.eval", "--model", export, "--model_type", "bitmar"]]
    labels, batch, epochs, valid_metric, metrics = FINETUNE[task]
    glue = opts.eval_dir / "glue_filtered"
    cmd = ["evaluation_pipeline.finetune.run", "--model_name_or_path", export]
    cmd += ["--train_data", str(glue / f"{task}.train.jsonl"), "--valid_data", str(glue / f"{task}.valid.jsonl")]
    cmd += ["--predict_data", str(glue / f"{task}.valid.jsonl"), "--task", task, "--num_labels", str(labels)]
    cmd += ["--batch_size", str(opts.finetune_batch_size or batch), "--learning_rate", str(opts.learning_rate)]
    cmd += ["--num_epochs", str(opts.finetune_epochs or epochs), "--sequence_length", str(opts.sequence_length)]
    cmd += ["--results_dir", "results", "--metrics", *metrics, "--metric_for_valid", valid_metric]
    cmd += ["--seed", str(opts.seed), "--verbose"]
    # BitMar is a causal decoder: the first token (BOS) has seen nothing of the input; classify from the last real
    # token (left padding puts it at position -1 for every row).
    return [cmd + ["--take_final", "--padding_side", "left"]]


def task_inputs(task: str, opts: Options) -> list[Path]:
    """Files or folders `task` reads (checked before running, so a missing download fails with its path)."""
    if task in ZERO_SHOT:
        return [opts.eval_dir / ZERO_SHOT[task][1]]
    if task in MULTIMODAL:
        return [opts.eval_dir / MULTIMODAL[task][0]]
    if task == "reading":
        return [opts.eval_dir / "reading" / "reading_data.csv"]
    if task == "aoa":
        return [opts.eval_dir / "cdi_childes" / "cdi_childes.json"]
    if task == "devbench":
        return []  # DevBench reads evaluation_data/full_eval/devbench under the checkout (checked in run_tasks)
    glue = opts.eval_dir / "glue_filtered"
    return [glue / f"{task}.train.jsonl", glue / f"{task}.valid.jsonl"]


# ------------------------------------------------------------------------------------------------- checks and setup


def extract_pipeline(archive: Path, target: Path) -> Path:
    """Unpack the pipeline's source archive (its single top folder becomes `target`)."""
    if target.exists():
        raise UsageError(f"--pipeline {target} exists; --archive only creates a new checkout")
    with tarfile.open(archive) as tar:
        tops = {Path(m.name).parts[0] for m in tar.getmembers() if m.name.strip("./")}
        if len(tops) != 1:
            raise UsageError(f"--archive {archive}: expected one top-level folder, found {sorted(tops)}")
        scratch = target.parent / f".{target.name}.extract"
        shutil.rmtree(scratch, ignore_errors=True)
        tar.extractall(scratch, filter="data")
    os.replace(scratch / tops.pop(), target)
    shutil.rmtree(scratch, ignore_errors=True)
    return target


def check_pipeline(pipeline: Path) -> None:
    if not (pipeline / "evaluation_pipeline" / "sentence_zero_shot" / "run.py").is_file():
        raise UsageError(
            f"--pipeline {pipeline} is not a checkout of babylm/evaluation-pipeline-2025 (no "
            "evaluation_pipeline/sentence_zero_shot/run.py); clone it or pass --archive with its source archive"
        )


def check_export(export: Path, tasks: Sequence[str]) -> None:
    """The export loads the way each chosen task loads it (AutoModel for fine-tuning, pictures for multimodal)."""
    try:
        config = json.loads((export / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(
            f"--export {export} holds no readable config.json ({err}); pass a BitMar export directory"
        ) from None
    if config.get("model_type") != "bitmar":
        raise UsageError(f"--export {export} is not a BitMar export (model_type {config.get('model_type')!r})")
    if any(task in FINETUNE for task in tasks) and "AutoModel" not in config.get("auto_map", {}):
        raise UsageError(
            f"--export {export} was written before exports registered AutoModel, which fine-tuning loads; re-export "
            "the checkpoint with this version (python -m bitmar.export ...)"
        )
    if any(task in MULTIMODAL or task == "devbench" for task in tasks) and not config.get("vision_backbone_config"):
        raise UsageError(
            f"--export {export} has no vision backbone, so VQA, Winoground and DevBench cannot give it pictures; "
            "re-export with --vision_backbone facebook/dinov2-base (or a local DINOv2 directory)"
        )


def pinned_version(pipeline: Path, package: str) -> str | None:
    for line in (pipeline / "requirements.txt").read_text(encoding="utf-8").splitlines():
        name, _, version = line.strip().partition("==")
        if name.lower() == package:
            return version
    return None


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def probe_venv(venv: Path) -> tuple[str | None, bool]:
    """(transformers version or None when the venv cannot import it, whether `import bitmar` works there)."""
    exe = venv_python(venv)
    if not exe.exists():
        return None, False
    code = (
        "import importlib.util, transformers, datasets, torch;"
        "print(transformers.__version__, importlib.util.find_spec('bitmar') is not None)"
    )
    result = subprocess.run([str(exe), "-c", code], capture_output=True, text=True, env=clean_env())
    if result.returncode != 0:
        return None, False
    version, has_bitmar = result.stdout.split()
    return version, has_bitmar == "True"


def setup_venv(pipeline: Path, venv: Path, python: str, torch_spec: str | None) -> None:
    """Create or complete the pipeline's venv with its requirements (torch pin replaced by `torch_spec`)."""
    if not venv_python(venv).exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    requirements = (pipeline / "requirements.txt").read_text(encoding="utf-8").splitlines()
    if torch_spec:
        requirements = [torch_spec if line.strip().lower().startswith("torch==") else line for line in requirements]
    pinned = venv / "bitmar-pipeline-requirements.txt"
    pinned.write_text("\n".join(requirements) + "\n", encoding="utf-8")
    subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "-r", str(pinned)], check=True)


def check_venv(pipeline: Path, venv: Path) -> None:
    version, has_bitmar = probe_venv(venv)
    wanted = pinned_version(pipeline, "transformers")
    if version is None:
        raise UsageError(
            f"--venv {venv} is missing or cannot import transformers / datasets / torch; create it with --setup "
            "(python -m venv + pip install -r PIPELINE/requirements.txt)"
        )
    if wanted and version != wanted:
        raise UsageError(f"--venv {venv} has transformers {version} but the pipeline pins {wanted}; rerun with --setup")
    if has_bitmar:
        print(
            f"warning: the bitmar package is importable in {venv}; the export's own code is used all the same, but "
            "a participant's pipeline environment does not have it",
            file=sys.stderr,
        )


def install_devbench(pipeline: Path) -> Path:
    """Copy BitMar's DevBench model class into the checkout and add its `--model_type bitmar` branch (idempotent)."""
    target = pipeline / "evaluation_pipeline" / "devbench" / "model_classes" / "bitmar.py"
    shutil.copyfile(DEVBENCH_CLASS, target)
    eval_py = pipeline / "evaluation_pipeline" / "devbench" / "eval.py"
    source = eval_py.read_text(encoding="utf-8")
    if DEVBENCH_MARKER not in source:
        if source.count(DEVBENCH_ANCHOR) != 1:
            raise UsageError(
                f"{eval_py} differs from the pipeline version this script knows (no single line "
                f"{DEVBENCH_ANCHOR.strip()!r}); add the branch by hand:\n{DEVBENCH_BRANCH}"
            )
        eval_py.write_text(source.replace(DEVBENCH_ANCHOR, DEVBENCH_BRANCH + DEVBENCH_ANCHOR), encoding="utf-8")
    return target


def clean_env() -> dict[str, str]:
    """This process's environment without what would leak the caller's Python setup into the pipeline's venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


# ------------------------------------------------------------------------------------------------- sample data


def write_sample_data(eval_dir: Path, seed: int = 0) -> dict[str, str]:
    """Tiny synthetic files in each task's format under `eval_dir` (a new or empty directory) and local image
    datasets for VQA / Winoground; returns {task: image dataset path} for those two. Needs numpy, pandas, scipy,
    pillow and datasets (the pipeline's environment has them)."""
    import numpy as np
    from PIL import Image

    if eval_dir.exists() and any(eval_dir.iterdir()):
        raise UsageError(f"{eval_dir} is not empty; sample data is only written into a new or empty directory")
    rng = np.random.default_rng(seed)

    def jsonl(path: Path, rows: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    def picture(i: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
        colour = rng.integers(0, 255, 3)
        pixels = np.clip(colour + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype("uint8")
        return Image.fromarray(pixels)

    animals = ["cat", "dog", "bird", "fish"]
    blimp = [
        {
            "sentence_good": f"the {a} sits on the mat",
            "sentence_bad": f"the {a} sit on the mat",
            "field": "morphology",
            "UID": "agreement",
            "linguistics_term": "s-v_agreement",
        }
        for a in animals
    ] + [
        {
            "sentence_good": f"a {a} is red",
            "sentence_bad": f"a {a} are red",
            "field": "syntax_semantics",
            "UID": "copula",
            "linguistics_term": "copula",
        }
        for a in animals[:2]
    ]
    jsonl(eval_dir / "blimp_filtered" / "agreement.jsonl", blimp[:4])
    jsonl(eval_dir / "blimp_filtered" / "copula.jsonl", blimp[4:])
    supplement = [{"sentence_good": f"is the {a} here?", "sentence_bad": f"the {a} here is?"} for a in animals[:3]]
    jsonl(eval_dir / "supplement_filtered" / "questions.jsonl", supplement)
    jsonl(
        eval_dir / "ewok_filtered" / "physical.jsonl",
        [
            {
                "Context1": f"the {a} is in the box.",
                "Context2": f"the {a} is on the box.",
                "Target1": "it is inside.",
                "Target2": "it is outside.",
                "Domain": "spatial",
                "ContextType": "plain",
                "ContextDiff": "preposition",
                "TargetDiff": "antonym",
            }
            for a in animals[:3]
        ],
    )
    jsonl(
        eval_dir / "entity_tracking" / "regular.jsonl",
        [
            {
                "input_prefix": f"the {a} is in box one. box one contains the",
                "options": [f" {a}", " ball", " shoe"],
                "numops": 1,
            }
            for a in animals[:3]
        ],
    )
    jsonl(
        eval_dir / "wug_adj_nominalization" / "wug_adj.jsonl",
        [
            {"sentences": f"the {w}ness of it\tthe {w}ity of it", "ratio": float(r)}
            for w, r in (("blick", 0.8), ("dax", 0.3), ("wug", 0.6), ("fep", 0.1))
        ],
    )
    jsonl(
        eval_dir / "wug_past_tense" / "wug_past.jsonl",
        [
            {"sentences": f"yesterday she {w}ed\tyesterday she {w}t", "ratio": float(r)}
            for w, r in (("blick", 0.9), ("dax", 0.4), ("wug", 0.7), ("fep", 0.2))
        ],
    )
    jsonl(
        eval_dir / "comps" / "comps_base.jsonl",
        [
            {"prefix_acceptable": f"a {a}", "prefix_unacceptable": f"a {b}", "property_phrase": "can sit on the mat."}
            for a, b in (("cat", "rock"), ("dog", "cloud"), ("bird", "shoe"))
        ],
    )
    # Reading: enough rows for the pipeline's regressions (16 terms with spillover); random human measures.
    words = "the cat sat on the mat and the dog ran to the park".split()
    rows = []
    for i in range(1, 28):
        k = i % (len(words) - 1) + 1
        rows.append(
            {
                "item": " ".join(words[:k]),
                "word": " " + words[k],
                "prev_item": " ".join(words[: k - 1]) if k > 1 else "",
                "prev_word": " " + words[k - 1] if k > 1 else "",
                "Subtlex_log10": float(rng.uniform(1, 5)),
                "length": len(words[k]),
                "context_length": k,
                "prev_length": len(words[k - 1]),
                **{
                    v: float(rng.normal(300, 50))
                    for v in ("RTfirstfix", "RTfirstpass", "RTgopast", "RTrightbound", "self_paced_reading_time")
                },
                **{v: float(rng.normal(0, 1)) for v in ("ELAN", "LAN", "N400", "P600", "EPNP", "PNP")},
            }
        )
    import pandas as pd

    (eval_dir / "reading").mkdir(parents=True)
    frame = pd.DataFrame(rows)
    frame.loc[frame["prev_item"] == "", ["prev_item", "prev_word"]] = None  # the first word has no previous one
    frame.to_csv(eval_dir / "reading" / "reading_data.csv", index=False)
    aoa = {w: [{"context": f"look at the {c}"} for c in ("little", "big", "red")] for w in ("dog", "ball", "cup")}
    (eval_dir / "cdi_childes").mkdir(parents=True)
    (eval_dir / "cdi_childes" / "cdi_childes.json").write_text(json.dumps(aoa), encoding="utf-8")
    # (Super)GLUE: every fine-tuning task's fields, a handful of rows each.
    glue_fields = {
        "boolq": lambda i: {"question": f"is the {animals[i % 4]} red?", "passage": f"the {animals[i % 4]} is red."},
        "multirc": lambda i: {"question": "what sat?", "answer": animals[i % 4], "paragraph": "the cat sat."},
        "rte": lambda i: {"sentence1": f"a {animals[i % 4]} sat.", "sentence2": "an animal sat."},
        "wsc": lambda i: {
            "span2_text": "it",
            "span1_text": animals[i % 4],
            "text": f"the {animals[i % 4]} ran. it sat.",
        },
        "mrpc": lambda i: {"sentence1": f"the {animals[i % 4]} sat.", "sentence2": f"a {animals[i % 4]} sat."},
        "qqp": lambda i: {"question1": f"where is the {animals[i % 4]}?", "question2": "where is it?"},
        "mnli": lambda i: {"premise": f"the {animals[i % 4]} sat.", "hypothesis": "it stood."},
    }
    for task, make in glue_fields.items():
        labels = FINETUNE[task][0]
        for split, n in (("train", 8), ("valid", 4)):
            jsonl(
                eval_dir / "glue_filtered" / f"{task}.{split}.jsonl",
                [{**make(i), "label": i % labels, "idx": i} for i in range(n)],
            )
    # VQA and Winoground: items plus local image datasets with the columns the pipeline reads.
    import datasets

    images_root = eval_dir / SAMPLE_IMAGES
    pictures = [picture(i) for i in range(4)]
    vqa_rows = [
        {
            "question": f"what colour is the {a}?",
            "target_ans": c,
            "distractors": [x for x in ("red", "blue", "green") if x != c],
            "idx_in_hf_dataset": i,
        }
        for i, (a, c) in enumerate(zip(animals[:3], ("red", "blue", "green"), strict=True))
    ]
    jsonl(eval_dir / "vqa_filtered" / "vqa.jsonl", vqa_rows)
    vqa_images = datasets.Dataset.from_dict(
        {"image": pictures[:3]}, features=datasets.Features({"image": datasets.Image()})
    )
    (images_root / "vqa").mkdir(parents=True)
    vqa_images.to_parquet(str(images_root / "vqa" / "validation-00000-of-00001.parquet"))
    wino_rows = [
        {
            "caption_0": f"a {a} on a {b}",
            "caption_1": f"a {b} on a {a}",
            "image_idx": i,
            "image_key": f"image_{i % 2}",
            "collapsed_tag": "Object",
            "tag": "Noun",
            "secondary_tag": "Order",
        }
        for i, (a, b) in enumerate((("cat", "mat"), ("dog", "box")))
    ]
    jsonl(eval_dir / "winoground_filtered" / "winoground.jsonl", wino_rows)
    features = datasets.Features({"image_0": datasets.Image(), "image_1": datasets.Image()})
    wino_images = datasets.Dataset.from_dict({"image_0": pictures[:2], "image_1": pictures[2:4]}, features=features)
    (images_root / "winoground").mkdir(parents=True)
    wino_images.to_parquet(str(images_root / "winoground" / "test-00000-of-00001.parquet"))
    # DevBench: the three tasks' manifests, pictures and human data, in the layout download_data.sh makes.
    import scipy.io

    devbench = eval_dir / "devbench"
    for name, trials in (("lex-viz_vocab", 2), ("gram-trog", 2)):
        folder = devbench / "assets" / name
        (folder / "images").mkdir(parents=True)
        manifest = []
        for t in range(trials):
            names = [f"images/t{t}_{k}.png" for k in range(4)]
            for k, rel in enumerate(names):
                picture(10 * t + k).save(folder / rel)
            manifest.append({**{f"image{k + 1}": rel for k, rel in enumerate(names)}, "text1": animals[t]})
        pd.DataFrame(manifest).to_csv(folder / "manifest.csv", index=False)
        (devbench / "evals" / name).mkdir(parents=True)
        human = []
        for t in range(trials):
            probs = rng.dirichlet(np.ones(4))
            row = {"text1": animals[t], "trial": t + 1, **{f"image{k + 1}": float(p) for k, p in enumerate(probs)}}
            human += [{**row, "age_bin": age} for age in (4, 7)] if name == "lex-viz_vocab" else [row]
        pd.DataFrame(human).to_csv(devbench / "evals" / name / "human.csv", index=False)
    things = devbench / "assets" / "sem-things"
    (things / "object_images_CC0").mkdir(parents=True)
    for k, a in enumerate(animals):
        picture(100 + k).save(things / "object_images_CC0" / f"{a}.png")
    pd.DataFrame({"text1": animals, "image1": [f"object_images_CC0/{a}.png" for a in animals]}).to_csv(
        things / "manifest.csv", index=False
    )
    (devbench / "evals" / "sem-things").mkdir(parents=True)
    similarity = rng.uniform(0, 1, (4, 4))
    scipy.io.savemat(
        devbench / "evals" / "sem-things" / "spose_similarity.mat", {"spose_sim": (similarity + similarity.T) / 2}
    )
    return {task: str(images_root / task) for task in MULTIMODAL}


# ------------------------------------------------------------------------------------------------- running


def run_tasks(pipeline: Path, venv: Path, tasks: Sequence[str], opts: Options, dry_run: bool = False) -> int:
    """Run each task's commands with the venv's python from the checkout; returns the number of failed tasks."""
    failed = []
    for task in tasks:
        missing = [str(p) for p in task_inputs(task, opts) if not p.exists()]
        if task == "devbench" and not dry_run:
            install_devbench(pipeline)
            if not (pipeline / "evaluation_data" / "full_eval" / "devbench" / "assets").is_dir():
                missing.append(str(pipeline / "evaluation_data" / "full_eval" / "devbench"))
        if missing:
            print(
                f"[{task}] skipped: missing {', '.join(missing)} (download the pipeline's evaluation data, see its "
                "README, or --write_sample_data)",
                file=sys.stderr,
            )
            failed.append(task)
            continue
        for command in task_commands(task, opts):
            argv = [str(venv_python(venv)), "-m", *command]
            print(f"[{task}] {' '.join(argv)}", flush=True)
            if dry_run:
                continue
            result = subprocess.run(argv, cwd=pipeline, env=clean_env())
            if result.returncode != 0:
                print(f"[{task}] failed (exit {result.returncode})", file=sys.stderr)
                failed.append(task)
                break
    if dry_run:
        print(
            f"dry run: {len(tasks) - len(failed)} tasks planned, nothing ran"
            + (f"; missing data: {failed}" if failed else "")
        )
        return len(failed)
    print(f"{len(tasks) - len(failed)} tasks finished, {len(failed)} failed" + (f": {failed}" if failed else ""))
    return len(failed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pipeline", type=Path, required=True, help="checkout of babylm/evaluation-pipeline-2025")
    p.add_argument("--archive", type=Path, help="source archive of the pipeline to unpack into --pipeline first")
    p.add_argument("--export", type=Path, help="BitMar export directory (python -m bitmar.export)")
    p.add_argument("--tasks", nargs="+", default=["zero_shot"], help=f"tasks or groups: {TASKS} / {sorted(GROUPS)}")
    p.add_argument("--venv", type=Path, help="the pipeline's environment (default PIPELINE/.venv)")
    p.add_argument("--setup", action="store_true", help="create or complete --venv from the pipeline's requirements")
    p.add_argument("--python", default=sys.executable, help="interpreter that creates the venv (--setup)")
    p.add_argument("--torch", help="requirement replacing the pipeline's torch pin (--setup), e.g. torch==2.13.0")
    p.add_argument("--eval_dir", type=Path, help="evaluation data (default PIPELINE/evaluation_data/full_eval)")
    p.add_argument("--write_sample_data", action="store_true", help="write tiny synthetic data into --eval_dir first")
    p.add_argument("--install_devbench", action="store_true", help="only install the DevBench model class")
    p.add_argument("--batch_size", type=int, help="zero-shot text tasks' batch size (pipeline default 64)")
    p.add_argument("--vqa_images", help="image dataset for VQA (default HuggingFaceM4/VQAv2)")
    p.add_argument("--winoground_images", help="image dataset for Winoground (default facebook/winoground)")
    p.add_argument("--finetune_epochs", type=int, help="epochs for every fine-tuning task (default 10, WSC 30)")
    p.add_argument("--finetune_batch_size", type=int, help="fine-tuning batch size (default 16 BoolQ/MultiRC, else 32)")
    p.add_argument("--sequence_length", type=int, default=512, help="fine-tuning max tokens (the pipeline's 512)")
    p.add_argument("--aoa_track", default="non-strict-small", choices=["strict-small", "non-strict-small"])
    p.add_argument("--aoa_debug", action="store_true", help="AoA: the first 5 checkpoint names and words only")
    p.add_argument("--dry_run", action="store_true", help="print the commands without running them")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pipeline = args.pipeline.resolve()
        if args.archive:
            extract_pipeline(args.archive, pipeline)
        check_pipeline(pipeline)
        if args.install_devbench:
            print(f"installed {install_devbench(pipeline)} and the `--model_type bitmar` branch of devbench/eval.py")
            return 0
        venv = (args.venv or pipeline / ".venv").absolute()
        if args.setup:
            setup_venv(pipeline, venv, args.python, args.torch)
        check_venv(pipeline, venv)
        eval_dir = (args.eval_dir or pipeline / "evaluation_data" / "full_eval").absolute()
        images = {}
        if args.write_sample_data:
            # In the pipeline's venv: it has what the writer needs (datasets, pandas, scipy), this one may not.
            code = (
                "import pathlib, runpy, sys; "
                "runpy.run_path(sys.argv[1])['write_sample_data'](pathlib.Path(sys.argv[2]))"
            )
            subprocess.run([str(venv_python(venv)), "-c", code, __file__, str(eval_dir)], check=True, env=clean_env())
            images = {task: str(eval_dir / SAMPLE_IMAGES / task) for task in MULTIMODAL}
        for task in MULTIMODAL:  # sample data written earlier into eval_dir brings its own pictures
            if task not in images and (eval_dir / SAMPLE_IMAGES / task).is_dir():
                images[task] = str(eval_dir / SAMPLE_IMAGES / task)
                print(f"[{task}] pictures from the sample data: {images[task]}")
        if args.vqa_images:
            images["vqa"] = args.vqa_images
        if args.winoground_images:
            images["winoground"] = args.winoground_images
        if args.export is None:
            raise UsageError("--export is required to run tasks")
        tasks = expand_tasks(args.tasks)
        export = args.export.absolute()
        check_export(export, tasks)
        opts = Options(
            export=export,
            eval_dir=eval_dir,
            batch_size=args.batch_size,
            images=images,
            finetune_epochs=args.finetune_epochs,
            finetune_batch_size=args.finetune_batch_size,
            sequence_length=args.sequence_length,
            aoa_track=args.aoa_track,
            aoa_debug=args.aoa_debug,
        )
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:
        print(f"error: {' '.join(map(str, err.cmd))} failed (exit {err.returncode})", file=sys.stderr)
        return 2
    return 1 if run_tasks(pipeline, venv, tasks, opts, dry_run=args.dry_run) else 0


if __name__ == "__main__":
    sys.exit(main())
