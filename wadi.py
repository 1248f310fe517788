"""
WaDi: one-step text-to-image by Variational Score Distillation with LoRaD adapters
(Weight Direction-aware Distillation, CVPR 2026, arXiv 2603.08258), in one file.

One GPU:
    python wadi.py --prompts prompts.txt
One node of 8 GPUs (the paper's recipe, see train.sh):
    torchrun --standalone --nproc_per_node 8 wadi.py --prompts prompts.txt
A CPU with no network (a tiny SD-shaped model built on the spot, ~30 s):
    python wadi.py --pretrained_model_name_or_path tiny --prompts prompts.txt --output_dir wadi-tiny --max_train_steps 20 --train_batch_size 8

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
import hashlib
import json
import math
import os
import resource
import shlex
import shutil
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lorad import add_lorad, merge_lorad, reuse_rotations

# which Linear layers get LoRaD (paper Table 3: 83.80M student angles at rank 256, 9.38M fake at rank 32 in SD1.5)
STUDENT_LAYERS = dict(include=("down_blocks", "mid_block", "up_blocks"))  # 182 Linear layers in SD1.5
FAKE_LAYERS = dict(include=STUDENT_LAYERS["include"], exclude=("proj_in", "proj_out", "time_emb_proj"))  # 160
T_GEN = 999  # the one-step generator always sees pure noise at the last training timestep
T_VSD = (20, 980)  # eq. 11's timesteps, inclusive: the ends of the schedule carry no useful score difference
P_EMPTY = 0.1  # share of the fake model's prompts replaced by the empty one, so that its CFG has an uncond branch
CLIP_NORM = 1.0  # gradient norm clipping of both adapters
MAX_BAD_STEPS = 10  # non-finite steps in a row that stop a run (each one is skipped)
VALIDATION_PROMPTS = ["A dog is reading a thick book.", "a shiba inu wearing a beret.",
                      "Cute small Corgi sitting in a movie theater eating popcorn",
                      "A hyperrealistic photo of a fox astronaut, perfect face, artstation"]


class UserError(Exception):
    """Bad input: reported as one line on stderr and a non-zero exit, never a traceback."""


# -----------------------------------------------------------------------------
# the WaDi step (paper §3.3; its algorithm in Suppl. F.3)


def one_step(student, z, emb, abar):
    """The one-step generator G(z, c): predict eps at t = 999 and solve x_t = sqrt(abar) x0 + sqrt(1-abar) eps
    for x0. In fp32: 1/sqrt(abar_999) ~ 14.6 amplifies every rounding error of eps."""
    a = abar[T_GEN]
    eps = student(z, torch.full((len(z),), T_GEN, device=z.device), emb).sample.float()
    return (z - (1 - a).sqrt() * eps) / a.sqrt()


def diffuse(x0, t, noise, abar):
    """The forward process q(x_t | x0): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    a = abar[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def guided_eps(unet, x_t, t, cond, uncond, scale):
    """Classifier-free guidance, cond and uncond batched into one UNet call."""
    eps_c, eps_u = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond])).sample.float().chunk(2)
    return eps_u + scale * (eps_c - eps_u)


def vsd_loss(x0, eps_real, eps_fake, abar_t):
    """Eq. (11): the student's gradient is w(t) (eps_real - eps_fake) dx0/dtheta, w(t) = 1 - abar_t, both scores taken at
    x_t = diffuse(x0). A surrogate whose gradient w.r.t. x0 is that difference / x0.numel(): descent moves x0 against it,
    towards the teacher's score and away from the fake's. An overflowed score leaves it non-finite: `update` skips."""
    w = 1 - abar_t.view(-1, 1, 1, 1)
    return 0.5 * F.mse_loss(x0, (x0 - w * (eps_real - eps_fake)).detach())


def fake_loss(fake, x0, t, noise, cond, abar, weighted=True):
    """Eq. (12): the fake model learns to denoise the student's samples (eq. 1's loss). The authors' code weights it
    by abar_t, which all but mutes high t, where the student's share of each mode shows (docs/toy.md)."""
    eps = fake(diffuse(x0, t, noise, abar), t, cond).sample.float()
    w = abar[t].view(-1, 1, 1, 1) if weighted else 1
    return (w * (eps - noise).square()).mean()


