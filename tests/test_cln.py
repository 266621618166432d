"""CompensatedLayerNorm: equal to the LayerNorm it replaces, with and without removed channels."""
from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxmin
from fxmin import CompensatedLayerNorm, compensate
from fxmin.errors import InputError

SETTINGS = settings(max_examples=60, deadline=None)
CONSTANT = st.one_of(st.just(0.0), st.floats(-50, 50, allow_nan=False, width=32))


@st.composite
def removals(draw, max_width=12):
    """A width, kept channels in a random order, their constants, emitted channels, a seed."""
    width = draw(st.integers(1, max_width))
    channels = st.sampled_from(range(width))
    kept = draw(st.lists(channels, unique=True, max_size=width))
    removed = sorted(set(range(width)) - set(kept))
    constants = {channel: draw(CONSTANT) for channel in removed}
    outputs = draw(st.lists(channels, unique=True, min_size=1, max_size=width))
    return width, kept, constants, outputs, draw(st.integers(0, 2**31 - 1))


def full_input(x, width, kept, constants, axis):
    """The original-width input: kept channels from ``x``, removed ones set to their constants."""
    shape = list(x.shape)
    shape[axis] = width
    full = torch.zeros(shape, dtype=x.dtype)
    moved, source = full.movedim(axis, 0), x.movedim(axis, 0)
    for position, channel in enumerate(kept):
        moved[channel] = source[position]
    for channel, value in constants.items():
        moved[channel] = value
    return full


def affine(width, outputs, generator):
    weight = torch.randn(width, generator=generator, dtype=torch.float64)
    bias = torch.randn(width, generator=generator, dtype=torch.float64)
    return weight, bias, weight[outputs], bias[outputs]


PATHS = ["padded", "closed"]


@contextlib.contextmanager
def forward_path(path):
    """NOTE [CLN forward paths]: CLNs built inside take the padded path ('padded') or the closed form
    ('closed') whatever their widths."""
    saved = fxmin.compensated.layer_norm.PADDED_WIDTH
    fxmin.compensated.layer_norm.PADDED_WIDTH = 10**9 if path == "padded" else 0
    try:
        yield
    finally:
        fxmin.compensated.layer_norm.PADDED_WIDTH = saved


def assert_float64_close(actual, expected):
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ nothing removed
@SETTINGS
@given(width=st.integers(1, 40), batch=st.lists(st.integers(1, 4), max_size=3), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float64]), bias=st.booleans(), affine_=st.booleans())
def test_nothing_removed_is_layer_norm_bit_for_bit(width, batch, seed, dtype, bias, affine_):
    generator = torch.Generator().manual_seed(seed)
    norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=affine_, bias=bias, dtype=dtype)
    if affine_:
        with torch.no_grad():
            for parameter in norm.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=dtype))
    x = torch.randn(*batch, width, generator=generator, dtype=dtype)
    compensated = CompensatedLayerNorm.from_layer_norm(norm)
    assert torch.equal(compensated(x), norm(x))
    plain = CompensatedLayerNorm(width, eps=1e-6, weight=norm.weight if affine_ else False,
                                 bias=norm.bias if affine_ and bias else False)
    assert torch.equal(plain(x), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nothing_removed_is_rms_and_group_norm_bit_for_bit(dtype):
    generator = torch.Generator().manual_seed(0)
    rms = nn.RMSNorm(24, dtype=dtype)
    group = nn.GroupNorm(1, 6, dtype=dtype)
    with torch.no_grad():
        for parameter in [*rms.parameters(), *group.parameters()]:
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=dtype))
    x = torch.randn(3, 5, 24, generator=generator, dtype=dtype)
    image = torch.randn(2, 6, 5, 7, generator=generator, dtype=dtype)
    assert torch.equal(CompensatedLayerNorm.from_rms_norm(rms)(x), rms(x))
    assert torch.equal(CompensatedLayerNorm.from_group_norm(group)(image), group(image))


