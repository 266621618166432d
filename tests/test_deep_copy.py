"""fxmin.graph_helpers.deep_copy makes what copy.deepcopy makes (NOTE [Copying module trees])."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fxmin.graph_helpers import deep_copy


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # one parameter under two names
        self.shared = nn.ReLU()
        self.blocks = nn.ModuleList([self.shared, nn.Sequential(self.shared, nn.Identity())])  # one module twice
        self.settings = {"sizes": [1, 2], "name": "tied", "kinds": {"a", "b"}}
        self.register_buffer("steps", torch.tensor(3))

    def forward(self, ids):
        return self.head(self.blocks[1](self.embed(ids)))


class _OwnCopy(nn.Linear):
    copies = 0

    def __deepcopy__(self, memo):
        type(self).copies += 1
        clone = nn.Linear(self.in_features, self.out_features)
        clone.load_state_dict(self.state_dict())
        return clone


def _models():
    conv = nn.Conv2d(3, 4, 3)
    conv.register_forward_hook(lambda module, args, out: out * 2)
    return [_Tied(), nn.LSTM(4, 6, num_layers=2), nn.MultiheadAttention(8, 2), nn.Sequential(conv, nn.BatchNorm2d(4))]


@pytest.mark.parametrize("model", _models(), ids=lambda m: type(m).__name__)
def test_deep_copy_makes_what_copy_deepcopy_makes(model):
    expected, copied = copy.deepcopy(model), deep_copy(model)
    assert [(n, type(m)) for n, m in copied.named_modules(remove_duplicate=False)] == \
        [(n, type(m)) for n, m in expected.named_modules(remove_duplicate=False)]
    for (name, value), (_, want) in zip(copied.state_dict(keep_vars=True).items(), expected.state_dict(keep_vars=True).items()):
        assert torch.equal(value, want) and value.requires_grad == want.requires_grad, name
    originals = {id(t) for t in (*model.parameters(), *model.buffers())}
    assert not originals & {id(t) for t in (*copied.parameters(), *copied.buffers())}  # nothing shared with the model
    assert len(list(copied.parameters())) == len(list(expected.parameters()))  # ties kept: no parameter counted twice
    assert len(list(copied.modules())) == len(list(expected.modules()))
    assert [len(m._forward_hooks) for m in copied.modules()] == [len(m._forward_hooks) for m in model.modules()]
    if isinstance(model, _Tied):
        assert copied.head.weight is copied.embed.weight and copied.blocks[0] is copied.blocks[1][0]
        assert copied.settings == model.settings and copied.settings["sizes"] is not model.settings["sizes"]
        ids = torch.tensor([[1, 2, 3]])
        torch.testing.assert_close(copied(ids), model(ids), rtol=0, atol=0)
    if isinstance(model, nn.LSTM):  # its __setstate__ rebuilt the flat weights around the new parameters
        x = torch.randn(5, 1, 4)
        torch.testing.assert_close(copied(x)[0], model(x)[0], rtol=0, atol=0)
        assert all(a is b for a, b in zip(copied._flat_weights, copied.parameters()))


def test_deep_copy_keeps_a_memo_entry_and_leaves_a_class_with_its_own_copy_to_it():
    model = nn.Sequential(_OwnCopy(2, 3), nn.Linear(3, 1))
    kept = model[1].weight
    copied = deep_copy(model, {id(kept): kept})
    assert copied[1].weight is kept and copied[1].bias is not model[1].bias
    assert _OwnCopy.copies == 1 and type(copied[0]) is nn.Linear