def regression_loss(run, d):
    """DMD's regression (--regression_pairs; else 0): MSE of the student's one-step samples to the teacher's, pair by pair."""
    if run.pairs is None:
        return 0
    i = d["pair"].tolist()
    with run.autocast:
        x0 = one_step(run.student, run.pairs["z"][i].to(run.device), encode(run, [run.pairs["prompts"][j] for j in i]), run.abar)
    return run.args.regression_weight * F.mse_loss(x0, run.pairs["x0"][i].to(run.device))


def train_step(run, step):
    """One WaDi step: a generator update by VSD (eq. 11), then `fake_updates` fake-model updates (eq. 12)."""
    args, d = run.args, draw(run, step)
    cond = encode(run, [run.prompts[i] for i in d["prompt"].tolist()])
    uncond = run.null_emb.expand_as(cond)
    # the lrs, a function of the flags and the step alone: a resumed run trains at those given, annealed alike
    anneal = 1 - step / run.max_steps if args.lr_schedule == "linear" else 1
    run.opt_s.param_groups[0]["lr"], run.opt_f.param_groups[0]["lr"] = args.learning_rate * anneal, args.fake_learning_rate
    # a LoRaD layer forms W' once per value of its angles (student: forward, recompute, backward; fake: + guided call)
    with run.reuse_rotations(run.fake), run.reuse_rotations(run.student):
        # 1. the student generates x0 in one step from pure noise
        with run.autocast:
            x0 = one_step(run.student, d["z"], cond, run.abar)
        # 2. VSD: both guided scores at the noised sample, then push x0 towards the teacher's, away from the fake's
        x_t = diffuse(x0.detach(), d["t"], d["noise"], run.abar)
        with torch.no_grad(), run.autocast:
            eps_real = guided_eps(run.teacher, x_t, d["t"], cond, uncond, args.guidance_scale)
            eps_fake = guided_eps(run.fake, x_t, d["t"], cond, uncond, args.guidance_scale)
        loss_vsd = vsd_loss(x0, eps_real, eps_fake, run.abar[d["t"]])
        # 3. with --regression_pairs, DMD's regression onto the teacher's multi-step samples
        norm_s = update(loss_vsd + regression_loss(run, d), run.student_params, run.opt_s, run.scaler_s, run.world)
        if run.ema is not None:
            torch._foreach_lerp_(run.ema_params, [p.detach() for p in run.student_params], 1 - args.ema_decay)
        # 4. the fake model learns the student's current distribution, with 10% empty prompts (for its CFG)
        for k in range(args.fake_updates):
            cond_k = torch.where(d["drop"][k].view(-1, 1, 1), uncond, cond)
            with run.autocast:
                loss_fake = fake_loss(run.fake, x0.detach(), d["t_fake"][k], d["noise_fake"][k], cond_k, run.abar,
                                      weighted=args.fake_weighting == "abar")
            norm_f = update(loss_fake, run.fake_params, run.opt_f, run.scaler_f, run.world)
    logs = torch.stack([loss_vsd.detach(), loss_fake.detach(), norm_s, norm_f]).tolist()  # the step's one host sync
    return dict(zip(("loss_vsd", "loss_fake", "grad_norm_student", "grad_norm_fake"), logs))


def update(loss, params, opt, scaler, world):
    """Backward, average over ranks, clip, step. A non-finite gradient norm skips the step on every rank alike (the
    averaged gradient is the same everywhere), on the device: no host sync. Returns the gradient norm, a tensor."""
    scaler.scale(loss).backward()
    if world > 1:  # what DDP's reducer does, in one collective; the teacher is never wrapped
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.div_(world).split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
    scaler.unscale_(opt)  # fp16 alone; it notes non-finite gradients, for update() to lower the scale
    norm = torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
    opt.found_inf = (~norm.isfinite()).float()  # fused AdamW skips its step when 1. Not scaler.step(), which puts its
    opt.step()  # own check in its place: finite gradients whose norm overflows would step (clipped to 0, on momentum)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return norm


