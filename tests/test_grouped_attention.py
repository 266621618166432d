"""Grouped-query and multi-query attention (NOTE [Grouped heads]): query heads, key/value heads and
rotary q/k dims leave exactly, with key/value heads repeated as Hugging Face's ``repeat_kv`` does or
shared through ``F.scaled_dot_product_attention(..., enable_gqa=True)``."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import fxmin
from fxmin.zoo.llama import DecoderLayer, GroupedQueryAttention, llama, rotate_half
from helpers import check_minimize, random_masks

DIM, HD = 64, 16
FORMS = ["repeat", "sdpa"]


def _attention(heads=8, kv_heads=4, gqa="repeat", seed=0, **options):
    torch.manual_seed(seed)
    return GroupedQueryAttention(DIM, heads, kv_heads, head_dim=HD, gqa=gqa, **options).eval()


def _all_kept(model):
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters() if p.dim() == 2}


def _kill_query_heads(masks, heads, prefix=""):
    """Zero the output-projection columns of each query head in ``heads``: nothing reads it."""
    for head in heads:
        masks[f"{prefix}o_proj.weight"][:, head * HD:(head + 1) * HD] = False


def _inputs(seed=1, tokens=6):
    return (torch.randn(2, tokens, DIM, generator=torch.Generator().manual_seed(seed)),)


# before: q_proj 128x64, k_proj 64x64, v_proj 64x64, o_proj 64x128 (no biases)
BEFORE = 128 * 64 + 64 * 64 + 64 * 64 + 64 * 128


@pytest.mark.parametrize("gqa", FORMS)
def test_a_dead_group_takes_its_key_value_head(gqa):
    """8 query heads of 16 dims, 4 key/value heads: query heads 2 and 3 (all of group 1) are dead."""
    model = _attention(gqa=gqa)
    masks = _all_kept(model)
    _kill_query_heads(masks, (2, 3))
    # q_proj loses 2*16 rows, k_proj and v_proj 16 rows each, o_proj 2*16 columns (64 wide each)
    expected = BEFORE - 2 * 16 * 64 - 16 * 64 - 16 * 64 - 64 * 2 * 16
    result = check_minimize(model, masks, _inputs(), expected_params=expected)
    assert tuple(result.module.q_proj.weight.shape) == (96, 64)
    assert tuple(result.module.k_proj.weight.shape) == (48, 64)


@pytest.mark.parametrize("gqa", FORMS)
def test_equal_dead_counts_per_group_leave(gqa):
    """8 query heads, 2 key/value heads (groups of 4): one dead query head in each group."""
    model = _attention(kv_heads=2, gqa=gqa)
    masks = _all_kept(model)
    _kill_query_heads(masks, (1, 6))
    # q_proj 128x64 loses 2*16 rows, o_proj 2*16 columns; both key/value heads stay (k, v 32x64)
    before = 128 * 64 + 2 * 32 * 64 + 64 * 128
    expected = before - 2 * 16 * 64 - 64 * 2 * 16
    result = check_minimize(model, masks, _inputs(), expected_params=expected)
    if gqa == "repeat":  # repeat_kv's expand now makes 3 copies of each key/value head
        assert "expand(getitem, 2, 3, getitem_1, 16)" in result.module.code


@pytest.mark.parametrize("gqa", FORMS)
def test_unequal_dead_counts_keep_the_fullest_group(gqa):
    """Groups of 4: group 0 loses heads 1 and 2, group 1 only head 5. The repeat count is one
    number, so group 0 keeps 3 heads as group 1 does: heads 2 and 5 leave, head 1 stays."""
    model = _attention(kv_heads=2, gqa=gqa)
    masks = _all_kept(model)
    _kill_query_heads(masks, (1, 2, 5))
    before = 128 * 64 + 2 * 32 * 64 + 64 * 128
    expected = before - 2 * 16 * 64 - 64 * 2 * 16
    check_minimize(model, masks, _inputs(), expected_params=expected)


@pytest.mark.parametrize("gqa", FORMS)
def test_multi_query_attention(gqa):
    """One key/value head (n_kv = 1): 3 of 4 query heads dead leave, the key/value head stays."""
    model = _attention(heads=4, kv_heads=1, gqa=gqa)
    masks = _all_kept(model)
    _kill_query_heads(masks, (0, 2, 3))
    # q_proj 64x64 -> 16x64, k_proj and v_proj 16x64 stay, o_proj 64x64 -> 64x16
    expected = 16 * 64 + 16 * 64 + 16 * 64 + 64 * 16
    check_minimize(model, masks, _inputs(), expected_params=expected)


def _zero_rows(masks, name, heads, dims):
    for head in range(heads):
        for dim in dims:
            masks[name][head * HD + dim] = False


@pytest.mark.parametrize("gqa", FORMS)
@pytest.mark.parametrize("side", ["q", "k"])
def test_a_rotary_pair_leaves_every_head(gqa, side):
    """The pair (3, 3 + 8) is const(0) in every query head (or in every key head): q and k lose it
    in every head, the cos/sin tables lose the two columns, the softmax scale stays 1/sqrt(16)."""
    model = _attention(gqa=gqa)
    masks = _all_kept(model)
    _zero_rows(masks, f"{side}_proj.weight", 8 if side == "q" else 4, (3, 11))
    # q_proj loses 8 heads x 2 rows, k_proj 4 heads x 2 rows (64 wide)
    expected = BEFORE - 8 * 2 * 64 - 4 * 2 * 64
    result = check_minimize(model, masks, _inputs(), expected_params=expected)
    assert tuple(result.module.cos.shape) == (64, 14)
    assert "scale = 0.25" in result.module.code


@pytest.mark.parametrize("gqa", FORMS)
def test_a_pair_dead_in_some_heads_stays(gqa):
    """q dims (3, 11) zero in the query heads of group 0 only: group 1's heads read them, and one
    table serves every head, so the pair stays in all of them."""
    model = _attention(kv_heads=2, gqa=gqa)
    masks = _all_kept(model)
    _zero_rows(masks, "q_proj.weight", 4, (3, 11))
    result = check_minimize(model, masks, _inputs())
    assert result.report.params_after == result.report.params_before


@pytest.mark.parametrize("gqa", FORMS)
def test_per_head_qk_norm(gqa):
    """Qwen3 / Gemma 3 ``q_norm``/``k_norm`` (RMSNorm over the head dim, per head): a dead group's
    query and key/value heads leave; the norms' weights (one per head dim) stay."""
    model = _attention(gqa=gqa, qk_norm=True)
    masks = _all_kept(model)
    _kill_query_heads(masks, (2, 3))
    expected = BEFORE + 2 * 16 - 2 * 16 * 64 - 16 * 64 - 16 * 64 - 64 * 2 * 16
    check_minimize(model, masks, _inputs(), expected_params=expected)


