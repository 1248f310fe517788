"""One whole WaDi step: wadi.py's design against the authors' (three UNet copies, hooked LoRaD, four CFG calls).

    python bench.py step                       # tiny and mid UNets on the CPU
    python bench.py step --sizes sd15 --student_rank 256 --fake_rank 32 -- --gradient_checkpointing   # a GPU
"""
import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn

import wadi
from tiny import tiny_pipeline
from benchmarks.layer import authors_hook_design
from benchmarks.sd import SD15, SD15_TEXT

ROOT_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench.py")

# step: one whole WaDi step, our design against the authors'

STEP_SIZES = {  # name: UNet config (None = the tiny pipeline's own), latent side, batch per step
    "tiny": (None, 8, 16),
    "mid": (dict(block_out_channels=(128, 256, 512), layers_per_block=1, cross_attention_dim=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2), 32, 4),
    "sd15": ({k: v for k, v in SD15.items() if k != "sample_size"}, 64, 16),  # the paper's per-GPU step: for a GPU
}


def hook_lorad(unet, rank, layers):
    """The authors' adapter on a full copy of the UNet: every selected Linear keeps its own frozen weight and
    gets angles plus the forward hook of authors_hook_design (the matmul runs twice)."""
    unet = copy.deepcopy(unet)  # their design: each of the three networks is its own UNet copy
    unet.requires_grad_(False)
    include, exclude = layers["include"], layers.get("exclude", ())
    for name, linear in list(unet.named_modules()):  # the same layers as ours
        if type(linear) is not nn.Linear or not any(s in name for s in include) or any(s in name for s in exclude):
            continue
        fp32 = dict(device=linear.weight.device, dtype=torch.float32)
        ta = nn.Parameter(torch.zeros(linear.out_features, rank, **fp32))
        tb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, linear.in_features // 2, **fp32)))
        linear.register_parameter("theta_a", ta)
        linear.register_parameter("theta_b", tb)
        authors_hook_design(linear, ta, tb)
    return unet


def authors_guided_eps(unet, x_t, t, cond, uncond, scale):
    """wadi.guided_eps as the authors run it: cond and uncond in two separate UNet calls (four for both scores)."""
    eps_c, eps_u = unet(x_t, t, cond).sample.float(), unet(x_t, t, uncond).sample.float()
    return eps_u + scale * (eps_c - eps_u)


def authors_design(run):
    """Turn a wadi run into the authors' design, in place: three UNet copies with hooked LoRaD, their own
    optimizers. Their guided scores (four calls) are authors_guided_eps, patched in by the caller."""
    student_rank, fake_rank = run.args.student_rank, run.args.fake_rank
    run.student = hook_lorad(run.teacher, student_rank, wadi.STUDENT_LAYERS).train()
    run.fake = hook_lorad(run.teacher, fake_rank, wadi.FAKE_LAYERS).train()
    if run.args.gradient_checkpointing:  # in their script a no-op (models left in eval mode): given them here
        run.student.enable_gradient_checkpointing()
        run.fake.enable_gradient_checkpointing()
    run.student_params, run.fake_params = ([p for p in m.parameters() if p.requires_grad] for m in (run.student, run.fake))
    same = dict(betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, fused=True)  # our AdamW, on their parameters
    run.opt_s = torch.optim.AdamW(run.student_params, lr=run.args.learning_rate, **same)
    run.opt_f = torch.optim.AdamW(run.fake_params, lr=run.args.fake_learning_rate, **same)


def memory_run(unet, text_encoder, side, batch, student_rank, fake_rank, extra=()):
    """A wadi run (wadi.setup) on models built in memory, with the tiny pipeline's tokenizer, VAE, schedule, all
    moved where wadi.setup would load them: its device, in the training dtype (`extra`: more wadi.py flags)."""
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "prompts.txt"), "w") as f:
        f.write("a red cube\na blue ball\n")
    args = wadi.parse_args(["--prompts", f.name, "--output_dir", os.path.join(tmp, "out"), "--resolution", str(8 * side),
                            "--train_batch_size", str(batch), "--student_rank", str(student_rank),
                            "--fake_rank", str(fake_rank), *extra])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mp = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
    tok, _, vae, _, sched = wadi.load_pipeline_parts(tiny_pipeline(), device, dtype)
    return wadi.setup(args, parts=(tok, text_encoder.to(device, dtype), vae, unet.to(device, dtype), sched))


