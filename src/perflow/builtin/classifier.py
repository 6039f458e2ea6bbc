"""The project's digit classifier: a small CNN whose penultimate features define the
Fréchet distance of the digits evaluation (as Inception's pool features do for FID).

Trained on the ``"train"`` split of :mod:`perflow.builtin.digits` (8x8, ``[-1, 1]``),
with one-pixel random shifts and light Gaussian pixel noise so that it judges
generated digits on their shape. Reproduce the shipped weights with::

    python -m perflow.builtin.classifier --output-dir src/perflow/builtin/weights/digits_classifier
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..io import atomic_folder
from ..io import match_umask

WEIGHTS_DIR = Path(__file__).parent / "weights" / "digits_classifier"


class DigitClassifier(ModelMixin, ConfigMixin):
    """``images (B, 1, 8, 8) in [-1, 1] -> logits (B, 10)``; :meth:`features` gives the
    ``feature_dim``-d penultimate activations used for the Fréchet distance."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 128, image_size: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 2w, H/2, W/2)
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 2w, H/4, W/4)
            nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** 2, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def _check(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, size, size):
            raise ValueError(
                f"the digit classifier takes (B, 1, {size}, {size}) images in [-1, 1], got shape "
                f"{tuple(images.shape)}; resize samples to {size}x{size} first"
            )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, feature_dim)``."""
        self._check(images)
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def load_digit_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The shipped classifier (or one saved at ``path``), in eval mode."""
    path = Path(path) if path is not None else WEIGHTS_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no digit classifier at {path}; train one with `python -m perflow.builtin.classifier --output-dir {path}`"
        )
    return DigitClassifier.from_pretrained(path).eval()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to one pixel (background-padded) plus N(0, 0.05^2) pixel noise."""
    b = x.shape[0]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (b,), generator=gen)
    dy = torch.randint(0, 3, (b,), generator=gen)
    h, w = x.shape[-2:]
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    return out + 0.05 * torch.randn(out.shape, generator=gen)


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` whose arg-max class equals ``labels``."""
    return (model(images).argmax(-1) == labels).float().mean().item()


def train_digit_classifier(
    output_dir: str | Path = WEIGHTS_DIR, epochs: int = 40, batch_size: int = 64, seed: int = 0
) -> tuple[DigitClassifier, float]:
    """Train on the digits train split, save (safetensors, atomically), return ``(model, test accuracy)``."""
    from tqdm.auto import tqdm

    from perflow.builtin.digits import digits_tensors

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr = digits_tensors("train")
    x_te, y_te = digits_tensors("test")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(y_tr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in tqdm(range(epochs), desc="digit classifier", unit="epoch"):
        model.train()
        perm = torch.randperm(len(y_tr), generator=gen)
        for k in range(0, len(perm), batch_size):
            idx = perm[k:k + batch_size]
            loss = nn.functional.cross_entropy(model(_augment(x_tr[idx], gen)), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    acc = accuracy(model, x_te, y_te)
    with atomic_folder(output_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        match_umask(tmp)
    return model, acc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the digit classifier used by the digits evaluation.")
    p.add_argument("--output-dir", default=str(WEIGHTS_DIR))
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    _, acc = train_digit_classifier(args.output_dir, args.epochs, seed=args.seed)
    print(f"held-out test accuracy: {acc:.4f} (saved to {args.output_dir})")


if __name__ == "__main__":
    main()
