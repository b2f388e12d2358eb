"""Hugging Face export: flattened remote code, exact logits, packed storage, generation, scoring, images, errors."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import bitmar.bitnet as bitnet
import bitmar.bitnet.int8_gemm as bitnet_gemm
from bitmar.bitnet import BitLinear
from bitmar.config import config_from_dict, config_to_dict, load_config
from bitmar.data.tokenizer import train_tokenizer
from bitmar.export import ExportError, build_remote_code, export_checkpoint, flatten_sources, hf_export, score_sentences
from bitmar.export.__main__ import main as export_main
from bitmar.export.hf_export import EXPORT_MANIFEST, LEGACY_EXPORT_FILES, STORE_NAME
from bitmar.infra.checkpoint import load_checkpoint, save_checkpoint
from bitmar.kernels import packed_cpu
from bitmar.memory import EpisodicStore
from bitmar.model import BitMar
from bitmar.training.losses import sequence_log_probs

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "bitmar_tiny.yaml"
SENTENCES = [
    "the cat sat on the mat",
    "a dog runs in the park",
    "the bird sings a song",
    "children play with a red ball",
    "the cats sat on the mat",
    "a dogs runs in the park",
]
LIBS = frozenset({"torch"})


# ------------------------------------------------------------------------------------------------- fixtures


def make_checkpoint(root: Path, overrides: tuple[str, ...] = (), store_episodes: int = 0) -> Path:
    """A tiny randomly initialised BitMar checkpoint with its own BPE tokenizer (what train_bitmar.py writes).

    store_episodes > 0: a persistent store as the trainer leaves it: episodes written (the first one read again
    later, so LRU order differs from write order) while the memory prior was still moving."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(SENTENCES * 10, 300, root / "tokenizer")
    cfg = load_config(TINY, [f"model.vocab_size={len(tokenizer)}", *overrides])
    model = BitMar(cfg.model)
    store: dict[str, torch.Tensor] = {}
    if store_episodes:
        episodes = EpisodicStore(model.memory)
        g = torch.Generator().manual_seed(2)
        keys = torch.randn(store_episodes, model.memory.prior.shape[1], generator=g)  # the prior addresses keys
        for key in keys:
            episodes.write(key, torch.randn(model.memory.episode_dim, generator=g))
        episodes.read(keys[0])
        with torch.no_grad():  # training goes on after the writes: the prior moves
            model.memory.prior.add_(0.1 * torch.randn(model.memory.prior.shape, generator=g))
        store = episodes.state_dict()
    path = root / "checkpoints" / "last.pt"
    payload = {
        "model": model.state_dict(),
        "config": config_to_dict(cfg),
        "tokenizer": tokenizer.backend_tokenizer.to_str(),
        "progress": {"phase": 3, "epoch": 9, "global_step": 1234},
        "memory_store": store,
    }
    save_checkpoint(payload, path)
    return path


def training_model(checkpoint: Path) -> BitMar:
    payload = load_checkpoint(checkpoint)
    model = BitMar(config_from_dict(payload["config"]).model)
    model.load_state_dict(payload["model"])
    return model.eval()


def hf_load(path: Path, **kwargs: Any) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs)


