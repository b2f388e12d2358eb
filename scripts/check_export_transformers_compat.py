"""Check that a BitMar Hugging Face export loads and gives the same outputs under another transformers version.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/check_export_transformers_compat.py [--transformers 4.51.3]
        [--venv /tmp/tf451] [--workdir /tmp/bitmar_export_compat]

1. Creates (once) a venv at --venv with `python3.11 -m venv`, holding torch (the dev venv's exact build, e.g.
   2.13.0+cpu: an unpinned torch would pull the CUDA build), transformers==--transformers, pillow, and NOT bitmar.
2. In this process (the dev venv, current transformers): builds a tiny random BitMar checkpoint with its own BPE
   tokenizer and a tiny random DINOv2 (what tests/test_export.py builds), exports it four ways (float32, packed
   float32, packed bfloat16 = the default, packed float32 with the DINOv2 backbone) and saves reference outputs: the
   training model's logits and greedy generations, and the exports' logits loaded with the current transformers.
3. In a fresh process of the other venv (bitmar blocked from import, no network): AutoConfig, AutoTokenizer,
   AutoProcessor and AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) for each export; compares
   token ids, logits (with / without attention mask, with vision features, with pixel_values through the stored
   DINOv2), left-padded greedy generate(), summed minimal-pair log-probabilities and the loss with the references.

Float32 logits must agree within 1e-5; bfloat16 logits within 1e-2 (bfloat16 matmul kernels may differ). Exits 0 when
every check passes, 1 otherwise, printing one line per check.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

SENTENCES = [
    "the cat sat on the mat",
    "a dog runs in the park",
    "the bird sings a song",
    "children play with a red ball",
    "the cats sat on the mat",
    "a dogs runs in the park",
]
PROMPTS = ["the cat", "children play with a"]
KINDS = ("f32", "f32_packed", "bf16_packed")
NEW_TOKENS = 6


# ------------------------------------------------------------------------------------------------- reference side


def export_and_reference(workdir: Path) -> None:
    """Dev venv: tiny checkpoint -> exports -> reference outputs (workdir/reference.pt)."""
    import torch
    import transformers

    from bitmar.export import export_checkpoint

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "tests"))
    from test_export import make_checkpoint, training_model  # the checkpoint the export tests use

    ckpt = make_checkpoint(workdir / "run")
    reference = training_model(ckpt)
    exports = {
        "f32": export_checkpoint(ckpt, workdir / "f32", dtype="float32"),
        "f32_packed": export_checkpoint(ckpt, workdir / "f32_packed", packed=True, dtype="float32"),
        "bf16_packed": export_checkpoint(ckpt, workdir / "bf16_packed", packed=True),  # the default dtype
    }
    torch.manual_seed(1)
    dinov2 = workdir / "dinov2"
    transformers.Dinov2Model(
        transformers.Dinov2Config(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=224, patch_size=14
        )
    ).save_pretrained(dinov2)
    vision_ckpt = make_checkpoint(workdir / "run_vision", ("model.vision_encoder_dim=32",))
    vision_reference = training_model(vision_ckpt)
    exports["vision"] = export_checkpoint(
        vision_ckpt, workdir / "vision", packed=True, vision_backbone=str(dinov2), dtype="float32"
    )

    tokenizer = transformers.AutoTokenizer.from_pretrained(exports["f32"], trust_remote_code=True)
    tokenizer.padding_side = "right"
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    tokenizer.padding_side = "left"
    left = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    tokenizer.padding_side = "right"
    right = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    vision = torch.randn(len(SENTENCES), 768, generator=torch.Generator().manual_seed(0))
    pixels = torch.rand(2, 224, 224, 3, generator=torch.Generator().manual_seed(2))
    ref: dict[str, Any] = {
        "transformers": transformers.__version__,
        "torch": str(torch.__version__),  # a plain string: the other side loads with weights_only=True
        "input_ids": ids,
        "attention_mask": mask,
        "left_ids": left["input_ids"],
        "left_mask": left["attention_mask"],
        "vision": vision,
        "images": (pixels * 255).to(torch.uint8),
        "exports": {k: str(v) for k, v in exports.items()},
    }
    with torch.no_grad():
        ref["train_logits"] = reference(ids, mask, return_latents=False).logits
        ref["train_logits_vision"] = reference(ids, mask, vision_features=vision, return_latents=False).logits
        for suffix, features in (("", None), ("_vision", vision[: len(PROMPTS)])):
            ref[f"train_generate{suffix}"] = reference.generate(
                right["input_ids"],
                right["attention_mask"],
                vision_features=features,
                max_new_tokens=NEW_TOKENS,
                eos_token_id=2,
                pad_token_id=0,
            )
        for kind in KINDS:
            model = transformers.AutoModelForCausalLM.from_pretrained(exports[kind], trust_remote_code=True)
            ref[f"{kind}_dtype"] = str(model.dtype)
            ref[f"{kind}_logits"] = model(input_ids=ids, attention_mask=mask).logits.float()
        upcast = transformers.AutoModelForCausalLM.from_pretrained(
            exports["bf16_packed"], trust_remote_code=True, dtype=torch.float32
        )
        ref["bf16_packed_upcast_logits"] = upcast(input_ids=ids, attention_mask=mask).logits
        processor = transformers.AutoProcessor.from_pretrained(exports["vision"], trust_remote_code=True)
        from PIL import Image

        images = [Image.fromarray(p.numpy()) for p in ref["images"]]
        inputs = processor(text=SENTENCES[:2], images=images, padding=True, return_tensors="pt")
        model = transformers.AutoModelForCausalLM.from_pretrained(exports["vision"], trust_remote_code=True)
        ref["vision_inputs"] = dict(inputs)
        ref["vision_logits"] = model(**inputs).logits
        # The DINOv2 CLS feature computed directly from the saved backbone, not through the export.
        features = transformers.Dinov2Model.from_pretrained(dinov2).eval()(inputs["pixel_values"]).pooler_output
        ref["vision_train_logits"] = vision_reference(
            inputs["input_ids"], inputs["attention_mask"], vision_features=features, return_latents=False
        ).logits
    torch.save(ref, workdir / "reference.pt")


# ------------------------------------------------------------------------------------------------- other-version side

_BLOCK = """
class _BlockBitmar:
    def find_spec(self, name, path=None, target=None):
        if name == "bitmar" or name.startswith("bitmar."):
            raise ImportError(f"bitmar is blocked in this process: {name}")
        return None
