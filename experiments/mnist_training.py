"""The training code of the LeNet-300-100 / MNIST experiment, the user's side of Squeeze-Release: fxmin only
calls :meth:`Trainer.train` and :meth:`Trainer.evaluate`. ``python -m experiments.mnist_lenet300`` runs it.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

import fxmin
from experiments.results import split_scores


def correct(model, x, y, batch=5000):
    model.eval()
    with torch.no_grad():
        return sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))


def accuracy(model, x, y, batch=5000):
    return 100.0 * correct(model, x, y, batch) / len(x)


class Trainer:
    """The user's training code: fxmin only calls train(model, step) and evaluate(model)."""

    def __init__(self, data, args, teacher_logits=None, lasso=0.0, distill=0.0, seed=0):
        (self.x, self.y), (self.vx, self.vy), (self.tx, self.ty) = data[:3]
        self.holdout = data[3] if len(data) > 3 else None  # --finish-split train: images nothing trains on
        self.args, self.teacher, self.lasso, self.distill = args, teacher_logits, lasso, distill
        self.generator = torch.Generator().manual_seed(seed)
        self.epochs = 0

    def loss(self, model, logits, index):
        loss = F.cross_entropy(logits, self.y[index])
        if self.distill and self.teacher is not None:
            t = self.args.temperature
            soft = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(self.teacher[index] / t, 1), reduction="batchmean")
            loss = (1 - self.distill) * loss + self.distill * t * t * soft
        if self.lasso:
            last = [n for n, _ in model.named_parameters() if n.endswith("weight")][-1]
            loss = loss + self.lasso * fxmin.group_lasso(model, skip_rows=[last], weighting=self.args.lasso_weighting)
        return loss

    def train(self, model, step):
        epochs = step.epochs if isinstance(step, fxmin.TrainStep) else step  # may be fractional
        finish = isinstance(step, fxmin.TrainStep) and step.phase == "finish"
        optimizer = torch.optim.Adam(model.parameters(), lr=self.args.lr)
        model.train()
        steps = math.ceil(epochs * len(self.x) / self.args.batch)
        # the finishing phase: no group lasso, learning rate decayed to 0 (cosine); --release-schedule
        phase = step.phase if isinstance(step, fxmin.TrainStep) else None
        cosine = finish or (self.args.release_schedule == "cosine" and phase in ("release", "recover")) \
            or (phase == "dense" and self.args.dense_schedule == "cosine")
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if cosine else None
        lasso, self.lasso = self.lasso, (0.0 if finish else self.lasso)
        # --lasso-fraction f: in the release phase only the first f of the steps carry the lasso; the
        # rest recover from it (with the lr decayed to 0), so the accuracy fxmin judges is not the lasso's
        release = isinstance(step, fxmin.TrainStep) and step.phase == "release" and self.args.lasso_fraction < 1
        free_from = math.ceil(self.args.lasso_fraction * steps) if release else steps
        order = torch.empty(0, dtype=torch.long)
        for i in range(steps):
            if i == free_from:
                self.lasso = 0.0
                schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps - i, 1))
            if len(order) < self.args.batch:
                order = torch.cat([order, torch.randperm(len(self.x), generator=self.generator)])
            index, order = order[:self.args.batch], order[self.args.batch:]
            optimizer.zero_grad(set_to_none=True)
            self.loss(model, model(self.x[index]), index).backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
        self.lasso = lasso
        self.epochs += epochs
        model.eval()

    def _scores(self, model, judged):
        return split_scores(correct, model, (self.vx, self.vy), (self.tx, self.ty), judged)

    def evaluate(self, model):
        """The search's judge: the first half of the validation split (all of it with --finish-split none
        or train)."""
        return self._scores(model, 0 if self.args.finish_split == "half" else None)

    def finish_evaluate(self, model):
        """The finishing phase's judge, on images the search never saw: the second half of the validation
        split, or (--finish-split train) the training images held out from all training."""
        if self.holdout is None:
            return self._scores(model, 1)
        return {**self._scores(model, None), "accuracy": accuracy(model, *self.holdout)}
