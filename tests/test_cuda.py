"""fxmin on a model on an accelerator: minimize, release and the cycle keep the model where it was.

Each test runs on the CPU and, where there is one, on a CUDA device (experiments/convnext_tiny_gpu.sh runs
this file first on the device machine); the analysis itself runs on a CPU copy either way."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxmin
from fxmin.zoo.convnext import convnext_tiny
from tests.helpers import masked_copy
from tests.test_constant_operands import _emptied, _net

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=cuda)])
def device(request):
    return torch.device(request.param)


def small_convnext(device):
    torch.manual_seed(0)
    return convnext_tiny(10, in_channels=1, stem="small", width=0.25, depths=(1, 1, 1, 1)).eval().to(device)


def dead_channel_masks(model, seed=0):
    """Random masks that kill whole output channels of every convolution and linear layer."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, parameter in fxmin.prunable(model).items():
        rows = torch.rand(parameter.shape[0], generator=generator) < 0.4
        mask = torch.ones_like(parameter, dtype=torch.bool)
        mask[rows.to(mask.device)] = False
        masks[name] = mask
    masks.pop(next(name for name in masks if name.startswith("classifier")), None)  # keep the 10 logits
    return masks


def assert_computes_the_masked_model_in_float64(model, masks, module, x):
    reference = masked_copy(model, masks).double()
    with torch.no_grad(), fxmin.full_precision():
        expected = reference(x.double())
        got = copy.deepcopy(module).double()(x.double())
    assert float((got - expected).abs().max()) <= 1e-6 * max(1.0, float(expected.abs().max()))


def test_minimize_returns_a_smaller_module_on_the_models_device_that_computes_the_same(device):
    model = small_convnext(device)
    masks = dead_channel_masks(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 1, 28, 28, device=device)
    result = fxmin.minimize(model, masks, (x,))
    assert all(p.device.type == device.type for p in result.module.parameters())
    assert all(b.device.type == device.type for b in result.module.buffers())
    assert fxmin.count_parameters(result.module) < fxmin.count_parameters(model)
    assert_computes_the_masked_model_in_float64(model, masks, result.module, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched


def test_release_with_tf32_training_settings_still_calibrates_noise(device):
    model = small_convnext(device)
    result = fxmin.minimize(model, dead_channel_masks(model), (torch.randn(4, 1, 28, 28, device=device),))
    masks = fxmin.global_magnitude(result.module, 0.5)
    pruned = copy.deepcopy(result.module)
    with torch.no_grad():
        for name, parameter in pruned.named_parameters():
            if name in masks:
                parameter.mul_(masks[name])
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    try:
        matmul.fp32_precision = conv.fp32_precision = "tf32"
        released = fxmin.release(pruned, torch.randn(64, 1, 28, 28, device=device),
                                 generator=torch.Generator().manual_seed(0))
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
    sigmas = [s for name, s in released.sigmas.items() if released.zeros[name]]
    assert sigmas and all(s > 0 for s in sigmas)  # TF32's rounding does not swallow the calibration
    assert released.change < 1e-3
    assert all(p.device.type == device.type for p in released.module.parameters())


def test_squeeze_release_cycles_and_resumes_on_the_models_device(device, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3)).to(device)
    x = torch.randn(256, 20, device=device)
    y = (x[:, :3]).argmax(1)

    def train(model, step):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(int(step.epochs * 20)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    def evaluate(model):
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    train(net, fxmin.TrainStep("dense", 0, 5))
    result = fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), cycles=2,
                                   amount=0.5, criterion=fxmin.unit_scaled_magnitude, tolerance=0.3,
                                   checkpoint_dir=str(tmp_path), progress=False)
    assert len(result.history) == 3
    assert all(p.device.type == device.type for p in result.module.parameters())
    resumed = fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), cycles=3,
                                    amount=0.5, tolerance=0.3, checkpoint_dir=str(tmp_path), resume=True,
                                    progress=False)
    assert [r.cycle for r in resumed.history] == [0, 1, 2, 3]


