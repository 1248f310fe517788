"""The benchmarks' students outside wadi.py's loop: a checkpoint's student or fake model as a UNet, the teacher's
frozen parts, and the regression baseline's fit (wadi.py's own student fitted by regression alone, no VSD)."""
import argparse
import contextlib
import glob
import os

import torch

import lorad
import wadi


def lorad_from(teacher, path, layers):
    """The teacher's UNet with the LoRaD angles of a checkpoint file (rank read off theta_a), unmerged."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    angles = load_file(path)
    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet", low_cpu_mem_usage=False)
    lorad.add_lorad(unet, next(v for k, v in angles.items() if k.endswith("theta_a")).shape[1], **layers)
    lorad.load_lorad(unet, angles)
    return unet.eval()


def student_from(teacher, ckpt, ema=True):
    """The teacher's UNet with the student of a checkpoint folder (its EMA where the run kept one and ema: what wadi.py
    exports), whatever its adapter (read off the file name {student|ema}_{adapter}; the rank off its tensors), unmerged."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    (path,) = (ema and glob.glob(os.path.join(ckpt, "ema_*.safetensors"))) or glob.glob(os.path.join(ckpt, "student_*"))
    adapter, state = os.path.basename(path).split("_", 1)[1][:-len(".safetensors")], load_file(path)
    rank = next((v.shape[1] if k.endswith("theta_a") else v.shape[0] for k, v in state.items()
                 if k.endswith("theta_a") or "lora_A" in k), 1)
    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet", low_cpu_mem_usage=False)
    student = wadi.share_base(unet, rank, wadi.STUDENT_LAYERS, adapter)
    wadi.load_own(student, unet, state)
    return student.eval()


def fit_by_regression(run, loss_at, anneal=True):
    """Fit the student of a `wadi.setup` run by the loss `loss_at(step)` alone, with its optimizer, clipping and steps;
    with anneal, its lr follows the student's --lr_schedule (linear: to 0 over the steps), as wadi.train_step sets it."""
    for step in range(run.max_steps):
        if anneal and run.args.lr_schedule == "linear":
            run.opt_s.param_groups[0]["lr"] = run.args.learning_rate * (1 - step / run.max_steps)
        wadi.update(loss_at(step), run.student_params, run.opt_s, run.scaler_s, run.world)
    return run.student.eval()


def frozen_parts(teacher):
    """The teacher's frozen parts on the CPU: a namespace that wadi.encode reads prompts with, its UNet and abar_t."""
    from transformers import CLIPTokenizer
    _, text_encoder, _, unet, scheduler = wadi.load_pipeline_parts(teacher, torch.device("cpu"), torch.float32)
    run = argparse.Namespace(tokenizer=CLIPTokenizer.from_pretrained(teacher, subfolder="tokenizer"),
                             text_encoder=text_encoder, device=torch.device("cpu"), autocast=contextlib.nullcontext())
    return run, unet, scheduler.alphas_cumprod.float()


def vsd_models(teacher, ckpt):
    """What eq. 11 compares at a checkpoint: the teacher's frozen parts (frozen_parts), the student as trained (not its
    EMA: the gradient acts on the trained tensors) and the fake model, as UNets."""
    fake = lorad_from(teacher, os.path.join(ckpt, "fake_lorad.safetensors"), wadi.FAKE_LAYERS)
    return (*frozen_parts(teacher), student_from(teacher, ckpt, ema=False), fake)