def hf_tokenizer(path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run"), store_episodes=3)


@pytest.fixture(scope="module")
def exports(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {
        "f32": export_checkpoint(ckpt, root / "f32", dtype="float32"),
        "f32_packed": export_checkpoint(ckpt, root / "f32_packed", packed=True, dtype="float32"),
        "bf16_packed": export_checkpoint(ckpt, root / "bf16_packed", packed=True),
    }


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> BitMar:
    return training_model(ckpt)


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised DINOv2 saved locally (no download): 32-d features, one layer."""
    torch.manual_seed(1)
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=224, patch_size=14
    )
    path = tmp_path_factory.mktemp("dinov2")
    transformers.Dinov2Model(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vision_export(tiny_dinov2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("run_vision"), ("model.vision_encoder_dim=32",))
    out = tmp_path_factory.mktemp("vision_export") / "export"
    return checkpoint, export_checkpoint(
        checkpoint, out, packed=True, vision_backbone=str(tiny_dinov2), dtype="float32"
    )


def batch(tokenizer: Any, texts: list[str], side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer.padding_side = side
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# ------------------------------------------------------------------------------------------------- flattening


def test_remote_code_is_self_contained_and_defines_every_name(tmp_path: Path) -> None:
    code = build_remote_code()
    for name, source in code.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                # safetensors (the episodic store file) is a dependency of transformers itself
                libraries = {"__future__", "torch", "transformers", "safetensors"}
                assert node.module.split(".")[0] in libraries | sys.stdlib_module_names
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in {"torch"} | sys.stdlib_module_names for a in node.names), name
        assert "from bitmar" not in source and "import bitmar" not in source
        (tmp_path / name).write_text(source, encoding="utf-8")
    assert "class BitMarForCausalLM(" in code["modeling_bitmar.py"]
    assert "from .configuration_bitmar import BitMarConfig, ModelConfig" in code["modeling_bitmar.py"]
    # Undefined names (F821) or one definition silently replacing another (F811) would break only at run time.
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run(
        [str(ruff), "check", "--no-cache", "--isolated", "--select", "F821,F811,F401", *sorted(code)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_flatten_merges_imports_and_strips_bitmar_lines() -> None:
    a = '"""Module a."""\nfrom __future__ import annotations\n\nimport math\nfrom torch import nn\n\nA = math.pi\n'
    b = (
        '"""Module b."""\nfrom __future__ import annotations\n\nimport math\nfrom torch import Tensor, nn\n\n'
        "from bitmar.a import A\n\n__all__ = ['B']\n\n\ndef B() -> float:  # uses A\n    return A * math.e\n"
    )
    flat = flatten_sources([("bitmar/a.py", a, LIBS), ("bitmar/b.py", b, LIBS)], '"""Header."""')
    assert flat.defined == {"A", "B"}
    src = flat.source
    assert src.count("from __future__ import annotations") == 1 and src.count("import math\n") == 1
    assert "from torch import Tensor, nn" in src and "bitmar.a" not in src and "__all__" not in src
    assert "# bitmar/b.py: Module b." in src and "def B() -> float:  # uses A" in src  # comments survive
    namespace: dict[str, Any] = {}
    exec(compile(src, "flat", "exec"), namespace)
    assert namespace["B"]() == pytest.approx(3.141592653589793 * 2.718281828459045)


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([("bitmar/a.py", "import numpy\n", LIBS)], "bitmar/a.py:1: imports `numpy`"),
        (
            [("bitmar/a.py", "def f():\n    from bitmar.b import g\n    return g\n", LIBS)],
            "bitmar/a.py:2: nested import",
        ),
        ([("bitmar/a.py", "from bitmar.b import g\n", LIBS)], "defines 'g'"),
        ([("bitmar/a.py", "import bitmar.b\n", LIBS)], "binds a bitmar module"),
        ([("bitmar/a.py", "X = 1\n", LIBS), ("bitmar/b.py", "X = 2\n", LIBS)], "'X' is defined in both"),
        (
            [("bitmar/a.py", "from math import pi as P\n", LIBS), ("bitmar/b.py", "from cmath import pi as P\n", LIBS)],
            "clash",
        ),
        ([("bitmar/a.py", "from bitmar.b import g as h\n", LIBS)], "renames a bitmar name"),
        ([("bitmar/a.py", "import math; X = math.pi\n", LIBS)], "shares a line"),
        ([("bitmar/a.py", 'def f():\n    """Note:\n    import numpy\n    """\n', LIBS)], "reads like an import"),
    ],
)
def test_flatten_refuses_what_it_cannot_flatten_safely(sources: list[Any], message: str) -> None:
    with pytest.raises(ExportError, match=re.escape(message)):
        flatten_sources(sources, '"""h."""')


# ------------------------------------------------------------------------------------------------- export layout


def test_export_directory_layout_and_configs(exports: dict[str, Path], ckpt: Path) -> None:
    out = exports["f32_packed"]
    expected = {
        "config.json", "configuration_bitmar.py", "modeling_bitmar.py", "processing_bitmar.py", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
        "generation_config.json", "README.md",
    }  # fmt: skip
    assert expected <= {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    assert set(manifest["files"]) == {p.name for p in out.iterdir()}  # lists exactly what the export wrote
    assert set(manifest["files"]) - {EXPORT_MANIFEST} <= LEGACY_EXPORT_FILES  # older exports are recognised too
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bitmar" and config["architectures"] == ["BitMarForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_bitmar.BitMarForCausalLM"
    assert config["auto_map"]["AutoProcessor"] == "processing_bitmar.BitMarProcessor"
    assert config["packed"] is True and config["dtype"] == "float32" and config["vision_backbone_config"] is None
    trained = config_from_dict(load_checkpoint(ckpt)["config"]).model
    assert config["hidden_size"] == trained.hidden_size and config["vocab_size"] == trained.vocab_size
    hf_config = transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert dataclasses.asdict(hf_config.model_config()) == dataclasses.asdict(trained)  # every field round-trips
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "BitMarProcessor"
    tokenizer = hf_tokenizer(out)
    ids = tokenizer("the cat sat")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == config["bos_token_id"] and "token_type_ids" not in tokenizer("a")
    card = (out / "README.md").read_text()
    assert "ternary parameters" in card and "```yaml" in card and "text_decoder: bitnet-tiny" in card


# ------------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("kind", ["f32", "f32_packed"])
def test_logits_match_the_training_model(exports: dict[str, Path], reference: BitMar, kind: str) -> None:
    model = hf_load(exports[kind])
    tokenizer = hf_tokenizer(exports[kind])
    ids, mask = batch(tokenizer, SENTENCES)
    vision = torch.randn(len(SENTENCES), 768, generator=torch.Generator().manual_seed(0))
    real = mask.bool()
    with torch.no_grad():
        for kwargs in ({}, {"vision_features": vision}):
            expected = reference(ids, mask, return_latents=False, **kwargs).logits
            got = model(input_ids=ids, attention_mask=mask, **kwargs).logits
            assert got.shape == expected.shape and got.dtype == torch.float32
            torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
            # lm-eval (BabyLM 2024) calls model(input_ids) on right-padded batches without a mask: same logits.
            unmasked = model(ids, **kwargs).logits
            torch.testing.assert_close(unmasked[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.use_vision=false", "model.use_memory=false"),
        ("model.quantize=false", "model.tie_embeddings=false", "model.vision_quantization=false"),
    ],
)
def test_ablation_models_export_exactly(overrides: tuple[str, ...], tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "run", overrides)
    out = export_checkpoint(checkpoint, tmp_path / "export", packed=True, dtype="float32")
    model, reference = hf_load(out), training_model(checkpoint)
    ids, mask = batch(hf_tokenizer(out), SENTENCES)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        expected = reference(ids, mask, return_latents=False).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    assert ("model.lm_head.weight" in keys) == (not reference.config.tie_embeddings)
    assert any(k.endswith("packed_weight") for k in keys) == reference.config.quantize


def test_packed_export_is_exact_and_about_ten_times_smaller(exports: dict[str, Path]) -> None:
    full, packed = exports["f32"] / "model.safetensors", exports["f32_packed"] / "model.safetensors"
    with safe_open(str(packed), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    with safe_open(str(full), "pt") as f:
        float_keys = set(f.keys())  # noqa: SIM118
        weight_numel = {k: f.get_slice(k).get_shape() for k in float_keys}
    packed_layers = [k[: -len(".packed_weight")] for k in tensors if k.endswith(".packed_weight")]
    assert packed_layers and all(tensors[f"{k}.packed_weight"].dtype == torch.uint8 for k in packed_layers)
    assert all(f"{k}.weight" in float_keys and f"{k}.weight" not in tensors for k in packed_layers)
    assert all(tensors[f"{k}.weight_scale"].dtype == torch.float32 for k in packed_layers)
    assert "model.embed_tokens.weight" in tensors and not any("lm_head" in k for k in tensors)  # tied: stored once
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert packed.stat().st_size < payload + 32_768  # only the safetensors header on top of the tensor bytes
    for k in packed_layers:  # 4 ternary weights per byte
        rows, cols = weight_numel[f"{k}.weight"]
        assert tensors[f"{k}.packed_weight"].numel() == -(-rows * cols // 4)
    # 2 bits per ternary weight: the float32 master weights took 16x more (a 4-byte scale per layer on top), and the
    # ternary layers are all the two files differ by. (How much the whole file shrinks depends on the config's share
    # of full-precision parameters: embeddings, norms, the memory prior.)
    master = sum(4 * math.prod(weight_numel[f"{k}.weight"]) for k in packed_layers)
    stored = sum(tensors[f"{k}.{n}"].numel() * tensors[f"{k}.{n}"].element_size() for k in packed_layers
                 for n in ("packed_weight", "weight_scale"))  # fmt: skip
    assert master > 15 * stored
    assert abs((full.stat().st_size - packed.stat().st_size) - (master - stored)) < 65_536  # headers differ

    tokenizer = hf_tokenizer(exports["f32"])
    ids, mask = batch(tokenizer, SENTENCES)
    with torch.no_grad():
        a = hf_load(exports["f32"])(input_ids=ids, attention_mask=mask).logits
        b = hf_load(exports["f32_packed"])(input_ids=ids, attention_mask=mask).logits
    # PackedBitLinear computes the same int8 x ternary products and scales as BitLinear: identical logits.
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bfloat16_export_rounds_only_the_full_precision_parts(exports: dict[str, Path], ckpt: Path) -> None:
    model = hf_load(exports["bf16_packed"])
    assert model.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    qkv = model.model.decoder.blocks[0].attn.qkv_proj
    assert type(qkv).__name__ == "PackedBitLinear" and qkv.norm.weight.dtype == torch.float32
    ids, mask = batch(hf_tokenizer(exports["bf16_packed"]), SENTENCES)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all()
        # Computed in float32, the bfloat16 export is exactly the training model with its full-precision parameters
        # (embedding = LM head, final norms, memory prior, ...) rounded to bfloat16; ternary layers are untouched.
        upcast = hf_load(exports["bf16_packed"], dtype=torch.float32)
        got = upcast(input_ids=ids, attention_mask=mask).logits
        rounded = training_model(ckpt)
        ternary = {id(p) for m in rounded.modules() if isinstance(m, BitLinear) for p in m.parameters()}
        for p in rounded.parameters():
            if id(p) not in ternary:
                p.copy_(p.to(torch.bfloat16).float())
        expected = rounded(ids, mask, return_latents=False).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_generate_matches_bitmar_generate(exports: dict[str, Path], reference: BitMar) -> None:
    model = hf_load(exports["f32_packed"])
    tokenizer = hf_tokenizer(exports["f32_packed"])
    prompts = ["the cat", "children play with a"]
    vision = torch.randn(2, 768, generator=torch.Generator().manual_seed(3))
    for vision_features in (None, vision):
        ids, mask = batch(tokenizer, prompts, side="right")
        expected = reference.generate(
            ids, mask, vision_features=vision_features, max_new_tokens=6, eos_token_id=2, pad_token_id=0
        )
        left_ids, left_mask = batch(tokenizer, prompts, side="left")
        out = model.generate(
            input_ids=left_ids,
            attention_mask=left_mask,
            vision_features=vision_features,
            max_new_tokens=6,
            do_sample=False,
        )
        assert torch.equal(out[:, left_ids.shape[1] :], expected), vision_features is None


def test_scoring_matches_training_side_minimal_pairs(exports: dict[str, Path], reference: BitMar) -> None:
    model, tokenizer = hf_load(exports["f32_packed"]), hf_tokenizer(exports["f32_packed"])
    scores = score_sentences(model, tokenizer, SENTENCES, batch_size=4)
    ids, mask = batch(tokenizer, SENTENCES)
    with torch.no_grad():
        expected = sequence_log_probs(reference(ids, mask).logits, ids, mask)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    assert (scores < 0).all()
    tokenizer.padding_side = "left"  # same scores whatever the padding side
    torch.testing.assert_close(score_sentences(model, tokenizer, SENTENCES), expected, atol=1e-4, rtol=1e-5)
    good, bad = scores[:2], scores[4:6]  # minimal pairs: "the cat sat" vs "the cats sat", ...
    assert torch.equal(good > bad, expected[:2] > expected[4:6])


def test_loss_is_shifted_cross_entropy_ignoring_padding(exports: dict[str, Path]) -> None:
    model, tokenizer = hf_load(exports["f32"]), hf_tokenizer(exports["f32"])
    ids, mask = batch(tokenizer, SENTENCES[:3])
    labels = ids.clone()
    labels[0, 2] = -100
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    targets = labels[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), targets.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert (targets == -100).sum() > 1 and out.loss > 0
    assert model(input_ids=ids, attention_mask=mask, return_dict=False)[0].shape == out.logits.shape


def test_exported_code_measures_its_cpu_route_and_obeys_the_switch(
    exports: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: the export carries bitnet's measured route choice (its own copy, no bitmar import) and its switch;
    choosing oneDNN's int8 GEMM by exactness alone made BLiMP ~300x too slow on AVX-512 EPYCs."""
    out = exports["f32_packed"]
    source = (out / "modeling_bitmar.py").read_text(encoding="utf-8")
    for needle in ('INT8_GEMM_ENV = "BITMAR_INT8_GEMM"', "def probe_int8_gemm(", "probe_int8_gemm()"):
        assert needle in source
    model = hf_load(out).eval()
    remote = sys.modules[type(model).__module__]
    assert remote.probe_int8_gemm is not bitnet.probe_int8_gemm and remote._INT8_GEMM is not bitnet_gemm._INT8_GEMM
    available = remote.int8_gemm_available()  # its self-test runs before the count starts
    calls: list[int] = []
    real_gemm = remote.onednn_int8_gemm

    def counting_gemm(q: torch.Tensor, w: torch.Tensor, out_features: int) -> torch.Tensor:
        calls.append(q.shape[0])
        return real_gemm(q, w, out_features)

    monkeypatch.setattr(remote, "onednn_int8_gemm", counting_gemm)
    ids = torch.randint(3, 200, (8, 40))  # 320 rows per ternary matmul: above the int8 row threshold
    # Issue 15: the export's own copy of the packed kernel's loader; where the package's kernel builds, it runs.
    assert remote.packed_kernel_decision is not packed_cpu.packed_kernel_decision
    with torch.no_grad():
        model(input_ids=ids[:1, :5])  # 5 rows per ternary matmul: the packed kernel's side of the threshold
    assert remote.packed_kernel_decision()["use"] is packed_cpu.packed_kernel_decision()["use"]
    logits = []
    remote.set_packed_kernel("off")  # the int8 route belongs to the pure-torch path; the packed kernel has its own
    try:
        for mode in ("off", "on"):
            monkeypatch.setenv("BITMAR_INT8_GEMM", mode)
            remote.set_int8_gemm(None)  # follow the environment, read when the route is next decided
            calls.clear()
            with torch.no_grad():
                logits.append(model(input_ids=ids).logits)
            decision = remote.int8_gemm_decision()
            assert decision["mode"] == mode and decision["mode_source"] == "BITMAR_INT8_GEMM"
            assert bool(calls) is (mode == "on" and available) and all(rows == 320 for rows in calls)
        assert torch.equal(logits[0], logits[1])  # the route changes speed only
        monkeypatch.delenv("BITMAR_INT8_GEMM")
        remote.set_int8_gemm(None)
        decision = remote.int8_gemm_decision()  # auto: measured on this machine by the export's own probe
        assert decision["mode"] == "auto" and (decision["probe"] is not None) is available
        pathological = remote.probe_int8_gemm(  # the same guard as the package: a 400x slower kernel is refused
            int8_route=lambda w: lambda q: time.sleep(q.shape[0] * w.numel() / 12e6) or q.mm(w.t())
        )
        assert pathological["route"] == "float" and "pathologically slow" in pathological["reason"]
    finally:
        remote.set_int8_gemm(None)
        remote.set_packed_kernel(None)


def test_pixel_values_without_backbone_is_a_clear_error(exports: dict[str, Path]) -> None:
    model = hf_load(exports["f32"])
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="this export has no vision backbone; pass vision_features or re-export"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 224, 224))
    assert torch.isfinite(model(input_ids=ids, vision_features=torch.zeros(1, 768)).logits).all()


