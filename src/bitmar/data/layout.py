"""File names of the BabyLM multimodal release (OSF project ad7qg, folder multimodal_data/).

The sample world and the verifier write and read exactly this layout, so code that works on the sample
works on the real download.
"""

from __future__ import annotations

# The six sources of the text zip (`train_50M/<source>.train`). Defined in bitmar.config, where they are the valid
# `data.text_sources`: the config stands below the data package and imports nothing from it.
from bitmar.config import TEXT_SOURCES  # noqa: F401  (re-exported: layout.TEXT_SOURCES)

OSF_PROJECT = "ad7qg"
OSF_FOLDER = "multimodal_data"
OSF_API_BASE = "https://api.osf.io"

TEXT_ZIP = "train_50M.zip"

CC3M_CAPTIONS = "cc_3M_captions.json"
CC3M_FEATURES = ("cc_3M_dino_v2_states_1of2.npy", "cc_3M_dino_v2_states_2of2.npy")
LOCAL_NARR_CAPTIONS = "local_narr_captions.json"
LOCAL_NARR_FEATURES = "local_narr_dino_v2_states.npy"

ALL_FILES = (TEXT_ZIP, CC3M_CAPTIONS, *CC3M_FEATURES, LOCAL_NARR_CAPTIONS, LOCAL_NARR_FEATURES)
REQUIRED_FILES = (TEXT_ZIP, CC3M_CAPTIONS, *CC3M_FEATURES)  # Localized Narratives are optional

# Evaluation sets the sample world writes (official field names); real BLiMP etc. are pointed to by config.
EVAL_DIR = "eval"
BLIMP_DIR = "eval/blimp"  # *.jsonl with sentence_good / sentence_bad / UID / field
WINOGROUND_FILE = "eval/winoground.jsonl"
VQA_FILE = "eval/vqa.jsonl"
NOVEL_EPISODES_FILE = "eval/novel_episodes.jsonl"
NOVEL_EPISODES_FEATURES = "eval/novel_episodes_features.npy"

FEATURE_DIM = 768  # DINOv2-base CLS vectors

# The generated sample world (`bitmar.data.sample`): its manifest records every file it wrote, with sha256.
SAMPLE_MANIFEST = "eval/sample_world.json"
SAMPLE_DEFAULT_DIR = "data/babylm_sample"  # `download_babylm_data.py --test` writes here (the tiny config's data_dir)


def fetch_command(data_dir: str, name: str | None = None) -> str:
    """The command a user runs to fetch a missing file (named in error messages)."""
    only = f" --only {name}" if name else ""
    return f"python download_babylm_data.py --data_dir {data_dir}{only}   (or --test for the built-in sample)"