def test_a_loop_that_moves_the_model_to_the_device_as_lightning_does_keeps_masks_and_cycles(device):
    """The model and the batches start on the CPU; the user's train moves the model in place (Lightning's
    fit does): held masks, minimization and the release's calibration batch follow it there."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(200, 20)
    y = (x[:, :3]).argmax(1)
    held = []

    def train(model, step):
        model.to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(20):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
        if step.masks is not None:
            weights = dict(model.named_parameters())
            held.append(all(bool((weights[n][~m.to(device)] == 0).all()) for n, m in step.masks.items()))

    def evaluate(model):
        model.to(device)  # Lightning's validate moves the model too, also before the first training
        with torch.no_grad():
            return float((model(x.to(device)).argmax(1).cpu() == y).float().mean())

    result = fxmin.squeeze_release(net, train=train, evaluate=evaluate, example_inputs=(x[:16],), cycles=2,
                                   amount=0.5, tolerance=1.0, patience=2, progress=False)
    assert held == [True, True]
    assert all(p.device.type == device.type for p in result.module.parameters())
    assert fxmin.count_parameters(result.module) <= fxmin.count_parameters(net)
    assert all(p.device.type == "cpu" for p in net.parameters())  # the input model stays where it was


@cuda
def test_a_model_split_over_two_devices_is_a_clear_error():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    net[2].cuda()
    with pytest.raises(fxmin.InputError, match="several devices"):
        fxmin.minimize(net, {"0.weight": torch.ones(8, 4)})


def test_full_precision_turns_tf32_off_inside_and_restores_the_users_setting():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    try:
        matmul.fp32_precision = conv.fp32_precision = "tf32"  # what a user training fast on a GPU sets
        with fxmin.full_precision():
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        with pytest.raises(RuntimeError, match="inside"), fxmin.full_precision():
            raise RuntimeError("inside")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")  # restored on errors too
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


# --------------------------------------------------------------- the paths that had never run on a GPU
@cuda
def test_the_inductor_backend_compiles_the_minimized_graph_on_the_device():
    """``fxmin.backend`` inside ``torch.compile`` on a CUDA model: the graph it minimizes runs as Triton code."""
    torch._dynamo.reset()
    model = small_convnext(torch.device("cuda"))
    masks = dead_channel_masks(model)
    backend = fxmin.backend(masks, inner="inductor")
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(8, 1, 28, 28, device="cuda")
    with torch.no_grad(), fxmin.full_precision():
        got, expected = compiled(x), masked_copy(model, masks)(x)
    assert backend.results, "the backend never received a graph"
    assert sum(r.report.params_after for r in backend.results) < sum(r.report.params_before for r in backend.results)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_the_export_front_end_minimizes_a_model_on_the_device(device):
    model = small_convnext(device)
    masks = dead_channel_masks(model, seed=1)
    x = torch.randn(4, 1, 28, 28, device=device)
    result = fxmin.minimize(model, masks, (x,), frontend="export")
    assert result.frontend == "export"
    assert all(p.device.type == device.type for p in result.module.parameters())
    assert fxmin.count_parameters(result.module) < fxmin.count_parameters(model)
    assert_computes_the_masked_model_in_float64(model, masks, result.module, x)


@pytest.mark.parametrize("make_optimizer", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
                                            lambda p: torch.optim.AdamW(p, lr=1e-2)], ids=["sgd", "adamw"])
def test_held_masks_stay_exactly_zero_while_training_on_the_device(device, make_optimizer):
    """Masks made on the CPU hold a model that trains on the device (momentum and decay cannot revive a weight)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    masks = {name: mask.cpu() for name, mask in fxmin.global_magnitude(net, 0.6).items()}
    optimizer = make_optimizer(net.parameters())
    x, y = torch.randn(64, 16, device=device), torch.randint(0, 4, (64,), device=device)
    with fxmin.hold_masks(net, masks, optimizer):
        for _ in range(10):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    weights = dict(net.named_parameters())
    assert all(bool((weights[name][~mask.to(device)] == 0).all()) for name, mask in masks.items())
    assert all(bool((weights[name][mask.to(device)] != 0).all()) for name, mask in masks.items())


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "closed"])
def test_a_compensated_layer_norm_on_the_device_equals_layer_norm_of_the_full_input(device, padded, monkeypatch):
    """NOTE [CLN forward paths]: both forward paths, moved to the device after construction, in float64
    (to rounding) and float32 (to float32's tolerance) against the LayerNorm of the original-width input."""
    monkeypatch.setattr(fxmin.compensated.layer_norm, "PADDED_WIDTH", 10**9 if padded else 0)
    width, kept, outputs = 12, [7, 0, 3, 9, 4, 11], [11, 2, 0, 5, 8]
    constants = {1: 0.0, 2: -3.5, 5: 40.0, 6: 0.25, 8: 0.0, 10: 1.0}
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(width, generator=generator, dtype=torch.float64), torch.randn(
        width, generator=generator, dtype=torch.float64)
    x = torch.randn(5, 3, len(kept), generator=generator, dtype=torch.float64)
    full = torch.zeros(5, 3, width, dtype=torch.float64)
    full[..., kept] = x
    for channel, value in constants.items():
        full[..., channel] = value
    expected = nn.functional.layer_norm(full, (width,), weight, bias, 1e-5)[..., outputs]
    norm = fxmin.CompensatedLayerNorm(width, kept, constants, outputs, 1e-5, weight[outputs], bias[outputs])
    with torch.no_grad():
        got64 = norm.to(device)(x.to(device)).cpu()
        got32 = norm.float()(x.float().to(device)).cpu()
    torch.testing.assert_close(got64, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=1e-4)


def test_an_emptied_block_becomes_a_constant_operand_on_the_device(device):
    """NOTE [Constant operands] on a device model: the emptied branch leaves, its constant lives on the device."""
    net = _net(dtype=torch.float64).to(device)
    masks = _emptied(net, [1])
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    module = fxmin.minimize(net, masks, (x,)).module
    constants = [p for name, p in module.named_parameters() if name.startswith("_fxmin_constant_")]
    assert len(constants) == 1 and constants[0].device.type == device.type
    reference = fxmin.masks.masked_reference(net, masks)[0]
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x), rtol=1e-12, atol=1e-12)