@pytest.mark.parametrize("gqa", FORMS)
def test_per_head_qk_norm_compensated(gqa):
    """The rotary pair (3, 11) zero in every query head before q_norm: q_norm counts the two zeros
    as constants (a CompensatedLayerNorm over the head dim) and emits 0 there, so q loses the pair
    at both ends, k_norm stops emitting it, and k_proj keeps it (it feeds k's statistics)."""
    model = _attention(gqa=gqa, qk_norm=True)
    masks = _all_kept(model)
    _zero_rows(masks, "q_proj.weight", 8, (3, 11))
    # q_proj loses 8 heads x 2 rows (64 wide); q_norm and k_norm weights 16 -> 14
    expected = BEFORE + 2 * 16 - 8 * 2 * 64 - 2 * 2
    result = check_minimize(model, masks, _inputs(), expected_params=expected)
    assert isinstance(result.module.q_norm, fxmin.CompensatedLayerNorm)
    assert tuple(result.module.cos.shape) == (64, 14)


@pytest.mark.parametrize("gqa", FORMS)
def test_decoder_layer_heads_group_pair_and_mlp_units(gqa):
    """A Llama block: group 1 dead (query heads 2, 3), the rotary pair (5, 13) zero in every key
    head, 10 SwiGLU units with a zero gate row (silu(0) * up = 0)."""
    torch.manual_seed(0)
    layer = DecoderLayer(DIM, 8, 4, 96, block_size=16, head_dim=HD, gqa=gqa).eval()
    masks = _all_kept(layer)
    _kill_query_heads(masks, (2, 3), "self_attn.")
    _zero_rows(masks, "self_attn.k_proj.weight", 4, (5, 13))
    masks["mlp.gate_proj.weight"][:10] = False
    # attention: q 128x64, k 64x64, v 64x64, o 64x128; MLP: gate, up 96x64, down 64x96; two norms of 64
    before = BEFORE + 3 * 96 * 64 + 2 * 64
    # group 1: q -2*16 rows, k and v -16 rows, o -2*16 columns; the pair: 6 query heads and
    # 3 key heads kept lose 2 rows each; the units: gate and up lose 10 rows, down 10 columns
    expected = before - (2 * 16 + 16 + 16 + 2 * 16) * 64 - (6 + 3) * 2 * 64 - 3 * 10 * 64
    check_minimize(layer, masks, _inputs(tokens=16), expected_params=expected)