# -----------------------------------------------------------------------------
# data: every step's randomness drawn for the global batch from (seed, step), and the prompts' CLIP embeddings


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
             z=torch.randn(B, *shape, generator=g), t=torch.randint(T_VSD[0], T_VSD[1] + 1, (B,), generator=g),
             noise=torch.randn(B, *shape, generator=g),
             t_fake=torch.randint(0, 1000, (k, B), generator=g), noise_fake=torch.randn(k, B, *shape, generator=g),
             drop=torch.rand(k, B, generator=g) < P_EMPTY,
             pair=torch.randint(len(run.pairs["z"]) if run.pairs else 1, (B,), generator=g))
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


def read_pairs(path, latent_shape):
    """DMD's regression pairs: noise z, the teacher's multi-step sample x0 from it, and their prompts (JSON in the
    file's metadata), made once before training (docs/remedies.md shows how, with a stock diffusers pipeline)."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            z, x0, prompts = f.get_tensor("z"), f.get_tensor("x0"), json.loads(f.metadata()["prompts"])
    except Exception as e:  # not found, not safetensors, no z, x0 or prompts
        raise UserError(f"cannot read --regression_pairs {path}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    if not (z.shape == x0.shape and z.shape[1:] == latent_shape and len(prompts) == len(z) and x0.isfinite().all()):
        raise UserError(f"--regression_pairs {path}: z and x0 must be finite latents {latent_shape}, one per prompt")
    return dict(z=z, x0=x0, prompts=prompts)


def read_prompts(path):
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:  # not found, a folder, not readable, not UTF-8
        raise UserError(f"cannot read prompts file {path}: {getattr(e, 'strerror', None) or f'not UTF-8 text ({e})'}")
    if not prompts:
        raise UserError(f"prompts file has no prompts: {path}")
    return prompts


# -----------------------------------------------------------------------------
# setup: the models (one shared base), distributed, optimizers


def load_pipeline_parts(path, device, dtype):
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "unet", "config.json")):
        raise UserError(f"{path} is not a diffusers Stable Diffusion folder (no unet/config.json)")
    try:  # the scheduler first: an unknown hub id fails on its one small file
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")  # only for its alphas_cumprod
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, safety_checker=None, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model '{path}': {str(e).strip().splitlines()[0]}")
    if scheduler.config.prediction_type != "epsilon":
        raise UserError(f"'{path}' predicts {scheduler.config.prediction_type!r}; WaDi needs an epsilon-prediction UNet")
    for m in (pipe.text_encoder, pipe.vae, pipe.unet):
        m.requires_grad_(False).eval().to(device)
    return pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, scheduler


def share_base(unet, rank, layers, adapter="lorad"):
    """A copy of `unet` with an adapter on `layers`, sharing every base weight with `unet` (deepcopy with the tensors
    pre-memoized): LoRaD, or LoRA or DoRA by diffusers' peft integration (lora_alpha = rank: scale 1). 'full': a copy
    of its own in fp32, every weight trained (DMD2's student)."""
    if adapter == "full":
        return copy.deepcopy(unet).float().requires_grad_(True)
    model = copy.deepcopy(unet, {id(t): t for t in [*unet.parameters(), *unet.buffers()]})
    if adapter == "lorad":
        add_lorad(model, rank, **layers)
    else:
        from peft import LoraConfig
        names = [n for n, m in unet.named_modules() if type(m) is torch.nn.Linear
                 and any(s in n for s in layers["include"]) and not any(s in n for s in layers.get("exclude", ()))]
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=names, use_dora=adapter == "dora"))
        for p in [p for p in model.parameters() if p.requires_grad]:  # peft makes them in the base's dtype: in bf16
            p.data = p.data.float()  # Adam's ~lr steps round away, and GradScaler cannot unscale fp16 gradients
    return model