# ----------------------------------------------------------------------------- removed channels
@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(removals(), st.sampled_from([(), (3,), (2, 3)]), st.sampled_from([1e-5, 1e-2]))
def test_removed_channels_equal_layer_norm_of_the_full_input(path, case, batch, eps):
    width, kept, constants, outputs, seed = case
    generator = torch.Generator().manual_seed(seed)
    weight, bias, emitted_weight, emitted_bias = affine(width, outputs, generator)
    x = torch.randn(*batch, len(kept), generator=generator, dtype=torch.float64)
    with forward_path(path):
        norm = CompensatedLayerNorm(width, kept, constants, outputs, eps, emitted_weight, emitted_bias)
    assert norm._padded == (path == "padded") or norm._plain
    expected = F.layer_norm(full_input(x, width, kept, constants, -1), (width,), weight, bias, eps)[..., outputs]
    assert_float64_close(norm(x), expected)


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(removals(), st.sampled_from([None, 1e-6]))
def test_removed_channels_equal_rms_norm_of_the_full_input(path, case, eps):
    width, kept, constants, outputs, seed = case
    generator = torch.Generator().manual_seed(seed)
    weight, _, emitted_weight, _ = affine(width, outputs, generator)
    x = torch.randn(2, 3, len(kept), generator=generator, dtype=torch.float64)
    with forward_path(path):
        norm = CompensatedLayerNorm(width, kept, constants, outputs, eps, emitted_weight, kind="rms")
    reference = nn.RMSNorm(width, eps=eps, dtype=torch.float64)
    with torch.no_grad():
        reference.weight.copy_(weight)
    expected = reference(full_input(x, width, kept, constants, -1))[..., outputs]
    assert norm.bias is None
    assert_float64_close(norm(x), expected)


@pytest.mark.parametrize("path", PATHS)
@SETTINGS
@given(removals(max_width=8), st.sampled_from([(), (1,), (3, 4)]))
def test_removed_channels_equal_group_norm_of_the_full_input(path, case, spatial):
    """GroupNorm(1, C) statistics run over channels and positions: a constant counts at every position."""
    width, kept, constants, outputs, seed = case
    generator = torch.Generator().manual_seed(seed)
    weight, bias, emitted_weight, emitted_bias = affine(width, outputs, generator)
    x = torch.randn(2, len(kept), *spatial, generator=generator, dtype=torch.float64)
    with forward_path(path):
        norm = CompensatedLayerNorm(width, kept, constants, outputs, 1e-5, emitted_weight, emitted_bias, kind="group")
    expected = F.group_norm(full_input(x, width, kept, constants, 1), 1, weight, bias, 1e-5)[:, outputs]
    assert_float64_close(norm(x), expected)


