"""Typed config tree: YAML loading, defaults, seed-key migration, overrides, validation, save/load round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from bitmar.config import (
    BitMarConfig,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_shipped_configs_exist() -> None:
    names = {p.name for p in SHIPPED}
    assert {"bitmar_config.yaml", "bitmar_tiny.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_sets_its_values(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, BitMarConfig)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    # Every value written in the file reaches the typed config (seed keys under model: land in training:).
    for section, values in raw.items():
        for key, value in (values or {}).items():
            target = "training" if section == "model" and not hasattr(cfg.model, key) else section
            got = getattr(getattr(cfg, target), key)
            if dataclasses.is_dataclass(got):
                for sub_key, sub_value in value.items():
                    assert getattr(got, sub_key) == sub_value, f"{section}.{key}.{sub_key}"
            else:
                assert got == value, f"{section}.{key}"


def test_shipped_values_of_note() -> None:
    full = load_config(CONFIG_DIR / "bitmar_config.yaml")
    assert (full.model.hidden_size, full.model.memory_size) == (768, 512)
    assert full.training.learning_rate == pytest.approx(1.5e-3)  # written as model.learning_rate (seed layout)
    assert full.training.batch_size == 64 and full.training.max_epochs == 10
    tiny = load_config(CONFIG_DIR / "bitmar_tiny.yaml")
    assert tiny.data.sample.generate_if_missing is True
    assert tiny.evaluation.recall_sizes == [1, 2, 4, 8, 16, 32, 64, -1]  # the recall curve over N
    assert (tiny.model.episode_tokens, tiny.model.memory_key_input) == (20, "features")


def test_defaults_fill_missing_keys(tmp_path: Path) -> None:
    assert load_config(None) == BitMarConfig()
    path = write_yaml(tmp_path / "partial.yaml", {"model": {"memory_size": 128}, "training": {"batch_size": 8}})
    cfg = load_config(path)
    assert cfg.model.memory_size == 128 and cfg.training.batch_size == 8
    defaults = BitMarConfig()
    assert cfg.model.hidden_size == defaults.model.hidden_size
    assert cfg.training.learning_rate == defaults.training.learning_rate
    assert cfg.data == defaults.data and cfg.wandb == defaults.wandb
    # An empty file and an empty section (every key commented out) mean "all defaults".
    (tmp_path / "empty.yaml").write_text("# nothing yet\n", encoding="utf-8")
    assert load_config(tmp_path / "empty.yaml") == defaults
    (tmp_path / "sections.yaml").write_text("training:\nwandb:\nmodel:\n  memory_size: 64\n", encoding="utf-8")
    cfg = load_config(tmp_path / "sections.yaml", ["training.batch_size=4"])
    assert cfg.model.memory_size == 64 and cfg.training.batch_size == 4 and cfg.wandb == defaults.wandb


def test_seed_keys_move_from_model_to_training(tmp_path: Path) -> None:
    raw = {"model": {"learning_rate": 0.002, "batch_size": 16, "max_epochs": 4, "gradient_clip": 0.5}}
    cfg = config_from_dict(raw)
    t = cfg.training
    assert (t.learning_rate, t.batch_size, t.max_epochs, t.gradient_clip) == (0.002, 16, 4, 0.5)
    assert raw == {"model": {"learning_rate": 0.002, "batch_size": 16, "max_epochs": 4, "gradient_clip": 0.5}}
    # Same value twice is fine; two different values are ambiguous.
    assert config_from_dict({"model": {"batch_size": 16}, "training": {"batch_size": 16}}).training.batch_size == 16
    with pytest.raises(ConfigError, match=r"model.batch_size=16 and training.batch_size=8 disagree"):
        config_from_dict({"model": {"batch_size": 16}, "training": {"batch_size": 8}})
    # The seed spelling also works as an override.
    assert load_config(None, ["model.learning_rate=0.01"]).training.learning_rate == 0.01


def test_unknown_keys_name_the_dotted_path_and_nearest_key(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "typo.yaml", {"model": {"memroy_size": 64}})
    with pytest.raises(ConfigError, match=r"unknown config key 'model.memroy_size'; did you mean 'model.memory_size'"):
        load_config(path)
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)  # the file is named
    with pytest.raises(ConfigError, match=r"'training.phase1_text.epoch'; did you mean 'training.phase1_text.epochs'"):
        load_config(None, ["training.phase1_text.epoch=2"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trainig'; did you mean 'training'"):
        config_from_dict({"trainig": {}})
    with pytest.raises(ConfigError, match=r"unknown config key 'model.zzzz' \(valid keys here: text_encoder"):
        config_from_dict({"model": {"zzzz": 1}})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"memory_size": "big"}}, r"model.memory_size: expected an integer, got 'big'"),
        ({"model": {"memory_size": 1.5}}, r"model.memory_size: expected an integer, got 1.5"),
        ({"model": {"use_memory": "yes please"}}, r"model.use_memory: expected true or false"),
        ({"model": {"hidden_size": True}}, r"model.hidden_size: expected an integer, got True"),
        ({"training": {"learning_rate": "fast"}}, r"training.learning_rate: expected a number, got 'fast'"),
        ({"training": {"learning_rate": float("nan")}}, r"training.learning_rate: expected a finite number"),
        ({"training": {"betas": 0.9}}, r"training.betas: expected a list, got 0.9"),
        ({"training": {"betas": [0.9, "x"]}}, r"training.betas\[1\]: expected a number, got 'x'"),
        ({"training": {"phase1_text": 3}}, r"training.phase1_text: expected a mapping of PhaseConfig keys"),
        ({"data": {"data_dir": 5}}, r"data.data_dir: expected a string, got 5 \(int\)"),
        ({"data": {"tokenizer_path": ["a"]}}, r"data.tokenizer_path: expected a string"),
        ({"model": []}, r"model: expected a mapping of ModelConfig keys"),
    ],
)
def test_wrong_types_fail_with_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_lossless_conversions_are_accepted() -> None:
    cfg = config_from_dict({"training": {"learning_rate": 1, "batch_size": 8.0, "weight_decay": "1e-2"}})
    assert cfg.training.learning_rate == 1.0 and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.batch_size == 8 and isinstance(cfg.training.batch_size, int)
    assert cfg.training.weight_decay == 0.01  # YAML 1.1 reads 1e-2 as a string


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.memory_size=0"], r"model.memory_size must be > 0, got 0"),
        (["model.memory_size=-5"], r"model.memory_size must be > 0, got -5"),
        (["training.learning_rate=-0.001"], r"training.learning_rate must be > 0, got -0.001"),
        (["training.learning_rate=0"], r"training.learning_rate must be > 0, got 0"),
        (["training.max_epochs=11"], r"training.max_epochs=11 exceeds the BabyLM limit of 10.*allow_over_budget=true"),
        (["model.text_encoder=gpt2"], r"model.text_encoder='gpt2' is not an architecture preset; BitMar trains from"),
        (["model.text_decoder=bitnet-smal"], r"did you mean 'bitnet-small'"),
        (["model.hidden_size=100"], r"model.hidden_size=100 must be divisible by the heads"),
        (["model.dropout=1.0"], r"model.dropout must be in \[0, 1\)"),
        (["training.betas=[0.9]"], r"training.betas must be two numbers"),
        (["training.memory_episodes_per_write=1000"], r"exceeds model.memory_size=512"),
        (["training.precision=fp16"], r"training.precision='fp16' is not one of \['auto', 'fp32', 'bf16'\]"),
        (["training.validation_batches=0"], r"training.validation_batches must be > 0 or null"),
        (["evaluation.recall_sizes=[1,0]"], r"evaluation.recall_sizes\[1\] must be > 0 or -1"),
        (["data.text_sources=[childes,chldes]"], r"data.text_sources\[1\]='chldes'.*did you mean 'childes'"),
        (["training.weight_decay=-1"], r"training.weight_decay must be >= 0"),
        (["evaluation.retrieval_decoder_weight=-1"], r"evaluation.retrieval_decoder_weight must be a finite number"),
        (["evaluation.retrieval_decoder_weight=nan"], r"evaluation.retrieval_decoder_weight: expected a finite number"),
        (
            ["training.phase1_text.enabled=false", "training.phase2_alignment.epochs=0"]
            + ["training.phase3_memory.epochs=0"],
            r"all training phases are disabled",
        ),
    ],
)
def test_impossible_values_fail_clearly(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.seed=-1"], r"training.seed=-1 is outside 0..4294967295 \(2\*\*32 - 1\).*NumPy"),
        (["training.seed=18446744073709551616"], r"training.seed=18446744073709551616 is outside 0..4294967295"),
        (["training.seed=4294967296"], r"training.seed=4294967296 is outside"),
        (["data.sample.seed=-3"], r"data.sample.seed=-3 is outside"),
        (["data.pseudo_words.seed=-1"], r"data.pseudo_words.seed=-1 is outside"),
        (["data.max_caption_length=1"], r"data.max_caption_length=1 is too small: a caption needs BOS.*>= 3"),
        (["data.max_caption_length=2"], r"data.max_caption_length=2 is too small"),
        (["data.text_block_length=1"], r"data.text_block_length=1 is too small.*L=1 trains nothing \(text loss 0\)"),
        (["data.validation_fraction=0"], r"data.validation_fraction must be in \(0, 1\), got 0.0.*best.pt"),
        (["data.validation_fraction=1"], r"data.validation_fraction must be in \(0, 1\)"),
        (["model.max_seq_len=32"], r"data.text_block_length=128 exceeds model.max_seq_len=32.*at least 128"),
        (
            ["model.max_seq_len=100", "data.text_block_length=100", "data.max_caption_length=101"],
            r"data.max_caption_length=101 exceeds model.max_seq_len=100",
        ),
        (
            ["evaluation.tasks=[retrieval,captionning]"],
            r"evaluation.tasks\[1\]='captionning'.*did you mean 'captioning'",
        ),
        (["evaluation.tasks=[bleu]"], r"'bleu' is not an evaluation task \(valid: retrieval, captioning, grounding"),
    ],
)
def test_values_that_would_break_the_run_later_fail_at_load(overrides: list[str], message: str) -> None:
    # Each of these used to be accepted: a traceback later in training, a silently useless loss, or an unknown
    # evaluation task reported only after the whole training.
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_boundary_values_are_accepted() -> None:
    cfg = load_config(
        None,
        [
            "training.seed=4294967295",
            "data.sample.seed=0",
            "data.max_caption_length=3",
            "data.text_block_length=2",
            "model.max_seq_len=3",
            "data.validation_fraction=0.001",
            "evaluation.tasks=[minimal_pairs,minimal_pairs]",
        ],
    )
    assert cfg.training.seed == 2**32 - 1 and cfg.model.max_seq_len == 3


def test_a_bad_seed_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "seed.yaml", {"training": {"seed": 2**64}})
    with pytest.raises(ConfigError, match=r"training.seed=18446744073709551616 is outside .*\(in .*seed.yaml\)"):
        load_config(path)


def test_gpt2_preset_in_a_file_names_the_babylm_rule(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "seed.yaml", {"model": {"text_encoder": "gpt2"}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "trains from scratch (BabyLM rules)" in text and "never downloads a pretrained model" in text
    assert "bitnet-tiny" in text and str(path) in text


def test_over_budget_needs_explicit_permission() -> None:
    cfg = load_config(None, ["training.max_epochs=12", "training.allow_over_budget=true"])
    assert cfg.training.max_epochs == 12


def test_overrides_nested_lists_null_and_strings() -> None:
    cfg = load_config(
        None,
        [
            "training.batch_size=16",
            "training.phase2_alignment.epochs=4",
            "training.loss_weights.memory_kl=0.05",
            "training.betas=[0.8, 0.9]",
            "wandb.entity=null",
            "data.tokenizer_path=/tmp/tok.json",
            "training.validation_batches=null",
            "data.text_sources=[childes, switchboard]",
            "training.compile=true",
            "export.vision_backbone=",  # empty value: the empty string
            "training.batch_size=24",  # later overrides win
        ],
    )
    t = cfg.training
    assert t.batch_size == 24 and t.phase2_alignment.epochs == 4 and t.loss_weights.memory_kl == 0.05
    assert t.betas == [0.8, 0.9] and t.validation_batches is None and t.compile is True
    assert cfg.wandb.entity is None and cfg.data.tokenizer_path == "/tmp/tok.json"
    assert cfg.data.text_sources == ["childes", "switchboard"] and cfg.export.vision_backbone == ""


def test_overrides_apply_on_top_of_a_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"training": {"batch_size": 8, "learning_rate": 0.001}})
    cfg = load_config(path, ["training.batch_size=2"])
    assert cfg.training.batch_size == 2 and cfg.training.learning_rate == 0.001
    with pytest.raises(ConfigError, match=r"override training.batch_size.x: 'batch_size' is a value, not a section"):
        load_config(path, ["training.batch_size.x=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.batch_size", r"must look like key.path=value"),
        ("=3", r"has an empty key"),
        ("training..batch_size=3", r"has an empty part"),
        ("training.betas=[0.9", r"the value is not valid YAML.*training.betas=\[0.9,0.95\]"),
        ("training.batch_size.x=3", r"training.batch_size: expected an integer, got \{'x': 3\}"),
        ("training.batch_size=abc", r"training.batch_size: expected an integer, got 'abc'"),
        ("nosuch.key=1", r"unknown config key 'nosuch'"),
    ],
)
def test_bad_overrides_fail_clearly(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_save_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        CONFIG_DIR / "bitmar_tiny.yaml",
        ["training.learning_rate=1e-5", "wandb.entity=team", "data.max_text_tokens=1000", "training.betas=[0.5,0.75]"],
    )
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text(encoding="utf-8")) == config_to_dict(cfg)
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left behind
    save_config(BitMarConfig(), path)  # overwrite in place
    assert load_config(path) == BitMarConfig()


def test_bad_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist; the shipped configs are in configs/"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"is not a file"):
        load_config(tmp_path)
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"must hold a mapping of sections, got list"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "latin1.yaml").write_bytes("data:\n  data_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")