def own_tensors(model, base):
    """What a model trains, by name: the parameters it does not share with `base` (its adapter; 'full': all)."""
    shared = {id(p) for p in base.parameters()}
    return {k: p.detach() for k, p in model.named_parameters() if id(p) not in shared}


@torch.no_grad()
def load_own(model, base, state):
    own = own_tensors(model, base)
    if own.keys() != state.keys() or any(own[k].shape != v.shape for k, v in state.items()):
        raise ValueError(f"{len(state)} tensors do not match the model's {len(own)} (another --adapter or rank?)")
    torch._foreach_copy_(list(own.values()), [state[k] for k in own])


def check_output_dir(path):
    """The first part of `path` that exists must be a folder we can write to (else os.makedirs fails, later)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
        raise UserError(f"--output_dir {path}: {existing} is " + ("not writable" if os.path.isdir(existing) else "a file"))


def setup(args, parts=None):
    """Everything a run needs, in a namespace. `parts` (tokenizer, text_encoder, vae, unet, scheduler), if given,
    replaces loading them: the benchmarks pass models built in memory."""
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
    run.mixed_precision = mp = args.mixed_precision or ("bf16" if cuda else "no")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
    run.autocast = torch.autocast(run.device.type, dtype=dtype) if mp != "no" else contextlib.nullcontext()
    # where we write: a folder (or one we can create), not another run's checkpoints; checked before writing anything
    check_output_dir(out := args.output_dir)
    ckpts, run.resume = list_checkpoints(out), args.resume_from_checkpoint
    if run.resume == "latest":  # the newest checkpoint; none: a fresh start, in an empty or new folder alone
        run.resume = ckpts[-1] if ckpts else None
    elif run.resume and not os.path.isfile(os.path.join(run.resume, "state.pt")):
        raise UserError(f"--resume_from_checkpoint {run.resume}: no such checkpoint folder")
    if not run.resume and (ckpts or any(os.path.exists(os.path.join(out, f)) for f in ("pipeline", "log.jsonl"))):
        raise UserError(f"{out} holds another run's output; " + ("pass --resume_from_checkpoint latest or " if ckpts
                        else "it has no checkpoint to resume from: ") + "choose a new --output_dir")
    # models: the frozen parts in the training dtype; teacher, fake and student share one base UNet
    name = args.pretrained_model_name_or_path
    if name == "tiny" and parts is None:  # a tiny SD-shaped model, built on the spot (tiny.py)
        from tiny import tiny_pipeline
        name = tiny_pipeline()
    run.model_path = name if parts is None else None
    parts = parts or load_pipeline_parts(run.model_path, run.device, dtype)
    run.tokenizer, run.text_encoder, run.vae, unet, run.scheduler = parts
    run.abar = run.scheduler.alphas_cumprod.to(run.device, torch.float32)
    scale = 2 ** (len(run.vae.config.block_out_channels) - 1)
    res = args.resolution or unet.config.sample_size * scale
    run.latent_shape = (unet.config.in_channels, res // scale, res // scale)
    run.teacher = unet
    torch.manual_seed(args.seed)  # theta_b's random init: the same on every rank (nothing broadcasts it)
    run.student = share_base(unet, args.student_rank, STUDENT_LAYERS, args.adapter).train()
    run.fake = share_base(unet, args.fake_rank, FAKE_LAYERS).train()  # LoRaD, whatever the student's adapter
    run.ema = share_base(unet, args.student_rank, STUDENT_LAYERS, args.adapter).requires_grad_(False) if args.ema_decay else None
    if run.ema is not None:  # an EMA of the trained tensors alone: with a shared base, it costs what the adapter does
        load_own(run.ema, unet, own_tensors(run.student, unet))
        run.ema_params = list(own_tensors(run.ema, unet).values())  # views, for the in-place EMA
    for model in (run.student, run.fake) if args.gradient_checkpointing else ():  # in train mode: recompute in backward
        model.enable_gradient_checkpointing()
    run.reuse_rotations = (lambda m: contextlib.nullcontext()) if args.compile else reuse_rotations  # fused
    for model in (run.teacher, run.student, run.fake) if args.compile else ():  # forward and backward, by inductor
        model.compile(dynamic=False)  # one graph per call shape (batch b and 2b): no dynamic-shape recompiles
    # optimizers: AdamW on the angles alone (paper §4.1); GradScaler only does something for fp16
    run.adapter_sets = {f"student_{args.adapter}": run.student, "fake_lorad": run.fake,  # checkpoint file names
                        **({f"ema_{args.adapter}": run.ema} if run.ema is not None else {})}
    run.student_params, run.fake_params = ([p for p in m.parameters() if p.requires_grad] for m in (run.student, run.fake))
    adamw = dict(betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, fused=True)  # one kernel per step, not a dozen
    run.opt_s = torch.optim.AdamW(run.student_params, lr=args.learning_rate, **adamw)
    run.opt_f = torch.optim.AdamW(run.fake_params, lr=args.fake_learning_rate, **adamw)
    run.scaler_s, run.scaler_f = (torch.amp.GradScaler(run.device.type, enabled=mp == "fp16") for _ in range(2))
    # text: the empty prompt (for CFG and the fake model's dropout) and the validation prompts, encoded once
    run.null_emb, run.val_emb = encode(run, [""]), encode(run, args.validation_prompts)
    run.pairs = read_pairs(args.regression_pairs, run.latent_shape) if args.regression_pairs else None
    # validation noise: latent i is what diffusers draws for pipe(..., generator=torch.Generator().manual_seed(i))
    run.val_z = torch.cat([torch.randn(1, *run.latent_shape, generator=torch.Generator().manual_seed(i))
                           for i in range(len(run.val_emb))]).to(run.device)
    run.max_steps = args.max_train_steps or math.ceil(2 * len(run.prompts) / (args.train_batch_size * run.world))
    return run


# -----------------------------------------------------------------------------
# checkpoints: written to a temporary name and renamed, so a kill never leaves a broken latest checkpoint


def replace_atomically(final, write):
    """write(tmp), then rename tmp to `final`, replacing an older one: a kill never leaves a half-written `final`."""
    tmp = f"{final}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)  # an older folder (os.replace replaces a file itself)
    os.replace(tmp, final)


def list_checkpoints(output_dir):
    """checkpoint-{step} folders in output_dir, oldest first."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    found = sorted((int(n[11:]), n) for n in names if n.startswith("checkpoint-") and n[11:].isdecimal())
    return [os.path.join(output_dir, n) for _, n in found]