"""


def load_and_compare(workdir: Path) -> int:
    """Other venv, fresh process: load every export and compare with workdir/reference.pt. Returns the exit code."""
    namespace: dict[str, Any] = {}
    exec(_BLOCK, namespace)
    sys.meta_path.insert(0, namespace["_BlockBitmar"]())
    import torch
    import transformers
    from PIL import Image

    torch.set_num_threads(1)
    ref = torch.load(workdir / "reference.pt", weights_only=True)  # tensors, strings and dicts only
    exports = {k: Path(v) for k, v in ref["exports"].items()}
    ids, mask, real = ref["input_ids"], ref["attention_mask"], ref["attention_mask"].bool()
    print(f"reference: transformers {ref['transformers']}, torch {ref['torch']}")
    print(f"this side: transformers {transformers.__version__}, torch {torch.__version__}")
    results: list[tuple[str, bool, str]] = []

    def check(name: str, fn: Any) -> None:
        try:
            detail = fn() or ""
            results.append((name, True, detail))
        except Exception as err:  # noqa: BLE001 - every failure is reported, then the next check runs
            results.append((name, False, f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"))
            traceback.print_exc()

    def close(got: torch.Tensor, expected: torch.Tensor, atol: float) -> str:
        diff = (got.float() - expected.float()).abs().max().item()
        if got.shape != expected.shape or not diff <= atol:
            raise AssertionError(f"shape {tuple(got.shape)} vs {tuple(expected.shape)}, max |diff| {diff:.3g} > {atol}")
        return f"max |diff| {diff:.2g}"

    def load(kind: str, **kwargs: Any) -> Any:
        # As the BabyLM 2025 pipeline loads (sentence_zero_shot/run.py): no dtype argument, revision None.
        kwargs.setdefault("revision", None)
        return transformers.AutoModelForCausalLM.from_pretrained(exports[kind], trust_remote_code=True, **kwargs)

    def tokenizer_ids() -> str:
        tok = transformers.AutoTokenizer.from_pretrained(exports["f32"], trust_remote_code=True)
        tok.padding_side = "right"
        enc = tok(SENTENCES, padding=True, return_tensors="pt")
        assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)
        assert "token_type_ids" not in enc
        tok.padding_side = "left"
        left = tok(PROMPTS, padding=True, return_tensors="pt")
        assert torch.equal(left["input_ids"], ref["left_ids"]), "left padding"
        return f"{type(tok).__name__}, BOS {tok.bos_token_id} first"

    def config() -> str:
        cfg = transformers.AutoConfig.from_pretrained(exports["f32_packed"], trust_remote_code=True)
        assert cfg.packed is True and cfg.model_type == "bitmar"
        return f"{type(cfg).__name__}, max_position_embeddings {cfg.max_position_embeddings}"

    def logits(kind: str) -> str:
        model = load(kind)
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
            unmasked = model(ids).logits
            with_vision = model(input_ids=ids, attention_mask=mask, vision_features=ref["vision"]).logits
        assert got.dtype == torch.float32
        a = close(got[real], ref["train_logits"][real], 1e-5)
        close(got[real], ref[f"{kind}_logits"][real], 1e-5)
        close(unmasked[real], ref["train_logits"][real], 1e-5)
        close(with_vision[real], ref["train_logits_vision"][real], 1e-5)
        return f"vs training model and vs transformers {ref['transformers']}: {a}"

    def bf16(dtype: Any) -> Any:
        def run() -> str:
            model = load("bf16_packed", **({} if dtype is None else {"torch_dtype": dtype}))
            with torch.no_grad():
                got = model(input_ids=ids, attention_mask=mask).logits
            qkv = model.model.decoder.blocks[0].attn.qkv_proj
            assert type(qkv).__name__ == "PackedBitLinear" and qkv.norm.weight.dtype == torch.float32, "packed layer"
            if model.dtype == torch.float32:  # same as transformers 5.x with dtype=torch.float32
                return f"loads as {model.dtype}; " + close(got[real], ref["bf16_packed_upcast_logits"][real], 1e-5)
            assert model.dtype == torch.bfloat16, model.dtype
            assert str(model.dtype) == ref["bf16_packed_dtype"], (model.dtype, ref["bf16_packed_dtype"])
            return f"loads as {model.dtype}; " + close(got[real], ref["bf16_packed_logits"][real], 1e-2)

        return run

    def generate(kind: str) -> str:
        model = load(kind)
        for suffix, features in (("", None), ("_vision", ref["vision"][: len(PROMPTS)])):
            out = model.generate(
                input_ids=ref["left_ids"],
                attention_mask=ref["left_mask"],
                vision_features=features,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
            new, expected = out[:, ref["left_ids"].shape[1] :], ref[f"train_generate{suffix}"]
            assert torch.equal(new, expected), f"{suffix or 'text'}: {new.tolist()} vs {expected.tolist()}"
        return f"greedy, left padded, {NEW_TOKENS} tokens, with/without vision: equal to BitMar.generate"

    def scoring_and_loss() -> str:
        model = load("f32_packed")
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
            tup = model(input_ids=ids, attention_mask=mask, return_dict=False)
        expected = ref["train_logits"]
        logp = torch.log_softmax(out.logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        ref_logp = torch.log_softmax(expected[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        counted = (mask[:, 1:] * mask[:, :-1]).float()
        close((logp * counted).sum(-1), (ref_logp * counted).sum(-1), 1e-4)
        assert torch.isfinite(out.loss) and out.loss > 0 and tup[0].shape == out.logits.shape
        return "summed log-probs after BOS equal; loss finite; return_dict=False gives a tuple"

    def vision_processor() -> str:
        processor = transformers.AutoProcessor.from_pretrained(exports["vision"], trust_remote_code=True)
        images = [Image.fromarray(p.numpy()) for p in ref["images"]]
        inputs = processor(text=SENTENCES[:2], images=images, padding=True, return_tensors="pt")
        for key, value in ref["vision_inputs"].items():
            close(inputs[key].float(), value.float(), 1e-6)
        model = load("vision")
        with torch.no_grad():
            got = model(**inputs).logits
        r = inputs["attention_mask"].bool()
        close(got[r], ref["vision_logits"][r], 1e-5)
        detail = close(got[r], ref["vision_train_logits"][r], 1e-5)
        # What the BabyLM 2025 pipeline calls: AutoProcessor(padding_side=...), one image, offsets, lists out.
        pipeline = transformers.AutoProcessor.from_pretrained(
            exports["vision"], padding_side="right", trust_remote_code=True
        )
        enc = pipeline(text="the cat sat", images=images[0], return_offsets_mapping=True)
        assert len(enc["offset_mapping"]) == len(enc["input_ids"])
        assert torch.FloatTensor(enc["pixel_values"]).shape == (1, 3, 224, 224)
        return f"{type(processor).__name__}; pixel_values through the stored DINOv2: {detail}"

    check("AutoConfig", config)
    check("AutoTokenizer ids", tokenizer_ids)
    for kind in ("f32", "f32_packed"):
        check(f"logits {kind}", lambda kind=kind: logits(kind))
        check(f"generate {kind}", lambda kind=kind: generate(kind))
    check("logits bf16_packed (default load)", bf16(None))
    check("logits bf16_packed (torch_dtype=auto)", bf16("auto"))
    check("logits bf16_packed (torch_dtype=float32)", bf16(torch.float32))
    check("scoring + loss f32_packed", scoring_and_loss)
    check("processor + DINOv2 export", vision_processor)
    assert not [m for m in sys.modules if m == "bitmar" or m.startswith("bitmar.")]

    print()
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name:42s} {detail}")
    failed = sum(not ok for _, ok, _ in results)
    print(f"\n{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------- driver


def ensure_venv(venv: Path, version: str, python: str) -> Path:
    exe = venv / "bin" / "python"
    have = (
        subprocess.run(
            [str(exe), "-c", "import PIL, torch, transformers; print(transformers.__version__)"],
            capture_output=True,
            text=True,
        )
        if exe.exists()
        else None
    )
    if have is not None and have.returncode == 0 and have.stdout.strip() == version:
        return exe
    import torch

    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    # The dev venv's exact build (2.13.0+cpu here, from the local wheel): never an unpinned (CUDA, multi-GB) torch.
    torch_pin = f"torch=={torch.__version__}"
    subprocess.run(
        [str(exe), "-m", "pip", "install", "--quiet", torch_pin, f"transformers=={version}", "pillow"], check=True
    )
    return exe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transformers", default="4.51.3", help="transformers version to check the export under")
    parser.add_argument("--venv", default="/tmp/tf451", help="venv for that version (created if missing)")
    parser.add_argument("--python", default="python3.11", help="interpreter that creates the venv")
    parser.add_argument("--workdir", default="/tmp/bitmar_export_compat", help="where the exports are written")
    parser.add_argument("--load", metavar="WORKDIR", help=argparse.SUPPRESS)  # internal: the other-version side
    args = parser.parse_args()
    if args.load:
        return load_and_compare(Path(args.load))

    import shutil

    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    exe = ensure_venv(Path(args.venv), args.transformers, args.python)
    print(f"exporting into {workdir} with this venv ({sys.executable})", flush=True)
    export_and_reference(workdir)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env.update(HF_MODULES_CACHE=str(workdir / "hf_modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    print(f"loading in a fresh process of {exe}", flush=True)
    return subprocess.run(
        [str(exe), str(Path(__file__).resolve()), "--load", str(workdir)], cwd=workdir, env=env
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
