"""The tiny SD-shaped pipeline: wadi.py's loading code, run with no download and no GPU.

    python wadi.py --pretrained_model_name_or_path tiny ...   # built once into ~/.cache/wadi/tiny-sd ($WADI_CACHE)
"""
import json
import os
import shutil
import string

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def build_tiny_pipeline(path):
    """A random SD1.5-shaped pipeline (UNet 0.8M, VAE 0.25M, CLIP 24k parameters) saved as a diffusers folder, with
    a character-level tokenizer whose vocabulary is written to disk."""
    torch.manual_seed(0)
    os.makedirs(os.path.join(path, "tokenizer"))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1  # inside a word, and ending one
    files = [os.path.join(path, "tokenizer", name) for name in ("vocab.json", "merges.txt")]
    for file, text in zip(files, (json.dumps(vocab), "#version: 0.2\n")):  # no merges: one token per character
        with open(file, "w") as f:
            f.write(text)
    tokenizer = CLIPTokenizer(*files, model_max_length=77)  # pad = eos = <|endoftext|>, as SD's
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(  # SD1.5's block types and attention layout, two levels, 32/64 channels
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(  # four blocks: downsamples by 8 like SD's
        block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
    scheduler = DDPMScheduler(  # SD1.5's training schedule, and its clip_sample=False
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(path)


def tiny_pipeline():
    """The tiny pipeline's folder, built on first use (atomically: parallel ranks may race) and cached."""
    cache = os.path.join(os.environ.get("WADI_CACHE", os.path.expanduser("~/.cache/wadi")), "tiny-sd")
    if not os.path.isdir(cache):
        tmp = f"{cache}.tmp{os.getpid()}"
        build_tiny_pipeline(tmp)
        try:
            os.rename(tmp, cache)
        except OSError:  # another process got there first: same content
            shutil.rmtree(tmp)
    return cache
