"""Tiny Stable Diffusion pipelines with random weights, built offline from config.

They have the real SD1.5 and SDXL architectures (text encoders, VAE, UNet with
cross-attention, SDXL's added conditioning) at toy widths, so pipelines,
saving, loading and weight merging can be exercised on a CPU in seconds with no
download. The tokenizer is a real ``CLIPTokenizer`` over a small hand-written
vocabulary. Nothing here is meant to produce meaningful images.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

_WORDS = ["a", "photo", "of", "cat", "dog", "digit", "zero", "one", "two", "red", "blue", "painting"]


def tiny_tokenizer(max_length: int = 16):
    """A ``CLIPTokenizer`` with a ~500-token vocabulary (bytes, a few words, special tokens)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + [w + "</w>" for w in _WORDS]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        tok = CLIPTokenizer.from_pretrained(d, model_max_length=max_length)
    tok.pad_token = "<|endoftext|>"
    return tok


def tiny_text_encoder(vocab_size: int, hidden_size: int = 32, projection: bool = False, seed: int = 0):
    """A 2-layer CLIP text encoder (``CLIPTextModelWithProjection`` when ``projection``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def tiny_vae(seed: int = 0):
    """A 2-block ``AutoencoderKL`` (4 latent channels, downsampling factor 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    ).eval()


def tiny_sd15_unet(seed: int = 0, cross_attention_dim: int = 32):
    """An SD1.5-architecture ``UNet2DConditionModel`` at toy width."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
        attention_head_dim=8,
    ).eval()


def tiny_sdxl_unet(seed: int = 0, cross_attention_dim: int = 64, text_embed_dim: int = 32):
    """An SDXL-architecture UNet (``text_time`` added conditioning) at toy width."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + text_embed_dim,
    ).eval()


def _scheduler(prediction_type: str = "epsilon"):
    """Stable Diffusion's DDIM scheduler (:data:`perflow.builtin.suite.SCHEDULE`) with ``prediction_type``."""
    from diffusers import DDIMScheduler

    from perflow.builtin.suite import SCHEDULE

    return DDIMScheduler(**{**SCHEDULE, "prediction_type": prediction_type})


def tiny_sd15_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A ``StableDiffusionPipeline`` of tiny random parts (SD1.5 architecture, SD's beta schedule)."""
    from diffusers import StableDiffusionPipeline

    tok = tiny_tokenizer()
    return StableDiffusionPipeline(
        unet=tiny_sd15_unet(seed),
        scheduler=_scheduler(prediction_type),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(len(tok), seed=seed),
        tokenizer=tok,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """A ``StableDiffusionXLPipeline`` of tiny random parts (two text encoders, ``text_time`` conditioning)."""
    from diffusers import StableDiffusionXLPipeline

    tok = tiny_tokenizer()
    return StableDiffusionXLPipeline(
        unet=tiny_sdxl_unet(seed),
        scheduler=_scheduler(),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(len(tok), seed=seed),
        text_encoder_2=tiny_text_encoder(len(tok), projection=True, seed=seed + 1),
        tokenizer=tok,
        tokenizer_2=tiny_tokenizer(),
    )


def tiny_controlnet(unet, seed: int = 0):
    """A ``ControlNetModel`` derived from ``unet`` (as ``ControlNetModel.from_unet`` does for real ones)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).eval()


def tiny_class_teacher(seed: int = 0, image_size: int = 8, channels: int = 1, num_classes: int = 10) -> "ClassConditionalTeacher":
    """A random class-conditional teacher at toy width (for tests and benchmarks; pixel space, epsilon)."""
    from diffusers import UNet2DConditionModel

    from perflow.models import LabelEncoder
    from perflow.training.teachers import ClassConditionalTeacher

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=image_size, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=8,
    )
    label_encoder = LabelEncoder(num_classes=num_classes, embed_dim=16)
    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    set_alpha_to_one=False, prediction_type="epsilon")
    return ClassConditionalTeacher(unet, schedule, label_encoder, name="tiny-class-teacher")
