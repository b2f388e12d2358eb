"""BitMar assembly: shapes across configurations, memory integration, numerics, gradients, analysis hooks."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_model import TINY_MODEL

from bitmar.bitnet import BitLinear, pack_model
from bitmar.config import load_config
from bitmar.memory import MemoryState
from bitmar.model import BitMar, BitMarOutput
from bitmar.model.model_config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CFG = TINY_MODEL
B, T = 3, 7


def _model(cfg: ModelConfig = CFG, **overrides) -> BitMar:
    torch.manual_seed(0)
    return BitMar(replace(cfg, **overrides))


def _inputs(cfg: ModelConfig = CFG, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask, torch.randn(B, cfg.vision_encoder_dim, generator=g)


def _state_equal(a: MemoryState, b: MemoryState) -> bool:
    fields = ("memory", "precision", "moment", "usage", "age")
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields) and a.num_episodes == b.num_episodes


VARIANTS = {
    "default": {},
    "full_precision": {"quantize": False},
    "fp_vision": {"vision_quantization": False},
    "no_memory": {"use_memory": False},
    "no_vision": {"use_vision": False},
    "text_only": {"use_vision": False, "use_memory": False},
    "untied_head": {"tie_embeddings": False},
    "multi_head": {"gqa_group_size": 1},
    "split_latents": {"text_latent_size": 16},
    "no_mixing_layers": {"fusion_layers": 0, "vision_layers": 0},
    "patch_tokens": {},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_shapes_across_configurations(name: str):
    cfg = replace(CFG, **VARIANTS[name])
    model = _model(cfg).eval()
    ids, mask, vision = _inputs(cfg)
    if name == "patch_tokens":
        vision = torch.randn(B, 5, cfg.vision_encoder_dim, dtype=torch.float16)  # .npy features may be float16
    kwargs: dict = {}
    if cfg.use_vision:
        kwargs["vision_features"] = vision
    if cfg.use_memory:
        keys = torch.randn(4, cfg.episode_dim)
        kwargs["memory_state"] = model.write_memory(keys, torch.randn(4, cfg.episode_dim))
    with torch.no_grad():
        out = model(ids, mask, return_memory_diagnostics=True, **kwargs)
    assert isinstance(out, BitMarOutput)
    assert out.logits.shape == (B, T, cfg.vocab_size) and out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all()
    assert out.text_latent.shape == (B, cfg.text_latent_size)
    num_vision = (5 if name == "patch_tokens" else cfg.vision_num_tokens) if cfg.use_vision else 0
    assert out.prefix_length == num_vision + (cfg.memory_readout_tokens if cfg.use_memory else 0)
    if cfg.use_vision:
        assert out.vision_latent.shape == (B, cfg.vision_latent_size)
        assert out.multimodal_latent.shape == (B, cfg.episode_dim)
        assert model.episode_latent(ids, mask, vision).shape == (B, cfg.episode_dim)
        assert model.memory_key(vision).shape == (B, cfg.episode_dim) if cfg.use_memory else True
    else:
        assert out.vision_latent is None and out.multimodal_latent is None
    if cfg.use_memory:
        assert out.memory_readout.shape == (B, cfg.episode_dim)
        assert out.memory_weights.shape == (B, cfg.memory_size)
        assert isinstance(out.memory_diagnostics, dict) and "active_pct" in out.memory_diagnostics
        assert model.text_memory_key(ids, mask).shape == (B, cfg.episode_dim)
    else:
        assert out.memory_readout is None and out.memory_weights is None and model.memory is None
    lean = model(ids, mask, return_latents=False, **kwargs)
    assert lean.text_latent is None and lean.multimodal_latent is None
    torch.testing.assert_close(lean.logits, out.logits)


def test_quantization_switches_reach_the_right_layers():
    layers = {name: m for name, m in _model().named_modules() if isinstance(m, BitLinear)}
    assert all(m.quantize for m in layers.values())
    fp_vision = {name: m for name, m in _model(vision_quantization=False).named_modules() if isinstance(m, BitLinear)}
    assert all(m.quantize == (not name.startswith("vision_encoder.")) for name, m in fp_vision.items())
    assert any(name.startswith("vision_encoder.") for name in fp_vision)
    fp = _model(quantize=False)
    assert not any(m.quantize for m in fp.modules() if isinstance(m, BitLinear))
    assert fp.quantization_report()["ternary_params"] == 0
    report = _model().quantization_report()
    assert 0.5 < report["ternary_fraction"] < 1.0  # embeddings, norms, positions and the memory prior stay float
    assert report["compression_ratio"] == pytest.approx(16.0, rel=0.01)  # float32 -> 2 bits


def test_memory_readout_recalls_the_stored_value_for_the_same_picture():
    model = _model().eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, CFG.vocab_size, (10, T), generator=g)
    vision = torch.randn(10, CFG.vision_encoder_dim, generator=g)
    with torch.no_grad():
        keys = model.memory_key(vision)  # (10, E)
        values = model.episode_latent(ids, None, vision)  # (10, E)
        state = model.write_memory(keys, values)
        out = model(ids[3:6], vision_features=vision[3:6], memory_state=state)
        readout, weights = model.read_memory(state, vision_features=vision[3:6])
    torch.testing.assert_close(out.memory_readout, values[3:6], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(readout, out.memory_readout)
    assert weights.shape == (3, CFG.memory_size)


def test_evaluation_never_modifies_a_memory_state():
    model = _model().eval()
    ids, mask, vision = _inputs()
    state = model.write_memory(torch.randn(5, CFG.episode_dim), torch.randn(5, CFG.episode_dim)).detach()
    snapshot = state.clone()
    with torch.no_grad():
        model(ids, mask, vision_features=vision, memory_state=state, return_memory_diagnostics=True)
        model(ids, mask, memory_state=state)  # text key
        model.read_memory(state, vision_features=vision)
        model.generate(ids, mask, vision_features=vision, memory_state=state, max_new_tokens=3)
    assert _state_equal(state, snapshot)


@pytest.mark.parametrize("train", [False, True])
def test_all_zero_vision_features_give_finite_outputs(train: bool):
    model = _model().train(train)
    ids, mask, _ = _inputs()
    zeros = torch.zeros(B, CFG.vision_encoder_dim)
    with torch.no_grad():
        state = model.write_memory(model.memory_key(zeros), model.episode_latent(ids, mask, zeros))
        out = model(ids, mask, vision_features=zeros, memory_state=state)
    for name in ("logits", "text_latent", "vision_latent", "multimodal_latent", "memory_readout", "memory_weights"):
        assert torch.isfinite(getattr(out, name)).all(), name
    assert torch.isfinite(state.memory).all()


@pytest.mark.parametrize("vision_copy", [False, True])
def test_bfloat16_autocast_on_cpu(vision_copy: bool):
    model = _model(vision_copy=vision_copy).train()
    ids, mask, vision = _inputs()
    state = model.write_memory(torch.randn(4, CFG.episode_dim), torch.randn(4, CFG.episode_dim))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, mask, vision_features=vision, memory_state=state)
        loss = F.cross_entropy(out.logits[:, :-1].float().reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))
    # The decoder's logits stay bfloat16; the vision copy path adds its log-mixture in float32 (as the memory's does).
    assert out.logits.dtype == (torch.float32 if vision_copy else torch.bfloat16)
    assert torch.isfinite(out.logits.float()).all() and torch.isfinite(out.multimodal_latent.float()).all()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradients_reach_every_trainable_parameter():
    model = _model(text_latent_size=16).train()  # split latents: the separate text key projection exists too
    ids, mask, vision = _inputs(replace(CFG, text_latent_size=16))
    patches = torch.randn(B, 4, CFG.vision_encoder_dim)
    keys = model.memory_key(vision)
    values = model.episode_latent(ids, mask, vision)
    state = model.write_memory(keys, values)
    out = model(ids, mask, vision_features=vision, memory_state=state)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))
    loss = lm + out.text_latent.square().mean() + out.vision_latent.square().mean()
    loss = loss + out.multimodal_latent.square().mean() + 0.01 * model.memory.kl_divergence(out.memory_weights)
    loss = loss + model(ids, mask, vision_features=patches).logits.logsumexp(-1).mean()  # patch-token path
    loss = loss + model(ids, mask, memory_state=state).memory_readout.square().mean()  # text-key path
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], f"parameters without gradient: {missing}"
    nonfinite = [name for name, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert nonfinite == []
    zero = [name for name, p in model.named_parameters() if not bool(p.grad.abs().sum() > 0)]
    assert zero == [], f"parameters with an all-zero gradient: {zero}"


def test_attention_maps_shapes_and_normalisation():
    model = _model().eval()
    ids, mask, vision = _inputs()
    readout = torch.randn(B, CFG.episode_dim)
    with torch.no_grad():
        out = model(ids, mask, vision_features=vision, memory_readout=readout, output_attentions=True)
        plain = model(ids, mask, vision_features=vision, memory_readout=readout)
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-4, rtol=1e-4)
    att, p, n, h = out.attentions, out.prefix_length, CFG.vision_num_tokens, 4
    assert set(att) == {"encoder", "decoder", "cross_modal", "vision"}
    expected = {
        "encoder": (CFG.encoder_layers, (B, h, T, T)),
        "decoder": (CFG.decoder_layers, (B, h, p + T, p + T)),
        "cross_modal": (CFG.fusion_layers, (B, h, T, n)),
        "vision": (CFG.vision_layers, (B, h, n, n)),
    }
    for name, (layers, shape) in expected.items():
        assert len(att[name]) == layers, name
        for w in att[name]:
            assert w.shape == shape, name
            torch.testing.assert_close(w.sum(-1), torch.ones(shape[:-1]))
    assert all(torch.all(w.triu(diagonal=1) == 0) for w in att["decoder"])  # causal
    assert torch.all(att["encoder"][0][1, :, :, 5:] == 0)  # padding is never attended to in the encoder
    modules = model.attention_modules()
    assert {k: len(v) for k, v in modules.items()} == {k: v[0] for k, v in expected.items()}
    assert all(m.head_gates.shape == (m.num_heads,) for ms in modules.values() for m in ms)


def test_head_gate_zero_changes_output_and_one_restores_it():
    model = _model().eval()
    ids, mask, vision = _inputs()
    with torch.no_grad():
        base = model(ids, mask, vision_features=vision).logits
        gates = model.attention_modules()["decoder"][0].head_gates
        gates[2] = 0.0
        off = model(ids, mask, vision_features=vision).logits
        gates[2] = 1.0
        back = model(ids, mask, vision_features=vision).logits
    assert not torch.allclose(off, base)
    assert torch.equal(back, base)


def test_state_dict_round_trip_and_packed_inference():
    model = _model().eval()
    ids, mask, vision = _inputs()
    readout = torch.randn(B, CFG.episode_dim)
    sd = model.state_dict()
    assert not any("head_gates" in k for k in sd)
    assert "embed_tokens.weight" in sd and not any(k.endswith("lm_head.weight") for k in sd)  # tied, stored once
    clone = BitMar(CFG).eval()
    clone.load_state_dict(sd, strict=True)
    with torch.no_grad():
        ref = model(ids, mask, vision_features=vision, memory_readout=readout).logits
        assert torch.equal(clone(ids, mask, vision_features=vision, memory_readout=readout).logits, ref)
        packed = pack_model(copy.deepcopy(model))
        assert not any(isinstance(m, BitLinear) for m in packed.modules())
        out = packed(ids, mask, vision_features=vision, memory_readout=readout).logits
    # Integer accumulation (packed) and float accumulation (training path) agree to ~1e-7, but an activation that
    # sits on a rounding boundary may land one int8 step apart and shift a whole sequence's logits slightly.
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    assert float((out - ref).abs().median()) < 1e-5


def test_clear_errors_for_wrong_inputs():
    ids, mask, vision = _inputs()
    readout = torch.randn(B, CFG.episode_dim)
    with pytest.raises(ValueError, match="use_vision=false"):
        _model(use_vision=False)(ids, vision_features=vision)
    with pytest.raises(ValueError, match="use_memory=false"):
        _model(use_memory=False)(ids, memory_readout=readout)
    model = _model()
    with pytest.raises(ValueError, match="vision_encoder_dim"):
        model(ids, vision_features=torch.randn(B, 7))
    with pytest.raises(ValueError, match="vocab_size"):
        model(ids + CFG.vocab_size)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids, mask[:, :3])
    with pytest.raises(ValueError, match="batch size"):
        model(ids, vision_features=vision[:2])
    with pytest.raises(ValueError, match="memory_readout must have shape"):
        model(ids, memory_readout=readout[:, :5])
    with pytest.raises(ValueError, match="needs vision_features"):
        model.episode_latent(ids, mask)
    state = model.write_memory(torch.randn(2, CFG.episode_dim), torch.randn(2, CFG.episode_dim))
    with pytest.raises(ValueError, match="explicit key"):
        model.read_memory(state)


def test_shipped_configurations_build_within_budget():
    tiny = BitMar(load_config(ROOT / "configs" / "bitmar_tiny.yaml").model)
    assert tiny.num_parameters() < 3_000_000
    full = BitMar(load_config(ROOT / "configs" / "bitmar_config.yaml").model)
    count = full.num_parameters()
    assert 80_000_000 < count <= 100_000_000, count  # the budget: at most 100M parameters
    assert sum(full.parameter_breakdown().values()) == count  # the tied LM head is not counted twice
    assert full.num_parameters(trainable_only=True) == count
