"""LeNet-300-100 with a 98 % global magnitude mask, minimized: ``make demo`` runs this.

    python -m examples.lenet300_demo

No data and no training are needed, so it runs offline in seconds. The weights are synthetic
but shaped like those of a LeNet-300-100 trained on MNIST (seeded, so every run prints the
same table):

- first-layer weights are large for pixels near the centre of the image and tiny on the
  border, which is always black in MNIST: magnitude pruning empties those columns, and fxmin
  drops the unused pixels with an ``index_select`` at the input;
- a few hidden units are nearly silent (tiny incoming weights): pruning empties their rows,
  each becomes the constant ``relu(bias)``, which fxmin folds into the next layer's bias;
- a few second-layer units are nearly unread (tiny outgoing weights): nobody needs them, so
  they go, and with them their rows in the layer before.

The script then checks the result against the masked model on 1,000 fresh random inputs.
"""
from __future__ import annotations

import time

import torch
from torch import nn

import fxmin

SEED = 0
SPARSITY = 0.98


def lenet300(seed: int = SEED) -> nn.Sequential:
    """784-300-100-10 with ReLU (266,610 parameters), synthetic 'trained-looking' weights."""
    generator = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    ink = torch.exp(-((rows - 13.5) ** 2 + (cols - 13.5) ** 2) / (2 * 5.0**2)).flatten()  # centre-heavy
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(300, 784, generator=generator) * 0.2 * ink)
        net[2].weight.copy_(torch.randn(100, 300, generator=generator) * 0.08)
        net[4].weight.copy_(torch.randn(10, 100, generator=generator) * 0.25)
        for layer in (net[0], net[2], net[4]):
            layer.bias.copy_(torch.randn(layer.out_features, generator=generator) * 0.05)
        net[0].weight[:12] *= 0.01  # 12 nearly silent hidden units
        net[4].weight[:, :8] *= 0.01  # 8 second-layer units that nobody reads
    return net.eval()


def main() -> fxmin.MinimizeResult:
    start = time.perf_counter()
    model = lenet300()
    masks = fxmin.global_magnitude(model, SPARSITY)  # over all weight matrices together; biases stay
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    print(f"LeNet-300-100: {fxmin.count_parameters(model):,} parameters; "
          f"{SPARSITY:.0%} global magnitude mask keeps {kept:,} of {total:,} weights")
    for name, mask in masks.items():
        print(f"  {name:9s} {tuple(mask.shape)}: {int(mask.sum()):5,} kept, "
              f"{int((~mask.any(1)).sum()):3} empty rows, {int((~mask.any(0)).sum()):3} empty columns")

    result = fxmin.minimize(model, masks)  # the input shape is inferred from the first Linear
    print()
    print(result.report.table())

    # What went where: the fixed point's facts, read from the analysis.
    analysis = result.analysis
    nodes = {node.target: node for node in analysis.graph_module.graph.nodes if node.op == "call_module"}
    for target, label in (("1", "first hidden layer"), ("3", "second hidden layer")):
        node = nodes[target]
        fact, present = analysis.facts[node], analysis.present(node)
        constant = int((fact.const & ~present).sum())
        unused = int((~fact.const & ~present).sum())
        print(f"{label}: {fact.size} -> {int(present.sum())} units "
              f"({constant} constant, folded into the next bias; {unused} unused)")

    # An independent check, beyond the verification minimize already ran.
    reference = fxmin.masked_reference(model, masks)[0]
    inputs = torch.rand(1000, 784, generator=torch.Generator().manual_seed(SEED + 1))
    with torch.no_grad():
        error = (reference(inputs) - result.module(inputs)).abs().max().item()
        error64 = (reference.double()(inputs.double()) - result.module.double()(inputs.double())).abs().max().item()
    print(f"1,000 fresh inputs: max |reference - minimized| = {error:.2e} in float32, {error64:.2e} in float64 "
          "(the folded biases are stored in float32)")
    print(f"minimized model: {nn.Module.__repr__(result.module)}")
    print(result.module.code.strip())
    print(f"done in {time.perf_counter() - start:.1f} s")
    return result


if __name__ == "__main__":
    main()