def save_checkpoint(run, step):
    from safetensors.torch import save_file

    def write(tmp):
        os.makedirs(tmp)
        for name, model in run.adapter_sets.items():
            save_file({k: v.cpu() for k, v in own_tensors(model, run.teacher).items()}, os.path.join(tmp, f"{name}.safetensors"))
        torch.save(dict(step=step, samples_seen=step * run.args.train_batch_size * run.world, skipped=run.skipped,
                        opt_s=run.opt_s.state_dict(), opt_f=run.opt_f.state_dict(), scaler_s=run.scaler_s.state_dict(),
                        scaler_f=run.scaler_f.state_dict(), rng=torch.get_rng_state()), os.path.join(tmp, "state.pt"))
    replace_atomically(os.path.join(run.args.output_dir, f"checkpoint-{step}"), write)
    if run.args.checkpoints_total_limit:
        for old in list_checkpoints(run.args.output_dir)[:-run.args.checkpoints_total_limit]:
            shutil.rmtree(old)


def load_checkpoint(run, path):
    from safetensors.torch import load_file
    try:
        for name, model in run.adapter_sets.items():
            load_own(model, run.teacher, load_file(os.path.join(path, f"{name}.safetensors"), device=str(run.device)))
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
        for name in ("opt_s", "opt_f", "scaler_s", "scaler_f"):
            getattr(run, name).load_state_dict(state[name])
    except Exception as e:  # missing or corrupt files, other ranks or layers: all mean "not this checkpoint"
        raise UserError(f"cannot resume from {path}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    torch.set_rng_state(state["rng"])
    run.skipped = state["skipped"]
    return state["step"]


# -----------------------------------------------------------------------------
# validation and export


@torch.no_grad()
def validate(run, step):
    from PIL import Image
    model = run.ema if run.ema is not None else run.student
    with run.autocast:
        x0 = one_step(model, run.val_z, run.val_emb, run.abar)
        images = run.vae.decode((x0 / run.vae.config.scaling_factor).to(run.vae.dtype)).sample
    images = (images.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    grid = torch.cat(list(images), dim=2).permute(1, 2, 0).cpu().numpy()  # the images side by side, (H, N*W, 3)
    path = os.path.join(run.args.output_dir, "samples", f"step-{step:06d}.png")
    Image.fromarray(grid).save(path)
    return path


def export(run, samples):
    """student_{adapter}.safetensors (the trained tensors alone) and pipeline/ (a stock diffusers folder, one-step
    scheduler, a model card), then reload the pipeline through the public API: a broken export fails here, loudly."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    out, model, adapter = run.args.output_dir, (run.ema if run.ema is not None else run.student), run.args.adapter
    state = {k: v.cpu() for k, v in own_tensors(model, run.teacher).items()}
    replace_atomically(os.path.join(out, f"student_{adapter}.safetensors"), functools.partial(save_file, state))
    # merge in fp32 into the original fp32 weights, not into the bf16/fp16 copy we may have trained on
    base = UNet2DConditionModel.from_pretrained(run.model_path, subfolder="unet", low_cpu_mem_usage=False)
    unet = share_base(base, run.args.student_rank, STUDENT_LAYERS, adapter)
    load_own(unet, base, state)
    if adapter == "lorad":
        merge_lorad(unet)
    elif adapter != "full":  # W + B A (DoRA: rescaled to its learned norms) into the base Linear layers, then those
        unet.fuse_lora()  # in place of the adapted ones (the base is `base`'s, changed in place: it is ours alone)
        unet.unload_lora()
    # one DDPM step with trailing spacing goes t=999 -> x0 exactly as one_step() does (so do DDIM and LCM; PNDM does not)
    scheduler = DDPMScheduler.from_config(run.scheduler.config, timestep_spacing="trailing", clip_sample=False)
    pipe = StableDiffusionPipeline.from_pretrained(run.model_path, unet=unet, scheduler=scheduler, low_cpu_mem_usage=False)
    replace_atomically(final := os.path.join(out, "pipeline"), pipe.save_pretrained)
    a = run.args  # the model card, as the diffusers training examples write one (SD1.5's license; JSON is YAML)
    with open(os.path.join(final, "README.md"), "w", encoding="utf-8") as f:
        f.write(f"---\nbase_model: {json.dumps(a.pretrained_model_name_or_path)}\nlicense: creativeml-openrail-m\n"
                "library_name: diffusers\ntags: [text-to-image, one-step, wadi, diffusers]\n---\n\n"
                f"# {a.pretrained_model_name_or_path} in one step, by [WaDi](https://arxiv.org/abs/2603.08258)\n\n```python\n"
                f"from diffusers import StableDiffusionPipeline\n\npipe = StableDiffusionPipeline.from_pretrained({final!r})\n"
                f"image = pipe({a.validation_prompts[0]!r}, num_inference_steps=1, guidance_scale=0).images[0]\n```\n\n"
                f"Trained by `{run.command}`: {run.max_steps} steps, global batch {a.train_batch_size * run.world}; in all, "
                + ", ".join(f"{k} {v}" for k, v in vars(a).items()) + ".\n\n![The final samples](samples.png)\n")
    shutil.copy(samples, os.path.join(final, "samples.png"))
    # the check: the exported pipeline, sampled in one step, against the trainer's own generator
    pipe = StableDiffusionPipeline.from_pretrained(final, low_cpu_mem_usage=False).to(run.device)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad(), run.autocast:
        ours = one_step(model, run.val_z[:1], run.val_emb[:1], run.abar)
        theirs = pipe(prompt_embeds=run.val_emb[:1].to(pipe.unet.dtype), latents=run.val_z[:1], num_inference_steps=1,
                      guidance_scale=0, output_type="latent").images.float()
    return final, ((theirs - ours).norm() / ours.norm()).item()


# -----------------------------------------------------------------------------
# the command line


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print its usage too: keep bad input to one line
        raise UserError(message)


def parse_args(argv=None):
    p = ArgumentParser(description="WaDi: one-step distillation of Stable Diffusion by VSD with LoRaD")
    p.add_argument("--pretrained_model_name_or_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="hub id or local diffusers folder; 'tiny' builds a tiny SD-shaped model offline")
    p.add_argument("--prompts", required=True, help="text file, one training prompt per line")
    p.add_argument("--output_dir", default="wadi-out")
    p.add_argument("--resolution", type=int, default=None, help="default: the model's own (512 for SD1.5)")
    # optimization (paper §4.1)
    p.add_argument("--train_batch_size", type=int, default=16, help="per process")
    p.add_argument("--max_train_steps", type=int, default=None, help="default: 2 epochs of the prompt file")
    p.add_argument("--learning_rate", type=float, default=1e-4, help="student")
    p.add_argument("--lr_schedule", choices=["constant", "linear"], default="constant", help="student's; linear: to 0")
    p.add_argument("--fake_learning_rate", type=float, default=1e-2)
    p.add_argument("--adapter", choices=["lorad", "lora", "dora", "full"], default="lorad", help="the student's")
    p.add_argument("--student_rank", type=int, default=256)
    p.add_argument("--fake_rank", type=int, default=32)
    p.add_argument("--guidance_scale", type=float, default=1.5, help="CFG on both teacher and fake score")
    p.add_argument("--fake_updates", type=int, default=1, help="fake-model steps per generator step (DMD2: 5)")
    p.add_argument("--fake_weighting", choices=["abar", "none"], default="abar", help="eq. 12's weight (fake_loss)")
    p.add_argument("--ema_decay", type=float, default=0.0, help="EMA of the student's trained tensors; 0 = off")
    p.add_argument("--regression_pairs", help="DMD's regression onto these pairs, a file (docs/remedies.md); off: VSD alone")
    p.add_argument("--regression_weight", type=float, help="its weight; default: 0.25 (DMD's)")
    # numerics and memory
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="default: bf16 on CUDA, no on CPU")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the three UNets (docs/benchmarks.md)")
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    p.add_argument("--validation_prompts", nargs="+", default=VALIDATION_PROMPTS)
    p.add_argument("--validation_steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("train_batch_size", "student_rank", "fake_rank", "fake_updates", "checkpointing_steps",
                 "validation_steps", "max_train_steps", "checkpoints_total_limit"):  # the last two may be None
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UserError(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {args.resolution}")
    if args.regression_weight is not None and not args.regression_pairs:
        raise UserError("--regression_weight needs --regression_pairs: it weights the regression onto those pairs")
    args.regression_weight = 0.25 if args.regression_weight is None else args.regression_weight
    for name in ("learning_rate", "fake_learning_rate", "guidance_scale", "regression_weight"):
        if not 0 <= getattr(args, name) < math.inf:  # argparse's float() takes nan and inf
            raise UserError(f"--{name} must be a finite number >= 0, got {getattr(args, name)}")
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if not -2**63 <= args.seed < 2**64:  # what torch.manual_seed takes
        raise UserError(f"--seed must fit in 64 bits, got {args.seed}")
    return args


def main(argv=None):
    from tqdm import tqdm
    run = setup(args := parse_args(argv))
    run.command = shlex.join(["python", "wadi.py", *(sys.argv[1:] if argv is None else argv)])  # for the model card
    start = load_checkpoint(run, run.resume) if run.resume else 0
    if start > run.max_steps:  # nothing to train, and the export would be named for the lower step
        raise UserError(f"{run.resume} is at step {start}, past --max_train_steps {run.max_steps}: give {start} or more")
    master, out, bad_in_a_row = run.rank == 0, args.output_dir, 0
    peak_memory_gib = lambda: (torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda"
                               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # CPU: peak RSS, in KiB
    if master:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        log_path = os.path.join(out, "log.jsonl")  # without the lines of redone steps and a line cut short (no "\n")
        with open(log_path) if os.path.exists(log_path) else contextlib.nullcontext([]) as log:
            kept = [line for line in log if line.endswith("\n") and json.loads(line)["step"] <= start]
        with open(log_path, "w") as log:
            log.writelines(kept)
        n_s, n_f = sum(p.numel() for p in run.student_params), sum(p.numel() for p in run.fake_params)
        print(f"wadi: {run.model_path} | {len(run.prompts)} prompts | student {n_s / 1e6:.2f}M, fake {n_f / 1e6:.2f}M "
              f"trainable | global batch {args.train_batch_size * run.world} on {run.world} x {run.device.type} | "
              f"{'fp32' if run.mixed_precision == 'no' else run.mixed_precision} | steps {start}..{run.max_steps}"
              + (f" (resumed {run.resume})" if run.resume else ""))
    for step in tqdm(range(start, run.max_steps), initial=start, total=run.max_steps, disable=not master):
        t0 = time.time()
        logs = train_step(run, step)
        # a non-finite loss or gradient skipped its update (on every rank alike); many in a row is a broken run
        ok = math.isfinite(logs["grad_norm_student"]) and math.isfinite(logs["grad_norm_fake"])
        bad_in_a_row = 0 if ok else bad_in_a_row + 1
        run.skipped += not ok
        if bad_in_a_row == MAX_BAD_STEPS:
            raise UserError(f"{MAX_BAD_STEPS} steps in a row with a non-finite loss or gradient (step {step + 1}); stopped. "
                            f"Last checkpoint: {(list_checkpoints(out) or ['none'])[-1]}")
        if master:
            dt = time.time() - t0
            logs.update(step=step + 1, lr=run.opt_s.param_groups[0]["lr"], fake_lr=run.opt_f.param_groups[0]["lr"],
                        sec_per_step=dt, img_per_sec=args.train_batch_size * run.world / dt,
                        peak_mem_gib=peak_memory_gib(), skipped=run.skipped)  # the lrs the optimizers used
            tqdm.write(f"step {step + 1}/{run.max_steps} | vsd {logs['loss_vsd']:.4g} | fake {logs['loss_fake']:.4g} | "
                       f"gnorm {logs['grad_norm_student']:.3g}/{logs['grad_norm_fake']:.3g} | lr {logs['lr']:.3g}/"
                       f"{logs['fake_lr']:g} | {dt:.2f} s/step | {logs['img_per_sec']:.1f} img/s | "
                       f"mem {logs['peak_mem_gib']:.2f} GiB | skipped {run.skipped}")
            with open(log_path, "a") as log:  # each step's line on disk as it is written; NaN -> null
                log.write(json.dumps({k: v if math.isfinite(v) else None for k, v in logs.items()}) + "\n")
            if (step + 1) % args.checkpointing_steps == 0 or step + 1 == run.max_steps:
                save_checkpoint(run, step + 1)
            if (step + 1) % args.validation_steps == 0 and step + 1 < run.max_steps:  # the last one: below
                validate(run, step + 1)
    if master:
        samples = validate(run, run.max_steps)
        pipeline, err = export(run, samples)
        print(f"wadi: done | samples {samples} | adapter {os.path.join(out, f'student_{args.adapter}.safetensors')} | "
              f"pipeline {pipeline} (one-step output vs trainer: {err:.1e} relative) | peak memory {peak_memory_gib():.2f} GiB")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        read_prompts((args := parse_args()).prompts), check_output_dir(args.output_dir)  # before the slow imports
        import diffusers
        import transformers
        from huggingface_hub.utils import logging as hub_logging
        hub_logging.set_verbosity_error()  # its retry notices while a hub id fails to resolve
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")  # diffusers 0.42 vs huggingface_hub 2
        for lib in (diffusers, transformers):  # their loading bars and notices would drown the training log
            lib.utils.logging.set_verbosity_error()
            lib.utils.logging.disable_progress_bar()
        main()
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"wadi: error: {e}", file=sys.stderr)
        sys.exit(2)
