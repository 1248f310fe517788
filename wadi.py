"""
WaDi: one-step text-to-image by Variational Score Distillation with LoRaD adapters
(Weight Direction-aware Distillation, CVPR 2026, arXiv 2603.08258), in one file.

One GPU:
    python wadi.py --prompts prompts.txt
One node of 8 GPUs (the paper's recipe, see train.sh):
    torchrun --standalone --nproc_per_node 8 wadi.py --prompts prompts.txt
A CPU with no network (a tiny SD-shaped model built on the spot, ~30 s):
    python wadi.py --pretrained_model_name_or_path tiny --prompts prompts.txt --output_dir wadi-tiny --max_train_steps 100 --train_batch_size 8

Three networks, one copy of the frozen SD UNet weights:
    teacher  eps_real   the pretrained UNet, frozen
    fake     eps_fake   teacher + LoRaD rank 32, learns the student's output distribution (eq. 12)
    student  G          teacher + LoRaD rank 256, the one-step generator, trained by VSD (eq. 11)
The output is output_dir/pipeline: a stock diffusers StableDiffusionPipeline to sample in one step.
"""
import argparse
import contextlib
import copy
import functools
import glob
import hashlib
import json
import math
import os
import re
import resource
import shutil
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lorad import LoRaDLinear, add_lorad, load_lorad, lorad_state_dict, merge_lorad

STUDENT_LAYERS = dict(include=("down_blocks", "mid_block", "up_blocks"))  # 182 Linear layers in SD1.5
FAKE_LAYERS = dict(include=STUDENT_LAYERS["include"], exclude=("proj_in", "proj_out", "time_emb_proj"))
T_GEN = 999  # the one-step generator always sees pure noise at the last training timestep
VALIDATION_PROMPTS = ["A dog is reading a thick book.", "a shiba inu wearing a beret.",
                      "Cute small Corgi sitting in a movie theater eating popcorn",
                      "A hyperrealistic photo of a fox astronaut, perfect face, artstation"]


