"""Every bad input of docs/reliability.md's table raises an fxmin error that says what was wrong and
what to do; no raw traceback from deep inside. One test per row."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxmin

X = (torch.randn(3, 4),)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def full_mask():
    return {"0.weight": torch.ones(8, 4, dtype=torch.bool)}


def meta_model():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def net_normed():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).eval()


def meta_normed():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).eval()


class WithUnusedHead(nn.Module):
    """A model whose second head the forward never calls (a leftover of another version)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.old_head = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


class WithUnreadScale(nn.Module):
    """A layer with a parameter its forward does not read."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear, self.scale = nn.Linear(4, 2), nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.linear(x)


def with_value(value, index=(0, 0)):
    model = net()
    with torch.no_grad():
        model[0].weight[index] = value
    return model


# (row, call, error type, fragments the message must contain: what was wrong, what to do)
ROWS = [
    ("masks on the meta device", lambda: fxmin.minimize(net(), {"0.weight": torch.ones(8, 4, device="meta")}, X),
     fxmin.MaskError, ["'0.weight'", "meta device", "compute it on the CPU"]),
    ("a model on the meta device", lambda: fxmin.minimize(meta_model(), full_mask(), X),
     fxmin.InputError, ["meta device", "'0.weight'", "to_empty", "load_state_dict"]),
    ("a meta model whose checkpoint lacks a buffer (a rotary table built with `torch.device(\"meta\")`)",
     lambda: fxmin.minimize(meta_normed(), full_mask(), X, weights=dict(net_normed().named_parameters())),
     fxmin.InputError, ["'1.running_mean'", "meta device", "hold no tensor", "init_empty_weights"]),
    ("example inputs on the meta device", lambda: fxmin.minimize(net(), full_mask(), (torch.randn(3, 4, device="meta"),)),
     fxmin.InputError, ["meta device", "pass real tensors"]),
    ("a path string instead of a module", lambda: fxmin.minimize("model.pt", full_mask(), X),
     fxmin.InputError, ["'model.pt'", "not a torch.nn.Module", "load the model first"]),
    ("a function instead of a module", lambda: fxmin.minimize(lambda t: t, full_mask(), X),
     fxmin.InputError, ["function", "not a torch.nn.Module", "wrap"]),
    ("an ExportedProgram passed to minimize", lambda: fxmin.minimize(torch.export.export(net(), X), full_mask(), X),
     fxmin.InputError, ["ExportedProgram", "fxmin.minimize_exported"]),
    ("NaN in a weight the masks keep", lambda: fxmin.minimize(with_value(float("nan")), full_mask(), X),
     fxmin.InputError, ["'0.weight'", "NaN or inf", "masked model itself", "mask them out"]),
    ("inf in a weight the masks keep", lambda: fxmin.minimize(with_value(float("inf")), full_mask(), X),
     fxmin.InputError, ["'0.weight'", "NaN or inf"]),
    ("a mask for a buffer", lambda: fxmin.minimize(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)),
                                                   {"1.running_mean": torch.ones(8)}, X),
     fxmin.MaskError, ["'1.running_mean'", "a buffer", "fxmin masks parameters"]),
    ("a mask for a parameter a layer does not read",
     lambda: fxmin.minimize(nn.Sequential(WithUnreadScale()), {"0.scale": torch.zeros(2)}, X),
     fxmin.MaskError, ["'0.scale'", "removes 2 entries", "never reads, although it calls '0'", "Drop it from the masks",
                       "select={'exclude': ['0.scale']}"]),
    ("a mask of integers other than 0/1", lambda: fxmin.minimize(net(), {"0.weight": torch.full((8, 4), 2)}, X),
     fxmin.MaskError, ["'0.weight'", "boolean or 0/1", "2"]),
    ("a mask that is not a tensor", lambda: fxmin.minimize(net(), {"0.weight": 1}, X),
     fxmin.MaskError, ["'0.weight'", "int", "tensor of the parameter's shape (8, 4)"]),
    ("masks that are not a mapping", lambda: fxmin.minimize(net(), [torch.ones(8, 4)], X),
     fxmin.MaskError, ["mapping from parameter names"]),
    ("example inputs of the wrong dtype", lambda: fxmin.minimize(net(), full_mask(), (torch.ones(3, 4, dtype=torch.int64),)),
     fxmin.InputError, ["example inputs", "torch.int64", "Pass example inputs the model accepts"]),
    ("example inputs of the wrong shape", lambda: fxmin.minimize(net(), full_mask(), (torch.randn(3, 5),)),
     fxmin.InputError, ["(3, 5)", "Pass example inputs the model accepts"]),
    ("a verification level fxmin does not have", lambda: fxmin.minimize(net(), full_mask(), X, verify="fast"),
     fxmin.InputError, ["'fast'", "True, False or a level", "'quick'"]),
    ("a number of random input sets that is not one", lambda: fxmin.minimize(net(), full_mask(), X, trials=-1),
     fxmin.InputError, ["trials", "-1", "0 or more"]),
    ("`write_to` a directory that holds files", lambda: fxmin.minimize(net(), full_mask(), X, write_to="."),
     fxmin.InputError, ["write_to='.'", "not an empty directory", "never overwrites", "choose another"]),
    ("`shard_bytes` without `write_to`", lambda: fxmin.minimize(net(), full_mask(), X, shard_bytes=2**20),
     fxmin.InputError, ["shard_bytes", "pass write_to=directory too"]),
]


@pytest.mark.parametrize("row, call, error, fragments", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_raises_an_fxmin_error_that_says_what_to_do(row, call, error, fragments):
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{row}: {fragment!r} missing from {message!r}"


def test_a_nan_in_a_buffer_the_result_holds_is_refused():
    model = net_normed()
    model[1].running_var[3] = float("nan")
    with pytest.raises(fxmin.InputError, match=r"'1.running_var' holds 1 NaN or inf"):
        fxmin.minimize(model, {"0.weight": torch.ones(8, 4, dtype=torch.bool)}, X)


def test_each_tensor_is_checked_finite_once_where_the_pass_reads_it(monkeypatch):
    """NOTE [Finite where first read]: no walk of its own over the weights; every tensor of the model is
    summed once, in the pass (verification included)."""
    import fxmin.weights as weights

    checked: list = []
    real = weights.all_finite
    monkeypatch.setattr(weights, "all_finite", lambda tensor: checked.append(tensor.data_ptr()) or real(tensor))
    model = net_normed()
    mask = torch.ones(8, 4, dtype=torch.bool)
    mask[5:] = False
    fxmin.minimize(model, {"0.weight": mask}, X)
    floating = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    assert len(checked) == len(set(checked)) == len(floating)  # (the pass reads copies of the buffers)


def test_nan_in_a_weight_the_masks_remove_is_removed_with_it():
    """A mask sets its entries to zero (it does not multiply them): a NaN it removes is gone, and the
    result is exact against the masked model."""
    model = with_value(float("nan"), (5, 1))
    mask = torch.ones(8, 4, dtype=torch.bool)
    mask[5] = False  # unit 5 has no input left: it leaves
    result = fxmin.minimize(model, {"0.weight": mask}, X)
    assert result.module.get_submodule("0").out_features == 7
    assert torch.isnan(model[0].weight[5, 1])  # the user's model is untouched
    x = torch.randn(5, 4)
    torch.testing.assert_close(result.module(x), result.reference(x), rtol=1e-5, atol=1e-6)


def test_an_all_ones_mask_for_a_parameter_the_forward_never_reads_is_accepted():
    """It removes nothing, so there is nothing it could have been meant to shrink."""
    result = fxmin.minimize(WithUnusedHead(), {"old_head.weight": torch.ones(2, 8)}, X)
    assert "old_head" not in dict(result.module.named_modules())


def test_resuming_from_a_checkpoint_directory_of_another_model_says_whose_it_is(tmp_path):
    """A checkpoint directory written by a loop over another model: resume names the model it started
    from, what differs, and what to do, instead of continuing from a foreign model."""
    x = torch.randn(16, 4)

    def train(model, step):
        pass

    def evaluate(model):
        return 1.0

    options = dict(train=train, evaluate=evaluate, example_inputs=(x,), cycles=1, amount=0.5,
                   checkpoint_dir=str(tmp_path), progress=False)
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    fxmin.squeeze_release(other, **options)
    with pytest.raises(fxmin.InputError) as caught:
        fxmin.squeeze_release(net(), resume=True, **options)
    message = str(caught.value)
    for fragment in ["cycle_001.pt", "another model", "torch.nn.modules.container.Sequential",
                     "parameter '0.weight' is (6, 4) there, (8, 4) here",
                     "Pass the model that run started from", "another checkpoint_dir"]:
        assert fragment in message, f"{fragment!r} missing from {message!r}"
    resumed = fxmin.squeeze_release(other, resume=True, **options)  # its own model resumes (nothing left to run)
    assert [r.cycle for r in resumed.history] == [0, 1]


def test_masks_of_a_module_the_forward_never_calls_are_ignored_with_a_warning():
    """An inactive branch (an auxiliary head in eval mode, a leftover head) is masked as in training: no
    mistake. The masks change nothing, the module is not in the result, and a warning names it."""
    model = WithUnusedHead().eval()
    masks = {"old_head.weight": torch.zeros(2, 8), "body.weight": torch.ones(8, 4, dtype=torch.bool)}
    masks["body.weight"][:3] = False
    with pytest.warns(UserWarning, match="never calls old_head on these inputs"):
        result = fxmin.minimize(model, masks, X)
    assert not hasattr(result.module, "old_head")
    assert fxmin.count_parameters(result.module) == (5 * 4 + 5) + (2 * 5 + 2)
