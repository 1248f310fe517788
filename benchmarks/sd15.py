"""The real SD1.5 architecture: one WaDi step on the CPU (random weights), and the paper's recipe counted by plan.

    python bench.py sd15
"""
import argparse
import math
import resource
import time

import torch

import wadi
from benchmarks.plan import plan_count, plan_line
from benchmarks.sd import SD15, SD15_TEXT
from benchmarks.step import memory_run

def bench_sd15(args):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**SD15).requires_grad_(False)  # random weights, SD1.5's shapes
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    run = memory_run(unet, text_encoder.requires_grad_(False), 32, 1, 256, 32)  # 256 px, batch 1
    built = time.perf_counter() - t0
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        logs = wadi.train_step(run, step)
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"SD1.5 UNet (random weights), 256 px, batch 1, ranks 256/32, fp32 on {torch.get_num_threads()} CPU threads: "
          f"built in {built:.0f} s, step {' / '.join(f'{t:.1f}' for t in times)} s, peak RSS {rss:.1f} GiB, "
          f"losses finite: {all(math.isfinite(v) for v in logs.values())}")

    # the paper's recipe per GPU: 512 px, batch 16, bf16, gradient checkpointing, counted as `bench.py plan` does
    setting = ("sd15", 512, 16, "bf16", True, ())
    count = plan_count(*setting, between_steps=True)
    print(plan_line(count, *setting, args.gpu_tflops, args.mfu))
    hours = 21_900 * count["flops"] / (args.gpu_tflops * 1e12 * args.mfu) / 3600
    print(f"the paper's 21.9k steps on 8 GPUs: {hours:.1f} h at {args.gpu_tflops:.0f} TFLOP/s x {args.mfu:.0%}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py sd15", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--gpu_tflops", type=float, default=312, help="bf16 dense peak (A100 80GB: 312)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed share of the peak reached")
    bench_sd15(p.parse_args(argv))