class EagerGroupedAttention(GroupedQueryAttention):
    """Hugging Face's eager path (without a mask): repeat_kv, ``q @ k^T * scaling``, softmax, ``@ v``."""

    def forward(self, x):
        batch, tokens = x.shape[0], x.shape[1]
        q = self.q_proj(x).view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.cos.narrow(0, 0, tokens), self.sin.narrow(0, 0, tokens)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = self._repeat_kv(k, batch, tokens), self._repeat_kv(v, batch, tokens)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim ** -0.5
        weights = torch.softmax(scores, dim=-1)
        y = torch.matmul(weights, v).transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim)
        return self.o_proj(y)


def test_eager_grouped_attention():
    """As test_unequal_dead_counts_keep_the_fullest_group and a rotary pair zero in every key head,
    through matmul and softmax: heads 2 and 5 and the pair (3, 11) leave."""
    torch.manual_seed(0)
    model = EagerGroupedAttention(DIM, 8, 2, head_dim=HD).eval()
    masks = _all_kept(model)
    _kill_query_heads(masks, (1, 2, 5))
    _zero_rows(masks, "k_proj.weight", 2, (3, 11))
    # q_proj keeps 6 heads x 14 dims, k_proj 2 x 14, v_proj 2 x 16, o_proj 6 x 16 columns (64 wide each)
    expected = (6 * 14 + 2 * 14 + 2 * 16) * 64 + 64 * 6 * 16
    check_minimize(model, masks, _inputs(), expected_params=expected)


def test_llama_zoo_model_minimizes():
    torch.manual_seed(0)
    model = llama(n_layer=2, dim=DIM, heads=8, kv_heads=4, head_dim=HD).eval()
    masks = _all_kept(model)
    for layer in range(2):
        _kill_query_heads(masks, (4, 5), f"layers.{layer}.self_attn.")
    ids = torch.randint(0, 128, (2, 16))
    result = fxmin.minimize(model, masks, (ids,))
    # per layer: q -2*16 rows, k and v -16 rows, o -2*16 columns (64 wide)
    assert result.report.params_before - result.report.params_after == 2 * (2 * 16 + 16 + 16 + 2 * 16) * 64
    assert result.report.max_error < 1e-12


@st.composite
def dead_heads(draw):
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]) if kv_heads < 4 else st.sampled_from([1, 2]))
    dead = draw(st.lists(st.booleans(), min_size=heads, max_size=heads))
    pair = draw(st.sampled_from([None, 0, 7]))
    return kv_heads, heads, dead, pair, draw(st.sampled_from(FORMS)), draw(st.booleans())