class UserError(Exception):
    """Bad input: reported as one line on stderr and a non-zero exit, never a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print its usage too: keep bad input to one line
        raise UserError(message)


def parse_args(argv=None):
    p = ArgumentParser(description="WaDi: one-step distillation of Stable Diffusion by VSD with LoRaD")
    # model and data
    p.add_argument("--pretrained_model_name_or_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="hub id or local diffusers folder; 'tiny' builds a tiny SD-shaped model offline")
    p.add_argument("--prompts", required=True, help="text file, one training prompt per line")
    p.add_argument("--output_dir", default="wadi-out")
    p.add_argument("--resolution", type=int, default=None, help="default: the model's own (512 for SD1.5)")
    # optimization (paper §4.1)
    p.add_argument("--train_batch_size", type=int, default=16, help="per process")
    p.add_argument("--max_train_steps", type=int, default=None, help="default: 2 epochs of the prompt file")
    p.add_argument("--learning_rate", type=float, default=1e-4, help="student")
    p.add_argument("--lr_schedule", choices=["constant", "linear"], default="constant",
                   help="student lr: constant (paper) or linear to 0 at the last step (README: toy)")
    p.add_argument("--fake_learning_rate", type=float, default=1e-2)
    p.add_argument("--student_rank", type=int, default=256)
    p.add_argument("--fake_rank", type=int, default=32)
    p.add_argument("--guidance_scale", type=float, default=1.5, help="CFG on both teacher and fake score")
    p.add_argument("--fake_updates", type=int, default=1, help="fake-model steps per generator step (DMD2: 5)")
    p.add_argument("--fake_weighting", choices=["abar", "none"], default="abar",
                   help="eq. 12's weight: abar_t as the authors' code; none as the paper prints it (README: toy)")
    p.add_argument("--ema_decay", type=float, default=0.0, help="EMA of the student angles; 0 = off")
    # numerics and memory
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: bf16 on CUDA, no on CPU")
    p.add_argument("--gradient_checkpointing", action="store_true")
    # checkpoints, validation
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    p.add_argument("--validation_prompts", nargs="+", default=VALIDATION_PROMPTS)
    p.add_argument("--validation_steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("train_batch_size", "student_rank", "fake_rank", "fake_updates", "checkpointing_steps",
                 "validation_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UserError(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {args.resolution}")
    for name in ("learning_rate", "fake_learning_rate", "guidance_scale"):  # argparse's float() takes nan and inf
        if not 0 <= getattr(args, name) < math.inf:
            raise UserError(f"--{name} must be a finite number >= 0, got {getattr(args, name)}")
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if not -2**63 <= args.seed < 2**64:  # what torch.manual_seed takes
        raise UserError(f"--seed must fit in 64 bits, got {args.seed}")
    return args


def read_prompts(path):
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise UserError(f"prompts file not found: {path}")
    except UnicodeDecodeError as e:
        raise UserError(f"prompts file is not UTF-8 text: {path} ({e.reason} at byte {e.start})")
    except OSError as e:
        raise UserError(f"cannot read prompts file {path}: {e.strerror}")
    if not prompts:
        raise UserError(f"prompts file has no prompts: {path}")
    return prompts


# -----------------------------------------------------------------------------
# the tiny SD-shaped pipeline: the same loading code runs with no download and no GPU


def build_tiny_pipeline(path):
    """A randomly initialised SD1.5-shaped pipeline (UNet 0.8M, VAE 0.25M, CLIP 24k parameters), saved
    as a real diffusers folder. Its tokenizer is character level: the vocabulary is written to disk."""
    import string
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    os.makedirs(os.path.join(path, "tokenizer"))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1  # inside a word, and ending one
    files = [os.path.join(path, "tokenizer", name) for name in ("vocab.json", "merges.txt")]
    with open(files[0], "w") as f:
        json.dump(vocab, f)
    with open(files[1], "w") as f:
        f.write("#version: 0.2\n")  # no merges: one token per character
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


def resolve_model(name):
    """'tiny' -> the cached tiny pipeline folder (built once, atomically, so parallel ranks may race)."""
    if name != "tiny":
        return name
    cache = os.path.join(os.environ.get("WADI_CACHE", os.path.expanduser("~/.cache/wadi")), "tiny-sd")
    if not os.path.isdir(cache):
        tmp = f"{cache}.tmp{os.getpid()}"
        build_tiny_pipeline(tmp)
        try:
            os.rename(tmp, cache)
        except OSError:  # another process got there first: same content
            shutil.rmtree(tmp)
    return cache


def load_pipeline_parts(path, device, dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "unet", "config.json")):
        raise UserError(f"{path} is not a diffusers Stable Diffusion folder (no unet/config.json)")
    try:  # the scheduler first: an unknown hub id fails on its one small file
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")  # only for its alphas_cumprod
        kw = dict(low_cpu_mem_usage=False)  # no accelerate needed
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **kw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model '{path}': {str(e).strip().splitlines()[0]}")
    if scheduler.config.prediction_type != "epsilon":
        raise UserError(f"'{path}' predicts {scheduler.config.prediction_type!r}; WaDi needs an epsilon-prediction UNet")
    for m in (text_encoder, vae, unet):
        m.requires_grad_(False).eval().to(device)
    return tokenizer, text_encoder, vae, unet, scheduler


def share_base(unet, rank, layers):
    """A copy of `unet` that shares every base weight with it (deepcopy with the tensors pre-memoized),
    turned into a LoRaD model. Only the new angles take memory."""
    memo = {id(t): t for t in [*unet.parameters(), *unet.buffers()]}
    model = copy.deepcopy(unet, memo)
    add_lorad(model, rank, **layers)
    return model


def adapters(model):
    return [p for p in model.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# the WaDi step (paper §3, Suppl. F.3)


def one_step(student, z, emb, abar):
    """The one-step generator G(z, c): predict eps at t = 999 and solve x_t = sqrt(abar) x0 + sqrt(1-abar) eps
    for x0. In fp32: 1/sqrt(abar_999) ~ 14.6 amplifies every rounding error of eps."""
    a = abar[T_GEN]
    eps = student(z, torch.full((len(z),), T_GEN, device=z.device), emb).sample.float()
    return (z - (1 - a).sqrt() * eps) / a.sqrt()


def guided_eps(unet, x_t, t, cond, uncond, scale):
    """Classifier-free guidance, cond and uncond batched into one UNet call."""
    eps_c, eps_u = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond])).sample.float().chunk(2)
    return eps_u + scale * (eps_c - eps_u)


def vsd_loss(run, x0, cond, uncond, t, noise):
    """Eq. (11): the student's gradient is w(t) (eps_real - eps_fake) dG/dlambda with w(t) = 1 - abar_t.
    Written as a surrogate whose gradient w.r.t. x0 is exactly that difference (divided by x0.numel())."""
    a = run.abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0.detach() + (1 - a).sqrt() * noise  # forward diffusion of the student's sample
    with torch.no_grad(), run.autocast:
        eps_real = guided_eps(run.teacher, x_t, t, cond, uncond, run.args.guidance_scale)
        eps_fake = guided_eps(run.fake, x_t, t, cond, uncond, run.args.guidance_scale)
    grad = torch.nan_to_num((1 - a) * (eps_real - eps_fake))
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def fake_loss(run, x0, cond, t, noise):
    """Eq. (12): the fake model learns to denoise the student's samples (eq. 1's loss). The authors' code weights it
    by abar_t, which all but mutes high t, where the student's share of each mode shows (README: toy)."""
    a = run.abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with run.autocast:
        eps = run.fake(x_t, t, cond).sample.float()
    w = a if run.args.fake_weighting == "abar" else 1
    return (w * (eps - noise).square()).mean()