# ------------------------------------------------------------------------------------------------- images


@pytest.mark.filterwarnings("ignore:Creating a tensor from a list of numpy")  # the pipeline's own conversion
def test_processor_and_stored_dinov2_backbone(vision_export: tuple[Path, Path], tiny_dinov2: Path) -> None:
    checkpoint, out = vision_export
    # The backbone is stored under the names Dinov2Model.save_pretrained writes (4.x layout, which transformers 5.x
    # converts on load), not its 5.x state_dict names: transformers 4.51.3 (BabyLM 2025) would leave those random.
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {k.removeprefix("vision_backbone.") for k in f.keys() if k.startswith("vision_backbone.")}  # noqa: SIM118
    with safe_open(str(tiny_dinov2 / "model.safetensors"), "pt") as f:
        assert stored == set(f.keys())  # noqa: SIM118
    processor = transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert type(processor).__name__ == "BitMarProcessor"
    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(300, 260, 3, generator=rng) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    inputs = processor(text=["a red ball", "the cat"], images=[image, image], padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 224, 224) and inputs["input_ids"][0, 0] == 1
    model = hf_load(out)
    with torch.no_grad():
        logits = model(**inputs).logits
        feature = model.image_features(inputs["pixel_values"])
        direct = transformers.Dinov2Model.from_pretrained(tiny_dinov2).eval()(pixel_values=inputs["pixel_values"])
        # The same picture through the training model's vision path with the directly computed DINOv2 CLS vector.
        expected = training_model(checkpoint)(
            inputs["input_ids"], inputs["attention_mask"], vision_features=direct.pooler_output, return_latents=False
        ).logits
    assert logits.shape == (2, inputs["input_ids"].shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    torch.testing.assert_close(feature, direct.pooler_output, atol=0, rtol=0)
    torch.testing.assert_close(feature, direct.last_hidden_state[:, 0], atol=0, rtol=0)  # CLS after the layernorm
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)
    # The BabyLM 2025 pipeline's calls: AutoProcessor(padding_side=...), offsets, images one at a time, lists out.
    pipeline = transformers.AutoProcessor.from_pretrained(out, padding_side="right", trust_remote_code=True)
    enc = pipeline(text="the cat sat", images=image, return_offsets_mapping=True)
    assert enc["input_ids"][0] == 1 and len(enc["offset_mapping"]) == len(enc["input_ids"])
    assert torch.FloatTensor(enc["pixel_values"]).shape == (1, 3, 224, 224)


