"""Tiny Stable Diffusion, SD3 and Flux pipelines with random weights, built offline from config.

They have the real SD1.5 and SDXL architectures (text encoders, VAE, UNet with
cross-attention, SDXL's added conditioning) at toy widths, so pipelines,
saving, loading and weight merging can be exercised on a CPU in seconds with no
download. The tokenizer is a real ``CLIPTokenizer`` over a small hand-written
vocabulary; SD3 and Flux add a T5 encoder with a small unigram tokenizer built with the
``tokenizers`` library. Nothing here is meant to produce meaningful images.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the annotation only; tiny.py imports the trainer lazily
    from .training.teachers import ClassConditionalTeacher

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


def tiny_t5_tokenizer(max_length: int = 16):
    """A ``T5TokenizerFast`` over a small unigram vocabulary (the words above and single letters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in _WORDS] + [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tokenizer.json")
        tok.save(path)
        return T5TokenizerFast(tokenizer_file=path, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                               extra_ids=0, model_max_length=max_length)


def tiny_t5_encoder(vocab_size: int, d_model: int = 32, seed: int = 0):
    """A 2-layer ``T5EncoderModel`` at toy width."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def tiny_flow_vae(latent_channels: int, seed: int = 0):
    """A 2-block ``AutoencoderKL`` (downsampling factor 2) with SD3/Flux-style ``shift_factor`` and no quant convs."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8), in_channels=3, out_channels=3, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


def flow_scheduler(shift: float = 3.0, dynamic: bool = False):
    """A ``FlowMatchEulerDiscreteScheduler``: SD3's (``shift = 3``) or, with ``dynamic``, Flux's dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:
        return FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def tiny_sd3_transformer(seed: int = 0, joint_attention_dim: int = 64, pooled_projection_dim: int = 64):
    """An ``SD3Transformer2DModel`` (MMDiT) at toy width: 4 latent channels, 2x2 patches."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=joint_attention_dim, caption_projection_dim=32,
        pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=32,
    ).eval()


def tiny_sd3_pipeline(seed: int = 0):
    """A ``StableDiffusion3Pipeline`` of tiny random parts: two CLIP encoders with projections (32 wide each),
    T5 (64 wide = the joint attention width, at least the CLIP widths combined), shift 3."""
    from diffusers import StableDiffusion3Pipeline

    tok, t5tok = tiny_tokenizer(), tiny_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed),
        scheduler=flow_scheduler(3.0),
        vae=tiny_flow_vae(4, seed),
        text_encoder=tiny_text_encoder(len(tok), projection=True, seed=seed),
        tokenizer=tok,
        text_encoder_2=tiny_text_encoder(len(tok), projection=True, seed=seed + 1),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=tiny_t5_encoder(len(t5tok), d_model=64, seed=seed + 2),
        tokenizer_3=t5tok,
    )


def tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = True):
    """A ``FluxTransformer2DModel`` at toy width: 4 packed channels (1 latent channel x 2x2), guidance embedding."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    ).eval()


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A ``FluxPipeline`` of tiny random parts: CLIP (pooled, 32 wide), T5 (32 wide), 1 latent channel packed 2x2,
    dynamic shifting; ``guidance_embeds`` as Flux-dev (True) or Flux-schnell (False)."""
    from diffusers import FluxPipeline

    tok, t5tok = tiny_tokenizer(), tiny_t5_tokenizer()
    return FluxPipeline(
        transformer=tiny_flux_transformer(seed, guidance_embeds),
        scheduler=flow_scheduler(3.0, dynamic=True),
        vae=tiny_flow_vae(1, seed),
        text_encoder=tiny_text_encoder(len(tok), seed=seed),
        tokenizer=tok,
        text_encoder_2=tiny_t5_encoder(len(t5tok), d_model=32, seed=seed + 2),
        tokenizer_2=t5tok,
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