def update(loss, params, opt, scaler, world):
    """Backward, average over ranks, clip to norm 1, step. A non-finite gradient skips the step on every rank
    alike (the averaged gradient is the same everywhere). Returns the gradient norm."""
    scaler.scale(loss).backward()
    if world > 1:  # what DDP's reducer does, in one collective; the teacher is never wrapped
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.div_(world).split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    if torch.isfinite(norm):
        scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return norm.item()


def seeded(*key):
    """A CPU generator seeded by a hash of key: same draws on every machine, independent for each key."""
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))


@functools.lru_cache(maxsize=2)
def epoch_order(seed, epoch, n):
    """The order in which epoch `epoch` visits the n prompts (cached: 1.4M prompts take ~20 ms to permute)."""
    return torch.randperm(n, generator=seeded(seed, "epoch", epoch))


def draw(run, step):
    """All randomness of one step, for the GLOBAL batch, from a generator seeded by (seed, step); this rank takes
    its slice. So ranks never share noise (the authors' bug), N ranks x batch b == 1 process x batch N*b, and a
    resumed run draws exactly what an uninterrupted one would."""
    g, b, k = seeded(run.args.seed, step), run.args.train_batch_size, run.args.fake_updates
    B, shape, n = b * run.world, run.latent_shape, len(run.prompts)
    i = torch.arange(step * B, (step + 1) * B)  # global sample numbers; an epoch is a fresh permutation
    order = {e: epoch_order(run.args.seed, e, n) for e in (i // n).unique().tolist()}
    d = dict(prompt=torch.stack([order[e][j] for e, j in zip((i // n).tolist(), (i % n).tolist())]),
             z=torch.randn(B, *shape, generator=g), t=torch.randint(20, 981, (B,), generator=g),
             noise=torch.randn(B, *shape, generator=g),
             t_fake=torch.randint(0, 1000, (k, B), generator=g), noise_fake=torch.randn(k, B, *shape, generator=g),
             drop=torch.rand(k, B, generator=g) < 0.1)
    mine = slice(run.rank * b, (run.rank + 1) * b)
    return {key: (v[:, mine] if key in ("t_fake", "noise_fake", "drop") else v[mine]).to(run.device)
            for key, v in d.items()}


@torch.no_grad()
def encode(run, prompts):
    """CLIP embeddings exactly as StableDiffusionPipeline makes them: padded to 77, no attention mask."""
    ids = run.tokenizer(prompts, padding="max_length", max_length=run.tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(run.device)
    with run.autocast:
        return run.text_encoder(ids)[0].float()


def train_step(run, step):
    """One WaDi step: a generator update by VSD (eq. 11), then `fake_updates` fake-model updates (eq. 12)."""
    d = draw(run, step)
    cond = encode(run, [run.prompts[i] for i in d["prompt"].tolist()])
    if run.args.lr_schedule == "linear":  # a function of the step alone: a resumed run anneals exactly alike
        run.opt_s.param_groups[0]["lr"] = run.args.learning_rate * (1 - step / run.max_steps)
    uncond = run.null_emb.expand_as(cond)
    # 1. the student generates x0 in one step from pure noise
    with run.autocast:
        x0 = one_step(run.student, d["z"], cond, run.abar)
    # 2. VSD: push x0 where the teacher's score is and away from the fake score (eq. 11)
    loss_vsd = vsd_loss(run, x0, cond, uncond, d["t"], d["noise"])
    norm_s = update(loss_vsd, run.student_params, run.opt_s, run.scaler_s, run.world)
    if run.ema is not None:  # EMA of the angles alone: the base is shared, so it costs what the adapter does
        with torch.no_grad():
            for e, p in zip(run.ema_params, run.student_params):
                e.lerp_(p, 1 - run.args.ema_decay)
    # 3. the fake model learns the student's current distribution, with 10% empty prompts (for its CFG)
    for k in range(run.args.fake_updates):
        cond_k = torch.where(d["drop"][k].view(-1, 1, 1), uncond, cond)
        loss_fake = fake_loss(run, x0.detach(), cond_k, d["t_fake"][k], d["noise_fake"][k])
        norm_f = update(loss_fake, run.fake_params, run.opt_f, run.scaler_f, run.world)
    return dict(loss_vsd=loss_vsd.item(), loss_fake=loss_fake.item(), grad_norm_student=norm_s, grad_norm_fake=norm_f)


# -----------------------------------------------------------------------------
# checkpoints: written to a temporary name and renamed, so a kill never leaves a broken latest checkpoint


def list_checkpoints(output_dir):
    """checkpoint-{step} folders in output_dir, oldest first."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*"))
             if (m := re.fullmatch(r"checkpoint-(\d+)", os.path.basename(p)))]
    return [p for _, p in sorted(found)]


def adapter_sets(run):
    return {"student": run.student, "fake": run.fake, **({"ema": run.ema} if run.ema is not None else {})}


def save_checkpoint(run, step):
    from safetensors.torch import save_file
    final = os.path.join(run.args.output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, model in adapter_sets(run).items():
        save_file({k: v.cpu() for k, v in lorad_state_dict(model).items()}, os.path.join(tmp, f"{name}_lorad.safetensors"))
    torch.save(dict(step=step, samples_seen=step * run.args.train_batch_size * run.world, skipped=run.skipped,
                    opt_s=run.opt_s.state_dict(), opt_f=run.opt_f.state_dict(), scaler_s=run.scaler_s.state_dict(),
                    scaler_f=run.scaler_f.state_dict(), rng=torch.get_rng_state()), os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)  # only if resumed from an earlier checkpoint than the newest
    os.rename(tmp, final)
    if run.args.checkpoints_total_limit:
        for old in list_checkpoints(run.args.output_dir)[:-run.args.checkpoints_total_limit]:
            shutil.rmtree(old)


def load_checkpoint(run, path):
    from safetensors.torch import load_file
    try:
        for name, model in adapter_sets(run).items():
            load_lorad(model, load_file(os.path.join(path, f"{name}_lorad.safetensors"), device=str(run.device)))
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
        run.opt_s.load_state_dict(state["opt_s"])
        run.opt_f.load_state_dict(state["opt_f"])
    except Exception as e:  # missing or corrupt files, other ranks or layers: all mean "not this checkpoint"
        raise UserError(f"cannot resume from {path}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    run.scaler_s.load_state_dict(state["scaler_s"])
    run.scaler_f.load_state_dict(state["scaler_f"])
    torch.set_rng_state(state["rng"])
    run.skipped = state["skipped"]
    return state["step"]


# -----------------------------------------------------------------------------
# validation and export


@torch.no_grad()
def validation_latents(run, n):
    """Latent i is what diffusers draws for pipe(..., generator=torch.Generator().manual_seed(i))."""
    return torch.cat([torch.randn(1, *run.latent_shape, generator=torch.Generator().manual_seed(i)) for i in range(n)])


@torch.no_grad()
def validate(run, step):
    from PIL import Image
    model = run.ema if run.ema is not None else run.student
    z = validation_latents(run, len(run.val_emb)).to(run.device)
    with run.autocast:
        x0 = one_step(model, z, run.val_emb, run.abar)
        images = run.vae.decode((x0 / run.vae.config.scaling_factor).to(run.vae.dtype)).sample
    images = (images.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    h, w = images.shape[1:3]
    grid = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        grid.paste(Image.fromarray(im), (i * w, 0))
    path = os.path.join(run.args.output_dir, "samples", f"step-{step:06d}.png")
    grid.save(path)
    return path


def export(run):
    """student_lorad.safetensors (adapter only) and pipeline/ (a stock diffusers folder, one-step scheduler),
    then reload the pipeline through the public API: a broken export fails here, loudly."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    out, model = run.args.output_dir, (run.ema if run.ema is not None else run.student)
    angles = {k: v.cpu() for k, v in lorad_state_dict(model).items()}
    save_file(angles, os.path.join(out, "student_lorad.safetensors.tmp"))
    os.replace(os.path.join(out, "student_lorad.safetensors.tmp"), os.path.join(out, "student_lorad.safetensors"))
    # merge in fp32 into the original fp32 weights, not into the bf16/fp16 copy we may have trained on
    unet = UNet2DConditionModel.from_pretrained(run.model_path, subfolder="unet", low_cpu_mem_usage=False)
    add_lorad(unet, run.args.student_rank, **STUDENT_LAYERS)
    load_lorad(unet, angles)
    merge_lorad(unet)
    # one DDPM step with trailing spacing goes t=999 -> x0 exactly as one_step() does (SPEC §5)
    scheduler = DDPMScheduler.from_config(run.scheduler.config, timestep_spacing="trailing", clip_sample=False)
    pipe = StableDiffusionPipeline.from_pretrained(run.model_path, unet=unet, scheduler=scheduler, low_cpu_mem_usage=False)
    final = os.path.join(out, "pipeline")
    shutil.rmtree(final + ".tmp", ignore_errors=True)
    pipe.save_pretrained(final + ".tmp")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(final + ".tmp", final)
    # the check: the exported pipeline, sampled in one step, against the trainer's own generator
    pipe = StableDiffusionPipeline.from_pretrained(final, low_cpu_mem_usage=False).to(run.device)
    pipe.set_progress_bar_config(disable=True)
    z = validation_latents(run, 1).to(run.device)
    with torch.no_grad(), run.autocast:
        ours = one_step(model, z, run.val_emb[:1], run.abar)
        theirs = pipe(prompt_embeds=run.val_emb[:1].to(pipe.unet.dtype), latents=z, num_inference_steps=1,
                      guidance_scale=0, output_type="latent").images.float()
    return final, ((theirs - ours).norm() / ours.norm()).item()


# -----------------------------------------------------------------------------
# setup: distributed, data, models, optimizers


def check_output_dir(path):
    """The first part of `path` that exists must be a folder we can write to: a file there would only fail later,
    as a traceback from os.makedirs."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--output_dir {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output_dir {path}: {existing} is not writable")


def rank_note(run):
    """One line on the angles that a rank above min(out, in/2) adds without adding expressivity, or None. theta =
    theta_a @ theta_b is an out x in/2 matrix, which rank min(out, in/2) already spans: above it, a layer only gets
    more parameters to train. The paper's recipe has such layers too (rank 256 against in/2 = 160 in SD1.5's
    320-channel blocks, counted in its 83.80M), so we train what was asked and say so."""
    parts = []
    for flag, model in (("--student_rank", run.student), ("--fake_rank", run.fake)):
        layers = [m for m in model.modules() if isinstance(m, LoRaDLinear)]
        over = [m for m in layers if m.rank > min(m.out_features, m.in_features // 2)]
        if over:
            trained = sum(m.rank * (m.out_features + m.in_features // 2) for m in layers)
            needed = sum(min(m.rank, m.out_features, m.in_features // 2) * (m.out_features + m.in_features // 2)
                         for m in layers)
            parts.append(f"{flag} {layers[0].rank} in {len(over)} of {len(layers)} layers "
                         f"({trained / 1e6:.2f}M angles; {needed / 1e6:.2f}M at rank min(r, out, in/2) reach the same)")
    if parts:
        return "a rank above a layer's min(out, in/2) adds angles, not expressivity: " + "; ".join(parts)


def setup(args, parts=None):
    """Everything a run needs, in a namespace. `parts` (tokenizer, text_encoder, vae, unet, scheduler) replaces
    loading them from args.pretrained_model_name_or_path: bench.py passes models built in memory."""
    run = argparse.Namespace(args=args, skipped=0)
    run.prompts = read_prompts(args.prompts)
    # distributed: one code path for one or many processes; rank 0 alone logs, validates and saves
    run.world, run.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    run.device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(run.device)
    if run.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    mp = args.mixed_precision or ("bf16" if cuda else "no")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
    run.autocast = torch.autocast(run.device.type, dtype=dtype) if mp != "no" else contextlib.nullcontext()
    # where we write: a folder (or one we can create), not another run's checkpoints; checked before writing anything
    check_output_dir(args.output_dir)
    ckpts = list_checkpoints(args.output_dir)
    if args.resume_from_checkpoint == "latest":
        run.resume = ckpts[-1] if ckpts else None
    elif args.resume_from_checkpoint:
        run.resume = args.resume_from_checkpoint
        if not os.path.isfile(os.path.join(run.resume, "state.pt")):
            raise UserError(f"--resume_from_checkpoint {run.resume}: no such checkpoint folder")
    elif ckpts or os.path.exists(os.path.join(args.output_dir, "pipeline")):
        raise UserError(f"{args.output_dir} holds another run's output; pass --resume_from_checkpoint latest "
                        "or choose a new --output_dir")
    else:
        run.resume = None
    # models: the frozen parts in the training dtype; teacher, fake and student share one base UNet
    run.model_path = resolve_model(args.pretrained_model_name_or_path) if parts is None else None
    parts = parts or load_pipeline_parts(run.model_path, run.device, dtype)
    run.tokenizer, run.text_encoder, run.vae, unet, run.scheduler = parts
    run.abar = run.scheduler.alphas_cumprod.to(run.device, torch.float32)
    scale = 2 ** (len(run.vae.config.block_out_channels) - 1)
    res = args.resolution or unet.config.sample_size * scale
    run.latent_shape = (unet.config.in_channels, res // scale, res // scale)
    run.teacher = unet
    torch.manual_seed(args.seed)  # theta_b's random init: the same on every rank (nothing broadcasts it)
    run.student = share_base(unet, args.student_rank, STUDENT_LAYERS).train()
    run.fake = share_base(unet, args.fake_rank, FAKE_LAYERS).train()
    run.ema = share_base(unet, args.student_rank, STUDENT_LAYERS).requires_grad_(False) if args.ema_decay else None
    if run.ema is not None:
        load_lorad(run.ema, lorad_state_dict(run.student))
        run.ema_params = list(lorad_state_dict(run.ema).values())  # views of its angles, for the in-place EMA
    if args.gradient_checkpointing:  # recompute activations in backward; the models are in train mode
        run.student.enable_gradient_checkpointing()
        run.fake.enable_gradient_checkpointing()
    # optimizers: AdamW on the angles alone (paper §4.1); GradScaler only does something for fp16
    run.student_params, run.fake_params = adapters(run.student), adapters(run.fake)
    run.rank_note = rank_note(run)
    adamw = dict(betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    run.opt_s = torch.optim.AdamW(run.student_params, lr=args.learning_rate, **adamw)
    run.opt_f = torch.optim.AdamW(run.fake_params, lr=args.fake_learning_rate, **adamw)
    run.scaler_s = torch.amp.GradScaler(run.device.type, enabled=mp == "fp16")
    run.scaler_f = torch.amp.GradScaler(run.device.type, enabled=mp == "fp16")
    # text: the empty prompt (for CFG and the fake model's dropout) and the validation prompts, encoded once
    run.null_emb, run.val_emb = encode(run, [""]), encode(run, args.validation_prompts)
    global_batch = args.train_batch_size * run.world
    run.max_steps = args.max_train_steps or math.ceil(2 * len(run.prompts) / global_batch)  # 2 epochs
    run.mixed_precision = mp
    return run


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main(argv=None):
    from tqdm import tqdm
    args = parse_args(argv)
    run = setup(args)
    start = load_checkpoint(run, run.resume) if run.resume else 0
    master, out = run.rank == 0, args.output_dir
    if master:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        log_path = os.path.join(out, "log.jsonl")
        if os.path.exists(log_path):  # steps after the checkpoint we resume from are redone: drop their lines
            with open(log_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= start]
            with open(log_path, "w") as f:
                f.writelines(kept)
        log = open(log_path, "a")
        n_s, n_f = sum(p.numel() for p in run.student_params), sum(p.numel() for p in run.fake_params)
        print(f"wadi: {run.model_path} | {len(run.prompts)} prompts | student {n_s / 1e6:.2f}M, fake {n_f / 1e6:.2f}M "
              f"trainable | global batch {args.train_batch_size * run.world} on {run.world} x {run.device.type} | "
              f"{run.mixed_precision} | steps {start}..{run.max_steps}" + (f" (resumed {run.resume})" if run.resume else ""))
        if run.rank_note:
            print(f"wadi: note: {run.rank_note}")
    bad_in_a_row = 0
    for step in tqdm(range(start, run.max_steps), initial=start, total=run.max_steps, disable=not master):
        t0 = time.time()
        logs = train_step(run, step)
        # a non-finite loss or gradient skipped its update (on every rank alike); 10 in a row is a broken run
        ok = math.isfinite(logs["grad_norm_student"]) and math.isfinite(logs["grad_norm_fake"])
        bad_in_a_row = 0 if ok else bad_in_a_row + 1
        run.skipped += not ok
        if bad_in_a_row == 10:
            last = list_checkpoints(out)
            raise UserError(f"10 steps in a row with a non-finite loss or gradient (step {step + 1}); stopped. "
                            f"Last checkpoint: {last[-1] if last else 'none'}")
        if master:
            dt = time.time() - t0
            logs.update(step=step + 1, lr=run.opt_s.param_groups[0]["lr"], fake_lr=args.fake_learning_rate,
                        sec_per_step=dt, img_per_sec=args.train_batch_size * run.world / dt, peak_mem_gb=peak_memory_gb(run.device),
                        skipped=run.skipped)
            tqdm.write(f"step {step + 1}/{run.max_steps} | vsd {logs['loss_vsd']:.4g} | fake {logs['loss_fake']:.4g} | "
                       f"gnorm {logs['grad_norm_student']:.3g}/{logs['grad_norm_fake']:.3g} | lr {logs['lr']:.3g}/"
                       f"{args.fake_learning_rate:g} | {dt:.2f} s/step | {logs['img_per_sec']:.1f} img/s | "
                       f"mem {logs['peak_mem_gb']:.2f} GB | skipped {run.skipped}")
            log.write(json.dumps({k: v if math.isfinite(v) else None for k, v in logs.items()}) + "\n")  # NaN -> null
            log.flush()
            if (step + 1) % args.checkpointing_steps == 0:
                save_checkpoint(run, step + 1)
            if (step + 1) % args.validation_steps == 0:
                validate(run, step + 1)
    if master:
        samples = validate(run, run.max_steps)
        pipeline, err = export(run)
        print(f"wadi: done | samples {samples} | adapter {os.path.join(out, 'student_lorad.safetensors')} | "
              f"pipeline {pipeline} (one-step output vs trainer: {err:.1e} relative) | "
              f"peak memory {peak_memory_gb(run.device):.2f} GB")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    import diffusers
    import transformers
    from huggingface_hub.utils import logging as hub_logging
    hub_logging.set_verbosity_error()  # its retry notices while a hub id fails to resolve
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")  # diffusers 0.42 vs huggingface_hub 2
    for lib in (diffusers, transformers):  # their loading bars and notices would drown the training log
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    try:
        main()
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"wadi: error: {e}", file=sys.stderr)
        sys.exit(2)