@given(dead_heads())
def test_random_dead_heads_exact(spec):
    """Any pattern of dead query heads, with or without a dead rotary pair and per-head q/k norms:
    float64-exact, and the query heads kept are as the fullest group needs (every group with a live
    head keeps that many; the others leave). A pair zero in every key head leaves k_proj; q_proj
    too, unless q_norm reads it (it feeds q's statistics; q_norm then stops emitting it)."""
    kv_heads, heads, dead, pair, gqa, qk_norm = spec
    model = _attention(heads=heads, kv_heads=kv_heads, gqa=gqa, qk_norm=qk_norm)
    masks = _all_kept(model)
    _kill_query_heads(masks, [h for h in range(heads) if dead[h]])
    if pair is not None:
        _zero_rows(masks, "k_proj.weight", kv_heads, (pair, pair + HD // 2))
    alive = torch.tensor([not d for d in dead]).reshape(kv_heads, heads // kv_heads)
    groups = int(alive.any(dim=1).sum())
    per_group = int(alive.sum(dim=1).max())
    dims = HD - (2 if pair is not None else 0)
    q_dims = HD if qk_norm else dims
    result = check_minimize(model, masks, _inputs())
    if groups:
        assert tuple(result.module.q_proj.weight.shape) == (groups * per_group * q_dims, DIM)
        assert tuple(result.module.k_proj.weight.shape) == (groups * dims, DIM)
        assert tuple(result.module.v_proj.weight.shape) == (groups * HD, DIM)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("sparsity", [0.9, 0.98])
def test_random_masks_exact(qk_norm, sparsity):
    """Unstructured random masks on a Llama block with random nonzero norm weights: float64-exact,
    and both ways of writing the grouping lose the same parameters."""
    after = {}
    for gqa in FORMS:
        torch.manual_seed(2)
        layer = DecoderLayer(DIM, 8, 2, 96, block_size=16, head_dim=HD, gqa=gqa, qk_norm=qk_norm).eval()
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
        after[gqa] = check_minimize(layer, random_masks(layer, sparsity, seed=3), _inputs(tokens=16)).report.params_after
    assert after["repeat"] == after["sdpa"]


class ShapeReadingRepeat(GroupedQueryAttention):
    """Hugging Face's ``repeat_kv`` as written: the key/value head count and head size read from
    ``x.shape``, the repeat count a literal."""

    def _repeat_kv(self, x, batch, tokens):
        b, kv_heads, length, head_dim = x.shape
        rep = self.heads // self.kv_heads
        x = x[:, :, None, :, :].expand(b, kv_heads, rep, length, head_dim)
        return x.reshape(b, kv_heads * rep, length, head_dim)


@pytest.mark.parametrize("kv_heads, dead, expected, expand", [
    # groups of 2: heads 2 and 3 are group 1, whose key/value head leaves with them (3 kv heads, 2 copies)
    (4, (2, 3), BEFORE - 2 * 16 * 64 - 16 * 64 - 16 * 64 - 64 * 2 * 16, "expand(getitem_6, 3, 2, getitem_8, 16)"),
    # groups of 4: one dead head in each group, the repeat count goes from 4 to 3, both kv heads stay
    (2, (1, 6), 128 * 64 + 2 * 32 * 64 + 64 * 128 - 2 * 16 * 64 - 64 * 2 * 16, "expand(getitem_6, 2, 3, getitem_8, 16)"),
])
def test_head_counts_read_from_the_shape_are_followed(kv_heads, dead, expected, expand):
    """The sizes read from x.shape at the head axes of repeat_kv's expand are replaced by the kept
    counts (as literals), as is the head count computed for the reshape."""
    torch.manual_seed(0)
    model = ShapeReadingRepeat(DIM, 8, kv_heads, head_dim=HD).eval()
    masks = _all_kept(model)
    _kill_query_heads(masks, dead)
    result = check_minimize(model, masks, _inputs(), expected_params=expected)
    assert expand in result.module.code
