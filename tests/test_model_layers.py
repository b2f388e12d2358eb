"""Unit tests of the BitNet transformer building blocks (rotary, attention, masks, KV cache, MLP)."""

from __future__ import annotations

import pytest
import torch

from bitmar.bitnet import BitLinear
from bitmar.model.decoder import causal_attention_mask
from bitmar.model.layers import (
    Attention,
    GluMLP,
    KVCache,
    RotaryEmbedding,
    TransformerBlock,
    apply_rotary,
    key_padding_mask,
    kv_heads,
    mlp_hidden_size,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny tensors: extra threads only add synchronisation (and stall badly on a shared, busy CPU).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _attention(cross: bool = False, heads: int = 4, kv: int = 2, quantize: bool = True) -> Attention:
    torch.manual_seed(0)
    return Attention(32, heads, kv, cross=cross, context_dim=24 if cross else None, quantize=quantize).eval()


def test_rotary_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pq: int, pk: int) -> float:
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return float((apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum())

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    cos, sin = rope(torch.zeros(1, 3, dtype=torch.long))
    assert torch.equal(apply_rotary(q.expand(1, 1, 3, 8), cos, sin), q.expand(1, 1, 3, 8))  # position 0 = identity
    bf16 = RotaryEmbedding(8).to(torch.bfloat16)  # nothing to round: angles stay float32 after a dtype cast
    assert torch.equal(bf16(torch.tensor([[1000]]))[0], rope(torch.tensor([[1000]]))[0])
    with pytest.raises(ValueError, match="even head dimension"):
        RotaryEmbedding(7)


@pytest.mark.parametrize("cross", [False, True])
def test_explicit_weights_path_matches_sdpa(cross: bool):
    attn = _attention(cross)
    x = torch.randn(2, 6, 32)
    ctx = torch.randn(2, 5, 24) if cross else None
    mask = None if cross else key_padding_mask(torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]]))
    fast, none = attn(x, ctx, attn_mask=mask)
    slow, weights = attn(x, ctx, attn_mask=mask, need_weights=True)
    assert none is None
    tk = 5 if cross else 6
    assert weights.shape == (2, 4, 6, tk)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    if not cross:
        assert torch.all(weights[1, :, :, 4:] == 0)  # padded keys get no attention


def test_causal_weights_are_lower_triangular():
    attn = _attention()
    x = torch.randn(2, 5, 32)
    fast, _ = attn(x, is_causal=True)
    slow, weights = attn(x, is_causal=True, need_weights=True)
    assert torch.all(weights.triu(diagonal=1) == 0)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_head_gates_switch_heads_and_give_gradients():
    attn = _attention()
    x = torch.randn(2, 5, 32)
    base, _ = attn(x)
    assert attn.head_gates.shape == (4,) and attn.num_heads == 4
    assert "head_gates" not in attn.state_dict()  # analysis state, never checkpointed
    attn.head_gates[1] = 0.0
    off, _ = attn(x)
    assert not torch.allclose(off, base)
    attn.head_gates.fill_(1.0)
    assert torch.equal(attn(x)[0], base)
    attn.head_gates.zero_()
    # every head off: the output projection sees zeros, and a BitLinear maps zeros to zeros (no bias)
    assert torch.equal(attn(x)[0], torch.zeros_like(base))
    attn.head_gates.fill_(1.0).requires_grad_(True)
    attn(x)[0].square().sum().backward()
    assert attn.head_gates.grad is not None and attn.head_gates.grad.shape == (4,)
    assert bool((attn.head_gates.grad.abs() > 0).all())


def test_grouped_query_attention_shapes_and_errors():
    attn = _attention(heads=4, kv=1)
    assert attn.qkv_proj.out_features == 32 + 2 * 8  # one key/value head of width 8
    out, w = attn(torch.randn(3, 4, 32), need_weights=True)
    assert out.shape == (3, 4, 32) and w.shape == (3, 4, 4, 4)
    assert kv_heads(12, 4) == 3 and kv_heads(4, 1) == 4
    with pytest.raises(ValueError, match="gqa_group_size"):
        kv_heads(12, 5)
    with pytest.raises(ValueError, match="not divisible"):
        Attention(30, 4)


def test_kv_cache_incremental_equals_full_sequence():
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, 2, 64).eval()
    x = torch.randn(2, 7, 32)
    full, _ = block(x, is_causal=True)
    cache = KVCache(1, max_length=7)
    pieces = []
    # prefill 3 positions, then one at a time with rotary offsets
    out, _ = block(x[:, :3], is_causal=True, cache=cache)
    cache.advance(3)
    pieces.append(out)
    for t in range(3, 7):
        positions = torch.full((2, 1), t)
        out, _ = block(x[:, t : t + 1], positions=positions, cache=cache)
        cache.advance(1)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="overflow"):
        block(x[:, :1], positions=torch.full((2, 1), 7), cache=cache)


def test_key_padding_mask_and_empty_rows():
    assert key_padding_mask(None) is None
    assert key_padding_mask(torch.ones(2, 3)) is None
    mask = key_padding_mask(torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert mask.shape == (2, 1, 1, 3)
    assert mask[0, 0, 0].tolist() == [True, True, False]
    assert mask[1, 0, 0].tolist() == [True, True, True]  # an empty sequence attends everywhere, never NaN
    attn = _attention()
    out, _ = attn(torch.randn(2, 3, 32), attn_mask=mask)
    assert torch.isfinite(out).all()


def test_causal_attention_mask_layouts():
    dev = torch.device("cpu")
    assert causal_attention_mask(None, 4, 0, dev) == (None, True)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert causal_attention_mask(right, 4, 0, dev) == (None, True)  # right padding: causality alone suffices
    assert causal_attention_mask(torch.ones(2, 6), 1, 5, dev) == (None, False)  # one new token sees all keys
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    mask, is_causal = causal_attention_mask(left, 4, 0, dev)
    assert not is_causal and mask.shape == (2, 1, 4, 4)
    assert mask[0, 0].tolist() == [
        [True, False, False, False],  # the pad sees itself only, so its row is not empty
        [False, True, False, False],
        [False, True, True, False],
        [False, True, True, True],
    ]
    assert torch.equal(mask[1, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    mask, _ = causal_attention_mask(torch.ones(1, 5), 2, 3, dev)  # a 2-token chunk after 3 cached positions
    assert mask[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]


def test_glu_mlp_width_and_quantized_projections():
    assert mlp_hidden_size(768, 4.0) == 2048  # 2/3 rule: same parameters as a 4x plain MLP
    assert mlp_hidden_size(128, 4.0) % 64 == 0
    mlp = GluMLP(32, 64)
    assert isinstance(mlp.gate_up, BitLinear) and mlp.gate_up.quantize
    assert mlp(torch.randn(2, 3, 32)).shape == (2, 3, 32)
    assert not GluMLP(32, 64, quantize=False).down.quantize


def test_cross_attention_requires_context():
    attn = _attention(cross=True)
    with pytest.raises(ValueError, match="context"):
        attn(torch.randn(1, 2, 32))
