"""Audit a small ResNet-like network: which channels go, which stay, and why.

Run:  python -m examples.audit_resnet_like          (prints tables and explanations)
CLI:  fxmin audit examples.audit_resnet_like:build_model --masks masks.pt --example-input-shape 1,3,32,32
      (write masks.pt with: python -c "import torch, examples.audit_resnet_like as m; torch.save(m.build_masks(), 'masks.pt')")
"""
from __future__ import annotations

import torch
from torch import nn

import fxmin


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(x + self.bn2(self.conv2(y)))


class ResNetLike(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(Block(width), Block(width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_model() -> ResNetLike:
    """A deterministic model with non-trivial BatchNorm statistics (eval mode)."""
    torch.manual_seed(0)
    model = ResNetLike().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-1, 1)
    return model


def build_masks() -> dict:
    """Prune 6 filters of layer1.0.conv1 and 4 of layer1.1.conv1 (whole output rows)."""
    masks = {}
    for name, count in (("layer1.0.conv1.weight", 6), ("layer1.1.conv1.weight", 4)):
        mask = torch.ones(16, 16, 3, 3, dtype=torch.bool)
        mask[:count] = False
        masks[name] = mask
    return masks


def main() -> fxmin.MinimizeResult:
    model, masks = build_model(), build_masks()
    audit = fxmin.dependency_graph(model, masks, (torch.randn(1, 3, 32, 32),))
    print(audit.table())
    print()
    for channel in range(6):
        print(audit.explain("layer1.0.conv1.weight", channel))
    print(audit.explain("stem.weight", 0))
    print()
    print(f"{audit.graph.number_of_nodes()} channel groups and ends, {audit.graph.number_of_edges()} dependencies")
    result = fxmin.minimize(model, masks, (torch.randn(1, 3, 32, 32),))
    print(result.report)
    return result


if __name__ == "__main__":
    main()