@pytest.mark.parametrize("path", PATHS)
def test_large_constants_near_the_mean_keep_the_variance(path):
    """The centred form: constants far from zero but close to the mean lose nothing to cancellation.

    The reference normalizes the data shifted by the common offset (exact in float64, and
    LayerNorm is shift-invariant); the uncentred formula (sum x^2 + S2) / D - mean^2 is off by
    percents here.
    """
    width, kept, offset = 16, list(range(8)), 1e4
    constants = {channel: offset for channel in range(8, 16)}
    noise = torch.randn(5, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-3
    x = offset + noise
    full = full_input(x, width, kept, constants, -1)
    expected = F.layer_norm(full - offset, (width,), eps=1e-7)
    with forward_path(path):
        actual = CompensatedLayerNorm(width, kept, constants, eps=1e-7)(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-7)
    mean = full.mean(-1, keepdim=True)
    uncentred = (full.square().sum(-1, keepdim=True) / width - mean.square())
    assert float((uncentred / full.var(-1, unbiased=False, keepdim=True) - 1).abs().max()) > 1e-3


@pytest.mark.parametrize("path", PATHS)
def test_low_precision_input_keeps_its_dtype(path):
    with forward_path(path):
        norm = CompensatedLayerNorm(6, [0, 2, 4], {1: 1.0, 3: 0.0, 5: -2.0}, outputs=[5, 0])
    x = torch.randn(4, 3)
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    torch.testing.assert_close(norm(x.bfloat16()).float(), norm(x), rtol=0.02, atol=0.05)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["layer", "rms", "group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("value", [0.0, -0.75])
def test_equal_constants_take_one_pad_and_change_no_bit(value, dtype, kind, path):
    """NOTE [CLN call overhead]: equal constants are written by F.pad (no cast, no cat); the result is
    the general path's (constants cast, shaped, concatenated) bit for bit, a removed channel emitted."""
    generator = torch.Generator().manual_seed(4)
    with forward_path(path):
        norm = CompensatedLayerNorm(7, [6, 0, 2], {1: value, 3: value, 4: value, 5: value}, [1, 0, 6, 5],
                                    kind=kind, weight=torch.randn(4, generator=generator),
                                    bias=torch.randn(4, generator=generator)).to(dtype)
    general = copy.deepcopy(norm)
    general._fill = None
    assert norm._fill == value
    shape = (2, 3, 5) if kind == "group" else (2, 5, 3)
    x = (torch.randn(*shape, generator=generator) * 3 + 1).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), general(x), rtol=0, atol=0)
        full = full_input(x.double(), 7, [6, 0, 2], {1: value, 3: value, 4: value, 5: value}, 1 if kind == "group" else -1)
        reference = {"layer": lambda t: F.layer_norm(t, (7,)), "rms": lambda t: F.rms_norm(t, (7,), eps=norm.eps),
                     "group": lambda t: F.group_norm(t, 1)}[kind](full)
        reference = torch.index_select(reference, 1 if kind == "group" else 2, torch.tensor([1, 0, 6, 5]))
        along = (-1, 1) if kind == "group" else (1, 1, -1)
        reference = reference * norm.weight.double().view(along) + norm.bias.double().view(along)
        tolerance = 0.05 if dtype == torch.bfloat16 else 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(norm(x).double(), reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("path", PATHS)
def test_no_emitted_channel_gives_an_empty_channel_axis(path):
    with forward_path(path):
        norm = CompensatedLayerNorm(6, [0, 2, 4], None, outputs=[])
    x = torch.randn(2, 5, 3)
    assert norm(x).shape == (2, 5, 0) and norm(x).dtype == x.dtype
    assert norm(x.double()).dtype == torch.float64


# ------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["layer", "rms", "group"])
def test_gradients_flow_and_match_finite_differences(kind, path):
    generator = torch.Generator().manual_seed(1)
    width, kept, constants, outputs = 7, [6, 0, 2, 3], {1: 0.5, 4: 0.0, 5: -1.25}, [1, 0, 6, 5]
    with forward_path(path):
        norm = CompensatedLayerNorm(width, kept, constants, outputs, kind=kind, bias=True).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(4, generator=generator, dtype=torch.float64))
    shape = (2, 4, 3) if kind == "group" else (2, 3, 4)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _with_affine(norm, w, b)(x), (x, norm.weight, norm.bias))
    (norm(x) * torch.randn(norm(x).shape, generator=generator, dtype=torch.float64)).sum().backward()
    assert x.grad is not None and norm.weight.grad.abs().sum() > 0 and norm.bias.grad.abs().sum() > 0


def _with_affine(norm, weight, bias):
    def run(x):
        return torch.func.functional_call(norm, {"weight": weight, "bias": bias}, (x,))
    return run