def step_run(size, design, student_rank, fake_rank, extra=()):
    """A wadi run on an SD-shaped UNet; design 'authors' swaps in their three-copy, hooked models."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    _, te, _, unet, _ = wadi.load_pipeline_parts(tiny_pipeline(), torch.device("cpu"), torch.float32)
    config, side, batch = STEP_SIZES[size]
    torch.manual_seed(0)
    if config:
        unet = UNet2DConditionModel(sample_size=side, **config).requires_grad_(False)
    if size == "sd15":  # its cross-attention reads 768-wide CLIP embeddings
        te = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).requires_grad_(False)
    run = memory_run(unet, te, side, batch, student_rank, fake_rank, extra)
    if design == "authors":
        authors_design(run)
    return run


def meta_flops(model, batch, side, train=False):
    """FLOPs of one UNet call (and its backward if `train`) on a meta-device model: counted, nothing computed."""
    from torch.utils.flop_counter import FlopCounterMode
    meta = dict(device="meta", dtype=next(model.parameters()).dtype)
    x, c = torch.randn(batch, 4, side, side, **meta), torch.randn(batch, 77, model.config.cross_attention_dim, **meta)
    with FlopCounterMode(display=False) as counter:
        y = model(x, torch.full((batch,), 999, device="meta"), c).sample
        if train:
            y.float().sum().backward()
    return counter.get_total_flops()


def step_flops(config, side, batch, student_rank, fake_rank):
    """FLOPs of one step, ours and the authors' design, counted on the meta device (no gradient checkpointing).
    The designs differ by the hooks' repeated F.linear in every adapted layer of 4 of the 8 UNet passes."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        hook_s, hook_f = (hook_lorad(unet, r, layers) for r, layers in
                          ((student_rank, wadi.STUDENT_LAYERS), (fake_rank, wadi.FAKE_LAYERS)))
    student, fake = wadi.share_base(unet, student_rank, wadi.STUDENT_LAYERS), wadi.share_base(unet, fake_rank, wadi.FAKE_LAYERS)
    ours = (meta_flops(student, batch, side, True) + meta_flops(unet, 2 * batch, side)  # CFG batched: 2 calls
            + meta_flops(fake, 2 * batch, side) + meta_flops(fake, batch, side, True))
    theirs = (meta_flops(hook_s, batch, side, True) + 2 * meta_flops(unet, batch, side)  # CFG: 4 calls
              + 2 * meta_flops(hook_f, batch, side) + meta_flops(hook_f, batch, side, True))
    return ours, theirs


def step_worker(args):
    """One (size, design) in a fresh process, so its peak memory is its own (RSS on CPU, allocated on a GPU);
    prints one JSON line."""
    size, design = args.worker
    run = step_run(size, design, args.student_rank, args.fake_rank, args.wadi_args)
    if design == "authors":
        wadi.guided_eps = authors_guided_eps
    models = [run.teacher, run.student, run.fake]
    unique = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in models for p in m.parameters()}
    cuda = run.device.type == "cuda"
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        wadi.train_step(run, step)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(sec=statistics.median(times[args.warmup:]), param_bytes=sum(unique.values()), peak=peak,
                          device=torch.cuda.get_device_name() if cuda else "CPU")))


def bench_step(args):
    """Both designs on each size, alternating processes over `rounds` so machine noise hits both alike."""
    from diffusers import UNet2DConditionModel
    print(f"wadi.py flags: {' '.join(args.wadi_args) or '(defaults)'}")
    print("| UNet | latents x batch | design | s/step | speed-up | GFLOP/step (ratio) | peak memory | unique parameter bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        res = {"ours": [], "authors": []}
        for _ in range(args.rounds):
            for design in res:
                cmd = [sys.executable, ROOT_BENCH, "step", "--worker", size, design,
                       "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--student_rank", str(args.student_rank), "--fake_rank", str(args.fake_rank), "--", *args.wadi_args]
                res[design].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
        config, side, batch = STEP_SIZES[size]
        config = dict(sample_size=side, **config) if config else UNet2DConditionModel.load_config(tiny_pipeline(), subfolder="unet")
        ours, theirs = step_flops(config, side, batch, args.student_rank, args.fake_rank)
        flops = {"ours": ours, "authors": theirs}
        sec = {d: statistics.median(r["sec"] for r in rs) for d, rs in res.items()}
        for d, rs in res.items():
            print(f"| {size} | 4x{side}x{side} x {batch} | {d} | {sec[d]:.3f} | {sec['authors'] / sec[d]:.2f}x "
                  f"| {flops[d] / 1e9:.1f} ({theirs / flops[d]:.3f}x) "
                  f"| {max(r['peak'] for r in rs) / 2**20:.0f} MiB ({rs[0]['device']}) | {rs[0]['param_bytes'] / 2**20:.1f} MiB "
                  f"({rs[0]['param_bytes'] / res['ours'][0]['param_bytes']:.2f}x) |")
    ours, theirs = step_flops(SD15, 64, 16, 256, 32)
    print(f"\nThe paper's setting, counted on the meta device (SD1.5, 512 px, batch 16, ranks 256/32): ours "
          f"{ours / 1e12:.0f} TFLOP/step, the authors' design {theirs / 1e12:.0f} ({theirs / ours:.3f}x)")


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=list(STEP_SIZES),
                   help="sd15: the paper's per-GPU step (512 px, batch 16), for a GPU")
    p.add_argument("--rounds", type=int, default=2, help="processes per design, alternating")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--student_rank", type=int, default=16)
    p.add_argument("--fake_rank", type=int, default=4)
    p.add_argument("--worker", nargs=2, metavar=("SIZE", "DESIGN"), help=argparse.SUPPRESS)  # one run, own process
    p.add_argument("wadi_args", nargs="*", help="wadi.py flags for both designs, after --")
    args = p.parse_args(argv)
    (step_worker if args.worker else bench_step)(args)