def test_backbone_width_must_match_the_training_features(ckpt: Path, tiny_dinov2: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="32-d but the model was trained on 768-d"):
        export_checkpoint(ckpt, tmp_path / "out", vision_backbone=str(tiny_dinov2))
    with pytest.raises(ExportError, match="cannot load a DINOv2 model"):
        export_checkpoint(ckpt, tmp_path / "out", vision_backbone=str(tmp_path / "no_such_backbone"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- errors, atomicity


def test_missing_and_corrupt_checkpoints_exit_2_without_output(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert export_main(["--checkpoint", str(tmp_path / "nope.pt"), "--output_dir", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(ckpt.read_bytes()[:5000])  # a truncated file
    assert export_main(["--checkpoint", str(corrupt), "--output_dir", str(out)]) == 2
    assert "cannot be read" in capsys.readouterr().err and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["corrupt.pt"]  # no temp dir left behind


def test_reexport_replaces_an_export_and_refuses_other_directories(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    export_checkpoint(ckpt, out, dtype="float32")
    (out / "__pycache__").mkdir()  # what Python leaves after importing the remote code from the folder
    export_checkpoint(ckpt, out, packed=True)
    assert json.loads((out / "config.json").read_text())["packed"] is True and not (out / "__pycache__").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # A file the user put into an export would be deleted by the replacement: refused, everything kept.
    (out / "notes.txt").write_text("my evaluation notes")
    (out / "plots").mkdir()
    with pytest.raises(ExportError, match=r"holds a BitMar export and files it did not write \(notes.txt, plots\)"):
        export_checkpoint(ckpt, out, dtype="float32")
    assert export_main(["--checkpoint", str(ckpt), "--output_dir", str(out)]) == 2
    assert "would delete them; refusing" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "my evaluation notes" and (out / "plots").is_dir()
    assert json.loads((out / "config.json").read_text())["packed"] is True  # the export is untouched too
    (out / "notes.txt").unlink()
    (out / "plots").rmdir()
    # An export from before the manifest: recognised by the names an export writes.
    (out / EXPORT_MANIFEST).unlink()
    (out / "special_tokens_map.json").write_text("{}")  # written by transformers 4.x tokenizers
    export_checkpoint(ckpt, out, packed=True)
    assert (out / EXPORT_MANIFEST).is_file() and not (out / "special_tokens_map.json").exists()
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="refusing to replace"):
        export_checkpoint(ckpt, foreign)
    assert (foreign / "todo.txt").read_text() == "keep me"
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert export_main(["--checkpoint", str(tmp_path / "bad.pt"), "--output_dir", str(out)]) == 2
    assert json.loads((out / "config.json").read_text())["packed"] is True  # the previous export is untouched


def test_unwritable_output_is_refused_before_the_checkpoint_is_read(
    ckpt: Path, unwritable_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[Path] = []
    monkeypatch.setattr(hf_export, "load_checkpoint", lambda path, *a, **k: read.append(path))
    out = unwritable_dir / "export"
    assert export_main(["--checkpoint", str(ckpt), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the export to {out}" in err and "choose an --output_dir you can write to" in err
    assert not read and not out.exists()


def test_a_failed_write_keeps_the_previous_export(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    export_checkpoint(ckpt, out, dtype="float32")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*_: object, **__: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_export, "save_file", disk_full)
    with pytest.raises(ExportError, match=r"No space left on device.*nothing was changed there"):
        export_checkpoint(ckpt, out, packed=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left


def test_model_card_includes_the_run_evaluation(ckpt: Path, tmp_path: Path) -> None:
    run_dir = ckpt.parent.parent
    results = run_dir / "evaluation" / "results.json"
    results.parent.mkdir(exist_ok=True)
    evaluation = {  # evaluate_bitmar.py's layout: per-task details plus the headline "summary"
        "tasks": {"minimal_pairs": {"status": "ok", "per_phenomenon": {"anaphor": 0.4375}}},
        "summary": {"minimal_pairs/accuracy": 0.8125, "retrieval/r@1": 0.25},
    }
    try:
        results.write_text(json.dumps(evaluation))
        card = (export_checkpoint(ckpt, tmp_path / "out") / "README.md").read_text()
        results.write_text(json.dumps({"minimal_pairs": {"accuracy": 0.75}, "note": "x"}))  # no summary: all numbers
        plain = (export_checkpoint(ckpt, tmp_path / "out") / "README.md").read_text()
    finally:
        results.unlink()
    assert "| minimal_pairs/accuracy | 0.8125 |" in card and "| retrieval/r@1 | 0.25 |" in card
    assert "0.4375" not in card  # details stay in results.json
    assert "| minimal_pairs/accuracy | 0.75 |" in plain and "note" not in plain


# ------------------------------------------------------------------------------------------------- episodic memory

ONE_SHOT = ["the dax sat on the mat", "a wug runs in the park"]  # made-up words the tokenizer never saw


def package_store(model: BitMar, keys: torch.Tensor, values: torch.Tensor) -> EpisodicStore:
    """The store the bitmar package builds from the same episodes, written in order."""
    store = EpisodicStore(model.memory)
    for key, value in zip(keys, values, strict=True):
        store.write(key, value)
    return store


def assert_same_store(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name


def test_export_carries_the_checkpoint_store_readdressed_to_the_final_prior(
    exports: dict[str, Path], ckpt: Path, reference: BitMar
) -> None:
    raw = load_checkpoint(ckpt)["memory_store"]
    lru_order = [1, 2, 0]  # episode 0 was read after the others were written
    keys, values = raw["keys"][lru_order], raw["values"][lru_order]
    expected = package_store(reference, keys, values)  # the same episodes addressed against the final prior
    capacity = expected.capacity
    for kind in ("f32", "f32_packed", "bf16_packed"):
        manifest = json.loads((exports[kind] / EXPORT_MANIFEST).read_text())
        assert manifest["episodic_store"] == {"file": STORE_NAME, "episodes": 3, "capacity": capacity}
        assert STORE_NAME in manifest["files"]
        stored = load_file(str(exports[kind] / STORE_NAME))  # plain safetensors, all tensors
        assert_same_store(stored, expected.state_dict())
        model = hf_load(exports[kind])
        assert model.memory_size == 3 and model.memory_episode_ids == [0, 1, 2] and model.memory_capacity == capacity
        assert model.model.memory.prior.dtype == torch.float32  # also in the bfloat16 export
        assert torch.equal(model.model.memory.prior, reference.memory.prior)
        assert_same_store(model.memory_store().state_dict(), stored)  # loads equal
    assert "carries the training run's store (3 episodes" in (exports["f32"] / "README.md").read_text()
    # Re-addressing is what makes the carried episodes readable: the final model reads each value back exactly,
    # while the store as the trainer saved it (addressed with the older prior) does not.
    with torch.no_grad():
        readout, _ = reference.read_memory(expected.state, key=keys)
        stale = EpisodicStore(reference.memory)
        stale.load_state_dict(raw)
        stale_readout, _ = reference.read_memory(stale.state, key=keys)
    assert float((readout - values).abs().max()) < 1e-4 < float((stale_readout - values).abs().max())


def test_no_store_flag_and_a_store_that_does_not_fit(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert export_main(["--checkpoint", str(ckpt), "--output_dir", str(out), "--dtype", "float32", "--no_store"]) == 0
    assert not (out / STORE_NAME).exists()
    assert json.loads((out / EXPORT_MANIFEST).read_text())["episodic_store"] is None
    assert "store was left out (`--no_store`)" in (out / "README.md").read_text()
    model = hf_load(out)
    assert model.memory_size == 0
    vision = torch.zeros(1, 768)
    with pytest.raises(ValueError, match="the episodic store holds no episodes: write one first with"):
        model.memory_read(vision_features=vision)
    with pytest.raises(ValueError, match="the episodic store holds no episodes"):
        model.generate(vision_features=vision, use_memory=True, max_new_tokens=2)
    with pytest.raises(ValueError, match="reads the store with the picture's key"):
        model(input_ids=torch.tensor([[1, 5]]), use_memory=True)
    payload = load_checkpoint(ckpt)
    payload["memory_store"]["keys"] = payload["memory_store"]["keys"][:, :7]  # from a model of another width
    bad = tmp_path / "bad.pt"
    save_checkpoint(payload, bad)
    capsys.readouterr()
    assert export_main(["--checkpoint", str(bad), "--output_dir", str(tmp_path / "bad_out")]) == 2
    err = capsys.readouterr().err
    assert "persistent memory store ('memory_store') does not fit the model" in err and "--no_store" in err
    assert not (tmp_path / "bad_out").exists()
    assert export_main(["--checkpoint", str(bad), "--output_dir", str(tmp_path / "bad_out"), "--no_store"]) == 0
    payload = load_checkpoint(ckpt)
    payload["memory_store"]["values"][1, 0] = float("nan")  # would turn every slot of the memory into NaN
    save_checkpoint(payload, bad)
    assert export_main(["--checkpoint", str(bad), "--output_dir", str(tmp_path / "nan_out")]) == 2
    assert "non-finite" in capsys.readouterr().err and not (tmp_path / "nan_out").exists()


def test_one_shot_learning_in_the_export_equals_bitmar(
    exports: dict[str, Path], reference: BitMar, tmp_path: Path
) -> None:
    model, tokenizer = hf_load(exports["f32"]), hf_tokenizer(exports["f32"])
    model.memory_clear()
    assert model.memory_size == 0
    ids, mask = batch(tokenizer, ONE_SHOT)
    vision = torch.randn(2, 768, generator=torch.Generator().manual_seed(11))
    assert model.memory_write(ids, mask, vision_features=vision) == [0, 1]
    with torch.no_grad():
        keys = reference.memory_key(vision)
        values = reference.episode_latent(ids, mask, vision)
        store = package_store(reference, keys, values)
        expected_readout, _ = reference.read_memory(store.state, key=keys)
        expected_logits = reference(ids, mask, memory_readout=expected_readout, return_latents=False).logits
        text_readout, _ = reference.read_memory(store.state, key=reference.text_memory_key(ids, mask))
    assert_same_store(model.memory_store().state_dict(), store.state_dict())
    readout = model.memory_read(vision_features=vision)
    assert torch.equal(readout, expected_readout)
    assert torch.equal(model.memory_read(input_ids=ids, attention_mask=mask), text_readout)  # a text key
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, vision_features=vision, use_memory=True).logits
        assert torch.equal(logits, expected_logits)
        assert torch.equal(model(input_ids=ids, attention_mask=mask, memory_readout=readout).logits, expected_logits)
    bos = tokenizer.bos_token_id
    expected_ids = reference.generate(
        memory_readout=expected_readout, bos_token_id=bos, max_new_tokens=8, eos_token_id=2, pad_token_id=0
    )
    for prompt in ({"input_ids": torch.full((2, 1), bos)}, {}):  # without a prompt HF starts from BOS too
        out = model.generate(**prompt, vision_features=vision, use_memory=True, max_new_tokens=8, do_sample=False)
        assert torch.equal(out[:, 1:], expected_ids)
    # The copy path already spells each made-up word from its episode (slots start as the caption's embeddings).
    recalled = tokenizer.batch_decode(expected_ids, skip_special_tokens=True)
    assert "dax" in recalled[0] and "wug" in recalled[1]
    # The packed export (the default kind) learns the same episodes: PackedBitLinear computes BitLinear's products.
    packed = hf_load(exports["f32_packed"])
    packed.memory_clear()
    packed.memory_write(ids, mask, vision_features=vision)
    torch.testing.assert_close(packed.memory_read(vision_features=vision), expected_readout, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pass either use_memory=True or memory_readout"):
        model.generate(vision_features=vision, use_memory=True, memory_readout=readout, max_new_tokens=2)

    # Forgetting: a third episode, then forgotten, leaves exactly the store that never held it.
    (third,) = model.memory_write(ids[:1], mask[:1], vision_features=vision[1:] + 1.0)
    assert third == 2 and model.memory_size == 3
    with pytest.raises(KeyError, match=r"no episodes \[99\] in the store"):
        model.memory_forget([third, 99])
    assert model.memory_size == 3  # nothing forgotten on an unknown id
    model.memory_forget(third)
    assert model.memory_episode_ids == [0, 1]
    assert torch.equal(model.memory_read(vision_features=vision), expected_readout)

    # save_pretrained keeps the store; an emptied store removes the file so it does not come back.
    model.save_pretrained(tmp_path / "saved")
    reloaded = hf_load(tmp_path / "saved")
    assert reloaded.memory_episode_ids == [0, 1]
    assert torch.equal(reloaded.memory_read(vision_features=vision), expected_readout)
    reloaded.memory_clear()
    reloaded.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / STORE_NAME).exists() and hf_load(tmp_path / "saved").memory_size == 0


def test_memory_api_errors_are_clear(exports: dict[str, Path], tmp_path: Path) -> None:
    model, tokenizer = hf_load(exports["f32"]), hf_tokenizer(exports["f32"])
    ids, mask = batch(tokenizer, ONE_SHOT)
    with pytest.raises(ValueError, match="memory_write needs the picture of each caption"):
        model.memory_write(ids, mask)
    with pytest.raises(ValueError, match="got 2 captions but 1 pictures"):
        model.memory_write(ids, mask, vision_features=torch.zeros(1, 768))
    with pytest.raises(ValueError, match=r"rows \[1\] give a non-finite key or value \(NaN or inf\); nothing was"):
        model.memory_write(ids, mask, vision_features=torch.tensor([[0.0] * 768, [float("nan")] * 768]))
    assert model.memory_size == 3
    many = model.memory_capacity + 1
    with pytest.raises(ValueError, match=f"got {many} episodes but the store holds at most {many - 1}"):
        model.memory_write(ids[:1].expand(many, -1), vision_features=torch.zeros(many, 768))
    assert model.memory_size == 3
    (tmp_path / STORE_NAME).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="is not an episodic store of this model"):
        model.memory_load(tmp_path)
    assert model.memory_size == 3  # the store in use is kept
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="the memory prior is torch.bfloat16"):
        model.memory_read(vision_features=torch.zeros(1, 768))
    no_memory = make_checkpoint(tmp_path / "run", ("model.use_memory=false",))
    plain = hf_load(export_checkpoint(no_memory, tmp_path / "plain", dtype="float32"))
    assert plain.memory_size == 0 and plain.memory_capacity == 0
    with pytest.raises(ValueError, match="built with model.use_memory=false"):
        plain.memory_write(ids, mask, vision_features=torch.zeros(2, 768))


# ------------------------------------------------------------------------------------------------- fresh process

_FRESH_PROCESS = r"""
import sys


class _BlockBitmar:
    def find_spec(self, name, path=None, target=None):
        if name == "bitmar" or name.startswith("bitmar."):
            raise ImportError(f"bitmar is blocked in this process: {name}")
        return None


sys.meta_path.insert(0, _BlockBitmar())
try:
    import bitmar  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("bitmar must not be importable here")

import torch
import transformers

out = {}
for kind, path in (("f32", sys.argv[1]), ("f32_packed", sys.argv[2])):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    enc = tokenizer(sys.argv[4:], padding=True, return_tensors="pt")
    with torch.no_grad():
        out[kind] = model(**enc).logits
    if kind == "f32_packed":  # no compiler here (CXX=/bin/false): the packed layers took the pure-torch path
        out["packed_kernel_used"] = torch.tensor(sys.modules[type(model).__module__].packed_kernel_decision()["use"])
    prompt = tokenizer(["the cat"], return_tensors="pt")
    out[kind + "_generate"] = model.generate(**prompt, max_new_tokens=5)
    out["prompt"] = prompt["input_ids"]
    out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]

# One-shot learning through the export alone: the carried store, a new episode, a read, generation from it.
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tokenizer = transformers.AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
out["store_episodes"] = torch.tensor(model.memory_size)
model.memory_clear()
episode = tokenizer(["the dax sat on the mat"], return_tensors="pt")
vision = torch.randn(1, 768, generator=torch.Generator().manual_seed(7))
model.memory_write(**episode, vision_features=vision)
out["episode"], out["vision"] = episode["input_ids"], vision
out["readout"] = model.memory_read(vision_features=vision)
out["memory_generate"] = model.generate(vision_features=vision, use_memory=True, max_new_tokens=6)
model.save_pretrained(sys.argv[3] + ".saved")
reloaded = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[3] + ".saved", trust_remote_code=True)
out["reloaded_readout"] = reloaded.memory_read(vision_features=vision)
assert not [m for m in sys.modules if m == "bitmar" or m.startswith("bitmar.")]
torch.save(out, sys.argv[3])
"""


@pytest.mark.slow
def test_export_loads_in_a_fresh_process_without_bitmar(
    exports: dict[str, Path], reference: BitMar, tmp_path: Path
) -> None:
    script = tmp_path / "load_export.py"
    script.write_text(_FRESH_PROCESS, encoding="utf-8")
    result_file = tmp_path / "result.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    # One thread like this process (conftest): float64 memory solves are bit-identical only at equal thread counts.
    env["OMP_NUM_THREADS"] = "1"
    # No compiler and an empty kernel cache: the packed kernel cannot build, the export falls back to pure torch.
    env["CXX"], env["TORCH_EXTENSIONS_DIR"] = "/bin/false", str(tmp_path / "no_kernels")
    # The command line itself, in a real process (started alongside): a missing checkpoint is exit status 2.
    cli = subprocess.Popen(
        [sys.executable, "-m", "bitmar.export", "--checkpoint", str(tmp_path / "missing.pt"), "--output_dir", "x"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(exports["f32"]), str(exports["f32_packed"]), str(result_file), *SENTENCES],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    _, cli_err = cli.communicate(timeout=300)
    assert cli.returncode == 2 and "does not exist" in cli_err and not (tmp_path / "x").exists()
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(result_file, weights_only=True)
    assert not bool(got["packed_kernel_used"])
    assert proc.stderr.count("PackedBitLinear on CPU: pure torch") == 1, proc.stderr[-3000:]  # one log line
    ids, mask = got["input_ids"], got["attention_mask"]
    with torch.no_grad():
        expected = reference(ids, mask, return_latents=False).logits
        generated = reference.generate(got["prompt"], max_new_tokens=5, eos_token_id=2, pad_token_id=0)
    real = mask.bool()
    for kind in ("f32", "f32_packed"):
        torch.testing.assert_close(got[kind][real], expected[real], atol=1e-5, rtol=1e-5)
        assert torch.equal(got[f"{kind}_generate"][:, got["prompt"].shape[1] :], generated)
    assert int(got["store_episodes"]) == 3
    with torch.no_grad():
        vision = got["vision"]
        store = package_store(
            reference, reference.memory_key(vision), reference.episode_latent(got["episode"], None, vision)
        )
        readout, _ = reference.read_memory(store.state, key=reference.memory_key(vision))
        recalled = reference.generate(
            memory_readout=readout, bos_token_id=1, max_new_tokens=6, eos_token_id=2, pad_token_id=0
        )
    assert torch.equal(got["readout"], readout) and torch.equal(got["reloaded_readout"], readout)
    assert torch.equal(got["memory_generate"][:, 1:], recalled)
