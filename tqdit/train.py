"""Train a small class-conditional DiT with EMA: ``python -m tqdit.train [overrides]``.

The reference DiT recipe at small scale: the hybrid loss (eps MSE + VLB for the learned variance),
label dropout 0.1 for classifier-free guidance, AdamW, an EMA of the weights (the EMA is what is
saved and sampled). Differences, chosen for short runs: a higher learning rate with warm-up and
cosine decay, and an EMA decay of 0.999 instead of 0.9999. Runs on GPU (bf16 autocast) or CPU.

``time_limit_s`` bounds the wall-clock: the cosine schedule then follows
max(step / steps, elapsed / time_limit_s), so a run always finishes its schedule in time.
Output: ``dit.safetensors`` (EMA weights, the model config in its metadata) and ``train_log.json``
in the run directory.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from tqdit.data import load_digits, to_model_range
from tqdit.diffusion import create_diffusion
from tqdit.models import build_dit
from tqdit.utils import atomic_write_json, resolve_device


def learning_rate(cfg: DictConfig, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` × lr at progress 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def train(cfg: DictConfig, out_dir: Path) -> dict:
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    images, labels = load_digits()
    data = to_model_range(images).to(device)
    targets = torch.as_tensor(labels, device=device)

    model = build_dit(cfg.model.arch, input_size=cfg.model.input_size).to(device)
    if model.in_channels != data.shape[1] or model.num_classes != int(targets.max()) + 1:
        raise ValueError(f"model {cfg.model.arch} does not fit the MNIST digits (1 channel, 10 classes)")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
    if cfg.compile:
        model.compile()  # after the EMA copy, so the saved weights come from a plain module
    diffusion = create_diffusion(None, learn_sigma=model.learn_sigma)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.bf16)

    model.train()
    start, running, history, steps_done = time.time(), None, [], 0
    bar = tqdm(range(cfg.steps), desc="train DiT", mininterval=5)
    for step in bar:
        elapsed = time.time() - start
        progress = (
            step / cfg.steps
            if cfg.time_limit_s is None
            else max(step / cfg.steps, elapsed / cfg.time_limit_s)
        )
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step, progress)
        index = torch.randint(0, len(data), (cfg.batch_size,), device=device)
        x0, y = data[index], targets[index]
        t = torch.randint(0, diffusion.num_steps, (cfg.batch_size,), device=device)
        noise = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, t, noise)
        with autocast:
            out = model(x_t, t, y)
        loss = diffusion.training_losses(out.float(), x0, x_t, t, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        ema.update_parameters(model)
        steps_done += 1
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        if step % cfg.log_every == 0:
            history.append(
                {
                    "step": step,
                    "loss": running,
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": round(elapsed, 1),
                }
            )
            bar.set_postfix(loss=f"{running:.4f}")
    seconds = time.time() - start

    weights = {k: v.detach().float().cpu().contiguous() for k, v in ema.module.state_dict().items()}
    metadata = {
        "arch": cfg.model.arch,
        "input_size": str(cfg.model.input_size),
        "steps": str(steps_done),
        "train_seconds": f"{seconds:.0f}",
        "config": json.dumps(OmegaConf.to_container(cfg, resolve=True)),
    }
    save_file(weights, str(out_dir / "dit.safetensors"), metadata=metadata)
    summary = {
        "steps": steps_done,
        "seconds": round(seconds, 1),
        "final_loss": running,
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "history": history,
    }
    atomic_write_json(out_dir / "train_log.json", summary)
    print(
        f"trained {steps_done} steps in {seconds:.0f} s on {device}; loss {running:.4f}; "
        f"weights: {out_dir / 'dit.safetensors'}"
    )
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    train(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