# ----------------------------------------------------------------------------------------- export
def export_cases(path="padded"):
    with forward_path(path):
        return {
            "layer": (CompensatedLayerNorm(8, [0, 1, 3, 4, 6], {2: 0.0, 5: 1.5, 7: -0.5}, [7, 0, 2, 3]), (2, 5, 5)),
            "rms": (CompensatedLayerNorm(8, [0, 1, 3, 4, 6], {2: 0.0, 5: 1.5, 7: -0.5}, kind="rms"), (2, 5, 5)),
            "group": (CompensatedLayerNorm(6, [0, 2, 3], {1: 2.0, 4: 0.0, 5: 0.0}, [0, 1, 3], kind="group"),
                      (2, 3, 4, 4)),
            "plain": (CompensatedLayerNorm.from_layer_norm(nn.LayerNorm(8)), (2, 5, 8)),
            "inputs-only": (CompensatedLayerNorm(8, range(6), [0.0, 3.0], outputs=[5, 1]), (3, 6)),
            "prefix": (CompensatedLayerNorm(8, [2, 0, 5], [0.0, 1.0, 0.0, 0.0, -1.0], outputs=[2, 0]), (3, 3)),
            # equal constants: NOTE [CLN call overhead] (one F.pad; a removed channel emitted)
            "zeros": (CompensatedLayerNorm(8, [0, 1, 3, 4, 6], None, [7, 0, 2, 3]), (2, 5, 5)),
            "equal-group": (CompensatedLayerNorm(6, [0, 2, 3], [0.5, 0.5, 0.5], [0, 1, 3], kind="group"),
                            (2, 3, 4, 4)),
        }


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(export_cases()))
def test_torch_export_round_trip_equals_eager(case, path):
    norm, shape = export_cases(path)[case]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(norm, (x,), dynamic_shapes={"x": {0: batch}})
    torch.testing.assert_close(program.module()(x), norm(x), rtol=0, atol=1e-6)
    bigger = torch.randn(7, *shape[1:], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(program.module()(bigger), norm(bigger), rtol=0, atol=1e-6)


class AllKinds(nn.Module):
    """The three removal cases, on both forward paths, in one module, so that ONNX export (slow) runs once."""

    def __init__(self):
        super().__init__()
        padded, closed = export_cases("padded"), export_cases("closed")
        self.norms = nn.ModuleList(cases[kind][0] for cases in (padded, closed) for kind in ("layer", "rms", "group"))

    def forward(self, tokens, image):
        return tuple(norm(image if norm.kind == "group" else tokens) for norm in self.norms)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's own exporter internals
def test_onnx_export_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    generator = torch.Generator().manual_seed(4)
    cases = export_cases()
    inputs = (torch.randn(*cases["layer"][1], generator=generator), torch.randn(*cases["group"][1], generator=generator))
    model = copy.deepcopy(AllKinds()).eval()
    path = tmp_path / "cln.onnx"
    torch.onnx.export(model, inputs, str(path), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    results = session.run(None, {entry.name: x.numpy() for entry, x in zip(session.get_inputs(), inputs)})
    with torch.no_grad():
        expected = model(*inputs)
    assert len(results) == 6
    for result, reference in zip(results, expected):
        torch.testing.assert_close(torch.from_numpy(result), reference, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------- shrink
@SETTINGS
@given(removals(max_width=10), st.data())
def test_two_shrinks_equal_one_combined_removal(case, data):
    width, kept, constants, outputs, seed = case
    generator = torch.Generator().manual_seed(seed)
    weight, bias, _, _ = affine(width, list(range(width)), generator)
    norm = CompensatedLayerNorm(width, weight=weight, bias=bias)
    # First removal: `kept` and `outputs`; second: a subset of each.
    first = norm.shrink(kept, constants, outputs)
    kept_again = data.draw(st.lists(st.sampled_from(kept), unique=True) if kept else st.just([]))
    later = {channel: data.draw(CONSTANT) for channel in sorted(set(kept) - set(kept_again))}
    outputs_again = data.draw(st.lists(st.sampled_from(outputs), unique=True, min_size=1))
    twice = first.shrink(kept_again, later, outputs_again)
    once = norm.shrink(kept_again, {**constants, **later}, outputs_again)
    assert twice.width == width and len(twice.constants) == width - len(kept_again)
    for name, buffer in once.named_buffers():
        assert torch.equal(buffer, twice.get_buffer(name)), name
    x = torch.randn(3, len(kept_again), generator=generator, dtype=torch.float64)
    assert torch.equal(twice(x), once(x))
    expected = F.layer_norm(full_input(x, width, kept_again, {**constants, **later}, -1), (width,), weight, bias)
    assert_float64_close(twice(x), expected[..., outputs_again])
    assert torch.equal(norm.kept, torch.arange(width)), "shrink must not modify the original"


def test_shrink_rejects_channels_already_gone():
    norm = CompensatedLayerNorm(5).shrink([0, 1, 2], outputs=[0, 3])
    with pytest.raises(InputError, match=r"\[4\] were already removed"):
        norm.shrink([0, 4])
    with pytest.raises(InputError, match=r"\[1\] are no longer emitted"):
        norm.shrink([0], outputs=[1])


# ---------------------------------------------------------------------------------- compensate
class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.projection = nn.Linear(width, width)
        self.mlp_norm = nn.RMSNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
        x = x + self.projection((scores @ v).transpose(1, 2).reshape(batch, tokens, width))
        return x + self.mlp(self.mlp_norm(x))


class LayerNorm2d(nn.LayerNorm):
    """torchvision's channels-first LayerNorm: overrides forward, so compensate leaves it."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class TinyModel(nn.Module):
    def __init__(self, width=16, heads=2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(1, 8), LayerNorm2d(8), nn.GroupNorm(2, 8))
        self.to_tokens = nn.Linear(8, width)
        self.blocks = nn.Sequential(Block(width, heads), Block(width, heads))
        self.final_norm = nn.LayerNorm(width, bias=False)
        self.image_norm = nn.LayerNorm([4, 4])  # 2-D normalized_shape: not a channel LayerNorm
        self.head = nn.Linear(width, 5)

    def forward(self, image):
        features = self.stem(image)
        features = features + self.image_norm(features[..., :4, :4]).mean() * 0
        x = self.blocks(self.to_tokens(features.flatten(2).transpose(1, 2)))
        return self.head(self.final_norm(x))


def test_compensate_is_bit_for_bit_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = TinyModel()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    image = torch.randn(2, 3, 6, 6)
    expected = model(image)
    result = compensate(model)
    assert torch.equal(result(image), expected)
    replaced = {name for name, module in result.named_modules() if isinstance(module, CompensatedLayerNorm)}
    assert replaced == {"stem.1", "final_norm", *(f"blocks.{i}.{n}" for i in (0, 1) for n in ("attention_norm",
                                                                                              "mlp_norm"))}
    assert type(result.stem[2]) is LayerNorm2d and type(result.stem[3]) is nn.GroupNorm
    assert type(result.image_norm) is nn.LayerNorm
    assert result.blocks[0].mlp_norm.kind == "rms" and result.final_norm.bias is None
    # the original: same modules, same values, same output
    assert type(model.blocks[0].attention_norm) is nn.LayerNorm and type(model.stem[1]) is nn.GroupNorm
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert torch.equal(model(image), expected)
    with torch.no_grad():
        result.final_norm.weight.mul_(2)
    assert torch.equal(model(image), expected), "the copy shares no parameters with the original"


def test_compensate_keeps_shared_norms_shared_and_handles_a_bare_norm():
    norm = nn.LayerNorm(4)
    model = nn.Sequential(norm, nn.Linear(4, 4), norm)
    result = compensate(model)
    assert isinstance(result[0], CompensatedLayerNorm) and result[0] is result[2]
    x = torch.randn(3, 4)
    assert torch.equal(result(x), model(x))
    assert isinstance(compensate(norm), CompensatedLayerNorm)


def test_compensated_model_trains_like_the_original():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    result = compensate(model)
    x = torch.randn(10, 6)
    for module in (model, result):
        module(x).square().sum().backward()
    assert torch.equal(result[1].weight.grad, model[1].weight.grad)
    assert torch.equal(result[0].weight.grad, model[0].weight.grad)


# -------------------------------------------------------------------------------- errors, repr
def test_readable_repr_and_loud_errors():
    norm = CompensatedLayerNorm(768, range(760), {**{j: 0.0 for j in range(760, 767)}, 767: 0.5}, range(10))
    text = repr(norm)
    assert "768, kind=layer, kept=760, removed=8 (1 nonzero constants in [0, 0.5], sum 0.5), outputs=10" in text
    assert "removed={1: 2, 3: 0}" in repr(CompensatedLayerNorm(4, [0, 2], [2.0, 0.0]))
    with pytest.raises(InputError, match=r"expects 760 channels on axis -1, got input of shape \(2, 768\)"):
        norm(torch.randn(2, 768))
    with pytest.raises(InputError, match=r"missing \[3\], unexpected \[0\]"):
        CompensatedLayerNorm(4, [0, 1, 2], {0: 1.0})
    with pytest.raises(InputError, match="2 constants for 1 removed"):
        CompensatedLayerNorm(4, [0, 1, 2], [1.0, 2.0])
    with pytest.raises(InputError, match="outside 0..3"):
        CompensatedLayerNorm(4, outputs=[4])
    with pytest.raises(InputError, match=r"kept: channels \[-1\] are outside"):
        CompensatedLayerNorm(4, torch.tensor([0, -1]))
    with pytest.raises(InputError, match=r"repeated channels in \[0, 2, 0\]"):
        CompensatedLayerNorm(4, [0, 2, 0])
    with pytest.raises(InputError, match=r"a sequence of channels, got an array of shape \(1, 2\)"):
        CompensatedLayerNorm(4, [[0, 2]])
    with pytest.raises(InputError, match=r"a mapping or a sequence of values, got shape \(1, 2\)"):
        CompensatedLayerNorm(4, [0, 2], [[1.0, 2.0]])
    with pytest.raises(InputError, match="only GroupNorm"):
        CompensatedLayerNorm.from_group_norm(nn.GroupNorm(2, 4))
    with pytest.raises(InputError, match="normalizes over 2 axes"):
        CompensatedLayerNorm.from_layer_norm(nn.LayerNorm([4, 4]))


def test_constants_move_with_the_module_and_stay_float64_until_cast():
    norm = CompensatedLayerNorm(4, [0, 1], [0.1, 0.2])
    assert norm.constants.dtype == torch.float64 and norm.constants.tolist() == [0.1, 0.2]
    state = norm.state_dict()
    assert set(state) == {"weight", "bias", "kept", "removed", "constants", "outputs", "source"}
    x = torch.randn(2, 2)
    assert torch.equal(copy.deepcopy(norm)(x), norm(x))
    buffer = io.BytesIO()
    torch.save(norm, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), norm(x))
    assert norm.to("meta").constants.device.type == "meta" and norm.to("meta").kept.device.type == "meta"


def test_public_api():
    assert fxmin.CompensatedLayerNorm is CompensatedLayerNorm and fxmin.compensate is compensate
    assert {"CompensatedLayerNorm", "compensate"} <= set(fxmin.__all__)


def test_loading_a_state_dict_of_the_same_shapes_updates_the_structure():
    plain = CompensatedLayerNorm(4)
    permuted = CompensatedLayerNorm(4, kept=[3, 2, 1, 0])
    plain.load_state_dict(permuted.state_dict())
    x = torch.randn(2, 4)
    assert torch.equal(plain(x), permuted(x))
    torch.testing.assert_close(plain(x), F.layer_norm(x.flip(-1), (4,)))


@pytest.mark.parametrize("missing", [
    # before the forward paths: no flags, no statistics
    ("_padded", "_select", "_constant_sum", "_constant_squares", "_constant_mean", "_constant_spread",
     "_axis", "_kept_count", "_removed_count", "_emitted", "_fill"),
    # with the paths, before NOTE [CLN call overhead] (the checkpoints of the reported ConvNeXt runs)
    ("_axis", "_kept_count", "_removed_count", "_emitted", "_fill"),
], ids=["no-paths", "no-call-overhead-fields"])
@pytest.mark.parametrize("constants", [{2: 0.0, 5: 1.5, 7: -0.5}, {2: 0.0, 5: 0.0, 7: 0.0}], ids=["mixed", "zeros"])
def test_a_cln_pickled_by_an_older_fxmin_loads_and_computes_the_same(missing, constants):
    """Checkpoints and saved models hold pickled CLNs; one written by an older fxmin lacks some of the
    attributes _read_structure sets now, and loading it must still work."""
    norm = CompensatedLayerNorm(8, [0, 1, 3, 4, 6], constants, [7, 0, 2, 3])
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(5))
    old = copy.deepcopy(norm)
    for name in missing:
        del old.__dict__[name]
    buffer = io.BytesIO()
    torch.save(old, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), norm(x), rtol=0, atol=0)

