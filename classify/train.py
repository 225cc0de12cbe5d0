"""Train and evaluate a classifier (SequenceClassifier or ViT) on a classification task; returns test accuracy."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from hybrid_pretrain.classify.config import ClassifyConfig
from hybrid_pretrain.classify.tasks import ClassificationData, make_task
from hybrid_pretrain.models.classifier import SequenceClassifier
from hybrid_pretrain.models.vit import ViT
from hybrid_pretrain.training.optimizer import param_groups, warmup_cosine


def load_data(run: ClassifyConfig) -> tuple[ClassificationData, ClassificationData]:
    """(train, test) splits of the run's task."""
    if run.task == "listops":
        shape = {"max_len": run.max_len, "max_depth": run.max_depth, "max_args": run.max_args}
        return (make_task("listops", "train", run.seed, size=run.train_size, **shape),
                make_task("listops", "test", run.seed, size=run.test_size, **shape))
    return tuple(make_task("digits", split, run.seed, as_=run.input) for split in ("train", "test"))


def build_model(run: ClassifyConfig, data: ClassificationData) -> nn.Module:
    """The run's classifier, shaped for `data` (vocabulary, classes, image size)."""
    cfg = run.model_config(data.vocab_size)
    if run.model == "vit":
        _, channels, size, _ = data.inputs.shape
        return ViT(cfg, image_size=size, patch_size=run.patch_size, channels=channels, num_classes=data.num_classes)
    return SequenceClassifier(cfg, data.num_classes, pooling=run.pooling)


def _call(model: nn.Module, data: ClassificationData, idx: torch.Tensor, labels: bool = False) -> torch.Tensor:
    args = (data.inputs[idx],) if isinstance(model, ViT) else (data.inputs[idx], data.mask[idx])
    return model(*args, labels=data.targets[idx]) if labels else model(*args)


@torch.no_grad()
def accuracy(model: nn.Module, data: ClassificationData, batch_size: int = 500) -> float:
    """Fraction of examples whose argmax class is the target."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(data)))
        correct += int((_call(model, data, idx).argmax(-1) == data.targets[idx]).sum())
    model.train(was_training)
    return correct / len(data)


def train_classifier(
    run: ClassifyConfig, progress: bool = True, log: Callable[[str], None] = print
) -> tuple[nn.Module, float, list[float]]:
    """Train from scratch with AdamW and warmup + cosine; returns (model, final test accuracy, per-epoch losses)."""
    torch.manual_seed(run.seed)
    train, test = load_data(run)
    model = build_model(run, train)
    optimizer = torch.optim.AdamW(param_groups(model, run.lr, run.weight_decay), lr=run.lr)
    steps_per_epoch = -(-len(train) // run.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(run.warmup_epochs * steps_per_epoch, run.epochs * steps_per_epoch, 0.0)
    )
    order_rng = torch.Generator().manual_seed(run.seed + 1)
    acc, losses = 0.0, []
    bar = tqdm(range(1, run.epochs + 1), desc=f"{run.task} {run.model} {run.layers}", disable=not progress,
               unit="epoch")
    for epoch in bar:
        order = torch.randperm(len(train), generator=order_rng)
        total = 0.0
        for i in range(0, len(train), run.batch_size):
            loss = _call(model, train, order[i : i + run.batch_size], labels=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        losses.append(total / steps_per_epoch)
        if epoch % run.eval_every == 0 or epoch == run.epochs:
            acc = accuracy(model, test)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", test_acc=f"{acc:.3f}")
            if not progress:
                log(f"epoch {epoch}: train loss {losses[-1]:.4f}, test accuracy {acc:.4f}")
    return model, acc, losses
