"""
Benchmarks, on CPU, fp32 (not tests: each prints a table for the README).

    python bench.py layer   # one adapted layer: time and saved memory, full fine-tuning vs LoRaD three ways
    python bench.py step    # one WaDi step: wadi.py's design vs the authors' (three UNets, hooks, 4 CFG calls)
    python bench.py sd15    # one step of the real SD1.5 architecture on CPU, and the paper's recipe on paper
    python bench.py toy     # distill a toy teacher with wadi.py and score it against its known modes
"""
import argparse
import contextlib
import copy
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import lorad
import wadi

# -----------------------------------------------------------------------------
# the real architectures, from their config.json files (non-default fields only): the tests and benchmarks build
# them on the meta device, on fake tensors or with random weights, nothing to download

SD15 = dict(  # stable-diffusion-v1-5 unet/: 859.52M parameters
    sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
SD21 = dict(SD15, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True)  # stable-diffusion-2-1 unet/ (768 px): 865.91M; -base is sample_size 64
SD15_TEXT = dict(  # CLIP ViT-L/14's text tower (CLIPTextConfig): 123.06M
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
SD21_TEXT = dict(SD15_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 projection_dim=512, hidden_act="gelu")  # OpenCLIP ViT-H/14's text tower, 23 of 24 layers: 340.39M
SD_VAE = dict(  # vae/ of both (AutoencoderKL): 83.65M
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD_SCHEDULE = dict(  # scheduler/ of SD1.5 and SD2.1-base (epsilon prediction), as a DDPMScheduler
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)

# -----------------------------------------------------------------------------
# shared helpers


def round_robin_times(fns, repeats, min_seconds=0.0, warmup=1):
    """Seconds per call of each fn, one list entry per round; at least `repeats` rounds and, so that
    cheap cases get more samples, at least `min_seconds` of them. Calls go round-robin, so machine noise
    (on a shared host the speed can halve for seconds at a time) hits every variant of a round alike."""
    times = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    start, rounds = time.perf_counter(), 0
    while rounds < repeats or time.perf_counter() - start < min_seconds:
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        rounds += 1
    return times


def ratio(a, b):
    """Median over rounds of a / b: compares variants only against what ran right beside them."""
    return statistics.median(x / y for x, y in zip(a, b))


def saved_bytes(fn, params):
    """Bytes that autograd keeps alive for backward during fn(): tensors saved by the graph, minus the
    parameters (they are held anyway), each storage counted once (views of one buffer cost it once)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}  # holding the storages stops a freed buffer's address being reused and miscounted

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()  # keep the graph alive until every saved tensor went through pack
    del out
    return sum(s.nbytes() for s in seen.values())


# -----------------------------------------------------------------------------
# layer: one Linear at SD1.5 shapes, full fine-tuning vs LoRaD three ways


def authors_hook_design(linear, theta_a, theta_b):
    """The authors' implementation, written afresh: the frozen Linear runs as usual, then a forward hook
    rotates its weight with plain autograd, elementwise on strided even/odd views as they do, and
    re-runs F.linear; the original output is discarded. (Their wrap of theta into [-pi, pi) is
    left out: a no-op for cos/sin that would only add time to this variant.)"""

    def hook(module, inputs, output):
        theta = theta_a @ theta_b
        cos, sin = torch.cos(theta), torch.sin(theta)
        w_even, w_odd = module.weight[:, 0::2], module.weight[:, 1::2]
        w_rot = torch.stack([cos * w_even - sin * w_odd, sin * w_even + cos * w_odd], dim=-1).flatten(1)
        return F.linear(inputs[0], w_rot, module.bias)

    linear.register_forward_hook(hook)
    return linear


def bench_layer(args):
    r = 256
    # SD1.5 layers with a 16-image batch at 512 px: 16 x 16x16 = 4096 tokens in the 1280-channel blocks
    # (applied to every width for comparability); then the 8x8 blocks' 1024 tokens, where the theta
    # products weigh 4x more.
    rows = [(320, 320, args.tokens), (640, 640, args.tokens), (1280, 1280, args.tokens),
            (5120, 1280, args.tokens), (1280, 1280, 1024)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, rank {r}, "
          f"medians over >= {args.repeats} round-robin rounds (ratios: median of per-round ratios); "
          f"load average {os.getloadavg()[0]:.1f} at start (other busy processes distort small shapes most)")
    print("| in -> out | N | Linear (trainable) | plain autograd | fast path | hook design | floor "
          "| extra saved, theta-sizes: plain / fast / hook | fwd hook / fast |")
    print("|---|---|---|---|---|---|---|---|---|")
    for in_f, out_f, n in rows:
        torch.manual_seed(0)
        full = nn.Linear(in_f, out_f)  # full fine-tuning: the floor for anything that needs dL/dW
        base = nn.Linear(in_f, out_f)
        fast = lorad.LoRaDLinear(base, r)  # freezes base and holds its weight and bias, no copy
        nn.init.normal_(fast.theta_a, std=1e-3)  # non-zero angles, as after a few steps
        w, b, ta, tb = fast.weight, fast.bias, fast.theta_a, fast.theta_b  # all LoRaD variants share them
        hooked = authors_hook_design(base, ta, tb)
        variants = {
            "full": full,
            "plain": lambda x: F.linear(x, lorad.rotate(w, ta @ tb), b),
            "fast": fast,
            "hook": hooked,
        }
        params = [*full.parameters(), w, b, ta, tb]
        x = torch.randn(n, in_f, requires_grad=True)  # requires grad, as inside a network
        dy = torch.randn(n, out_f)

        def train_step(f):
            def step():
                x.grad = None
                for p in params:
                    p.grad = None  # as optimizer.zero_grad(set_to_none=True)
                f(x).backward(dy)
            return step

        def forward(f):
            return lambda: f(x)  # a training forward: builds the graph, then drops it

        t = round_robin_times({**{k: train_step(f) for k, f in variants.items()},
                               "fast fwd": forward(fast), "hook fwd": forward(hooked)},
                              args.repeats, min_seconds=3)
        theta_size = out_f * in_f // 2 * 4  # one fp32 (out, in/2) tensor, e.g. theta itself
        mem = {k: saved_bytes(lambda: f(x), params) for k, f in variants.items()}
        extra = [(mem[k] - mem["full"]) / theta_size for k in ("plain", "fast", "hook")]
        floor = 1 + 2 * r / (3 * n)  # theta products (8*out*r*in/2 FLOPs) over 3 GEMMs (3*2*N*out*in)
        ms = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        cells = [f"{ms[k]:.0f} ms ({ratio(t[k], t['full']):.2f}x)" for k in ("plain", "fast", "hook")]
        print(f"| {in_f} -> {out_f} | {n} | {ms['full']:.0f} ms | {' | '.join(cells)} | {floor:.3f}x "
              f"| {extra[0]:.2f} / {extra[1]:.2f} / {extra[2]:.2f} | {ratio(t['hook fwd'], t['fast fwd']):.2f}x |")


# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# step: one whole WaDi step, our design against the authors'

STEP_SIZES = {  # name: UNet config (None = the tiny pipeline's own), latent side, batch per step
    "tiny": (None, 8, 16),
    "mid": (dict(block_out_channels=(128, 256, 512), layers_per_block=1, cross_attention_dim=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2), 32, 4),
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
        ta = nn.Parameter(torch.zeros(linear.out_features, rank))
        tb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, linear.in_features // 2)))
        linear.register_parameter("theta_a", ta)
        linear.register_parameter("theta_b", tb)
        authors_hook_design(linear, ta, tb)
    return unet


def authors_vsd_loss(run, x0, cond, uncond, t, noise):
    """wadi.vsd_loss as the authors run it: four separate UNet calls for the two guided scores."""
    a = run.abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0.detach() + (1 - a).sqrt() * noise
    s = run.args.guidance_scale
    with torch.no_grad():
        eps = [unet(x_t, t, c).sample.float() for unet in (run.teacher, run.fake) for c in (cond, uncond)]
    grad = torch.nan_to_num((1 - a) * ((eps[1] + s * (eps[0] - eps[1])) - (eps[3] + s * (eps[2] - eps[3]))))
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def memory_run(unet, text_encoder, side, batch, student_rank, fake_rank):
    """A wadi run (wadi.setup) on models built in memory, with the tiny pipeline's tokenizer, VAE, schedule."""
    tok, _, vae, _, sched = wadi.load_pipeline_parts(wadi.resolve_model("tiny"), torch.device("cpu"), torch.float32)
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "prompts.txt"), "w") as f:
        f.write("a red cube\na blue ball\n")
    args = wadi.parse_args(["--prompts", f.name, "--output_dir", os.path.join(tmp, "out"), "--resolution", str(8 * side),
                            "--train_batch_size", str(batch), "--student_rank", str(student_rank),
                            "--fake_rank", str(fake_rank)])
    return wadi.setup(args, parts=(tok, text_encoder, vae, unet, sched))


def step_run(size, design, student_rank, fake_rank):
    """A wadi run on an SD-shaped UNet; design 'authors' swaps in their three-copy, hooked models."""
    from diffusers import UNet2DConditionModel
    _, te, _, unet, _ = wadi.load_pipeline_parts(wadi.resolve_model("tiny"), torch.device("cpu"), torch.float32)
    config, side, batch = STEP_SIZES[size]
    if config:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=side, **config).requires_grad_(False)
    run = memory_run(unet, te, side, batch, student_rank, fake_rank)
    if design == "authors":
        run.student = hook_lorad(unet, student_rank, wadi.STUDENT_LAYERS).train()
        run.fake = hook_lorad(unet, fake_rank, wadi.FAKE_LAYERS).train()
        run.student_params, run.fake_params = wadi.adapters(run.student), wadi.adapters(run.fake)
        run.opt_s = torch.optim.AdamW(run.student_params, lr=run.args.learning_rate, weight_decay=0.0)
        run.opt_f = torch.optim.AdamW(run.fake_params, lr=run.args.fake_learning_rate, weight_decay=0.0)
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
    """One (size, design) in a fresh process, so its peak RSS is its own; prints one JSON line."""
    run = step_run(args.size, args.design, args.student_rank, args.fake_rank)
    if args.design == "authors":
        wadi.vsd_loss = authors_vsd_loss
    models = [run.teacher, run.student, run.fake]
    unique = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in models for p in m.parameters()}
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        wadi.train_step(run, step)
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(sec=statistics.median(times[args.warmup:]), param_bytes=sum(unique.values()),
                          rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))


def bench_step(args):
    """Both designs on each size, alternating processes over `rounds` so machine noise hits both alike."""
    from diffusers import UNet2DConditionModel
    print("| UNet | latents x batch | design | s/step | speed-up | GFLOP/step (ratio) | peak RSS | unique parameter bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        res = {"ours": [], "authors": []}
        for _ in range(args.rounds):
            for design in res:
                cmd = [sys.executable, __file__, "step-worker", "--size", size, "--design", design,
                       "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--student_rank", str(args.student_rank), "--fake_rank", str(args.fake_rank)]
                res[design].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
        config, side, batch = STEP_SIZES[size]
        config = dict(sample_size=side, **config) if config else UNet2DConditionModel.load_config(wadi.resolve_model("tiny"), subfolder="unet")
        ours, theirs = step_flops(config, side, batch, args.student_rank, args.fake_rank)
        flops = {"ours": ours, "authors": theirs}
        sec = {d: statistics.median(r["sec"] for r in rs) for d, rs in res.items()}
        for d, rs in res.items():
            print(f"| {size} | 4x{side}x{side} x {batch} | {d} | {sec[d]:.3f} | {sec['authors'] / sec[d]:.2f}x "
                  f"| {flops[d] / 1e9:.1f} ({theirs / flops[d]:.3f}x) "
                  f"| {max(r['rss'] for r in rs) / 2**20:.0f} MiB | {rs[0]['param_bytes'] / 2**20:.1f} MiB "
                  f"({rs[0]['param_bytes'] / res['ours'][0]['param_bytes']:.2f}x) |")
    ours, theirs = step_flops(SD15, 64, 16, 256, 32)
    print(f"\nThe paper's setting, counted on the meta device (SD1.5, 512 px, batch 16, ranks 256/32): ours "
          f"{ours / 1e12:.0f} TFLOP/step, the authors' design {theirs / 1e12:.0f} ({theirs / ours:.3f}x)")


# -----------------------------------------------------------------------------
# sd15: the real SD1.5 architecture, one step on CPU; and the paper's recipe on a GPU, on paper


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

    # the paper's recipe per GPU: 512 px (64x64 latents), batch 16, bf16, counted on the meta device (no memory)
    B = 16
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15).to(torch.bfloat16)
    student = wadi.share_base(unet, 256, wadi.STUDENT_LAYERS)
    fake = wadi.share_base(unet, 32, wadi.FAKE_LAYERS)

    fwd = meta_flops(unet, B, 64)
    guided = meta_flops(unet, 2 * B, 64)  # cond + uncond in one call
    train_s = meta_flops(student, B, 64, train=True)
    train_f = meta_flops(fake, B, 64, train=True)
    step = train_s + 2 * guided + train_f + 2 * fwd  # + 2 forwards recomputed by gradient checkpointing
    n_s, n_f = sum(p.numel() for p in wadi.adapters(student)), sum(p.numel() for p in wadi.adapters(fake))
    static = sum(p.numel() for p in unet.parameters()) * 2 + (n_s + n_f) * 4 * 4  # bf16 base; fp32 angles+grad+Adam
    tflops = args.gpu_tflops * args.mfu
    print(f"per GPU and step (batch {B}, 512 px): one UNet forward {fwd / 1e12:.1f} TFLOP; student fwd+bwd "
          f"{train_s / 1e12:.1f}, 2 guided calls 2 x {guided / 1e12:.1f}, fake fwd+bwd {train_f / 1e12:.1f}, "
          f"checkpointing recompute {2 * fwd / 1e12:.1f}: {step / 1e12:.0f} TFLOP/step")
    print(f"at {args.gpu_tflops:.0f} TFLOP/s bf16 peak x {args.mfu:.0%} utilisation: {step / 1e12 / tflops:.2f} s/step, "
          f"{21_900 * step / 1e12 / tflops / 3600:.1f} h for the paper's 21.9k steps on 8 GPUs")
    print(f"memory: UNet base once in bf16 {sum(p.numel() for p in unet.parameters()) * 2 / 2**30:.2f} GiB, angles "
          f"{(n_s + n_f) / 1e6:.1f}M in fp32 with grads and AdamW {(n_s + n_f) * 16 / 2**30:.2f} GiB (static "
          f"{static / 2**30:.1f} GiB + text encoder and VAE ~0.4 GiB) + activations")


# -----------------------------------------------------------------------------
# toy: does wadi.py turn a multi-step teacher into a one-step generator? A conditional distribution whose modes
# are known exactly, a tiny teacher trained on it, wadi.py's own command line, scores in latent space.

TOY_PROMPTS = ["a red circle", "a green square", "a blue star", "a yellow moon"]
TOY_MODES, TOY_NOISE = 3, 0.15  # modes per prompt; std of the data around each mode


def toy_modes(seed):
    """(prompts, modes, 4, 8, 8) latents: each mode a Gaussian bump at its own place on a 4x4 lattice, with a
    +-1 channel signature per prompt, scaled so the modes have unit variance per element, as SD's latents have
    (the VAE's scaling_factor): the noise schedule's signal-to-noise ratios are meant for that scale.
    Modes are >= 18 apart; a sample of the data lies ~2.4 from its mode."""
    g = torch.Generator().manual_seed(seed)
    P, M = len(TOY_PROMPTS), TOY_MODES
    lattice = torch.tensor([(y, x) for y in (1, 3, 5, 7) for x in (1, 3, 5, 7)], dtype=torch.float32)
    pos = lattice[torch.randperm(16, generator=g)[:P * M]].view(P, M, 2, 1, 1)
    sign = torch.randint(0, 2, (P, 1, 4, 1, 1), generator=g) * 2.0 - 1
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    bump = torch.exp(-((yy - pos[:, :, 0]) ** 2 + (xx - pos[:, :, 1]) ** 2) / (2 * 0.8 ** 2))
    modes = sign * bump[:, :, None]
    return modes / modes.square().mean().sqrt()


def toy_data(modes, prompt, generator):
    """Samples of the data for the given prompt indices."""
    m = torch.randint(modes.shape[1], prompt.shape, generator=generator)
    return modes[prompt, m] + TOY_NOISE * torch.randn(len(prompt), *modes.shape[2:], generator=generator)


def train_toy_teacher(path, modes, steps, batch=32):
    """The tiny pipeline's UNet trained from scratch with eq. (1) and 10% empty prompts (for CFG)."""
    wadi.build_tiny_pipeline(path)
    tok, te, vae, unet, sched = wadi.load_pipeline_parts(path, torch.device("cpu"), torch.float32)
    run = argparse.Namespace(tokenizer=tok, text_encoder=te, device=torch.device("cpu"), autocast=contextlib.nullcontext())
    cond, null = wadi.encode(run, TOY_PROMPTS), wadi.encode(run, [""])
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)  # to 0: a precise final model
    g, abar = torch.Generator().manual_seed(0), sched.alphas_cumprod
    for step in range(steps):
        p = torch.randint(len(TOY_PROMPTS), (batch,), generator=g)
        x0, noise, t = toy_data(modes, p, g), torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        c = torch.where((torch.rand(batch, generator=g) < 0.1).view(-1, 1, 1), null, cond[p])
        loss = F.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, c).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        if step % 500 == 0:
            print(f"teacher step {step}/{steps} | loss {loss.item():.4f}", flush=True)
    unet.save_pretrained(os.path.join(path, "unet"))


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + Tr(Ca + Cb - 2 (Ca^1/2 Cb Ca^1/2)^1/2), in fp64."""
    a, b = a.double(), b.double()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    e, v = torch.linalg.eigh(ca)
    root = v @ torch.diag(e.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root @ cb @ root).clamp(min=0).sqrt().sum()
    return ((a.mean(0) - b.mean(0)).square().sum() + ca.trace() + cb.trace() - 2 * cross).item()


@torch.no_grad()
def toy_samples(pipe, steps, guidance, n):
    """n latents per prompt from a stock diffusers pipeline, fixed noise: (prompts, n, 4, 8, 8)."""
    pipe.set_progress_bar_config(disable=True)
    return torch.stack([pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                             latents=torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1000 + p))).images
                        for p, prompt in enumerate(TOY_PROMPTS)])


def toy_tau(modes):
    """A third of the distance between the two closest modes: a sample nearer than this is on a mode."""
    centers = modes.flatten(2).flatten(0, 1)
    gaps = torch.cdist(centers, centers)
    return (gaps[gaps > 0].min() / 3).item()


def toy_scores(samples, modes):
    """precision: share of samples within tau of some mode (tau = a third of the closest two modes' distance);
    coverage: share of each prompt's modes that a precise sample of that prompt hits; adherence: share of
    samples whose nearest mode is one of the asked prompt's; dist: mean distance to the nearest mode, and `off`, the
    part of it orthogonal to the span of all modes (noise in directions where the data has none); FD to data."""
    P, n = samples.shape[:2]
    x, centers = samples.flatten(2).flatten(0, 1), modes.flatten(2).flatten(0, 1)
    tau = toy_tau(modes)
    dist, nearest = torch.cdist(x, centers).min(1)
    asked = torch.arange(P).repeat_interleave(n)
    right_prompt = nearest // modes.shape[1] == asked
    hit = torch.zeros(len(centers), dtype=torch.bool)
    hit[nearest[(dist < tau) & right_prompt]] = True
    err, basis = x - centers[nearest], torch.linalg.qr(centers.T).Q
    data = toy_data(modes, asked, torch.Generator().manual_seed(7)).flatten(1)
    return dict(precision=(dist < tau).float().mean().item(), coverage=hit.float().mean().item(),
                adherence=right_prompt.float().mean().item(), dist=dist.mean().item(),
                off=(err - err @ basis @ basis.T).norm(dim=1).mean().item(), fd=frechet_distance(x, data))


def line_plot(path, xs, series, levels, title):
    """A small PNG line plot with Pillow alone: one coloured line per series, a dashed line per level."""
    from PIL import Image, ImageDraw
    W, H, pad = 640, 360, 40
    top = 1.1 * max(max(max(ys) for ys in series.values()), *levels.values())
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    X = lambda x: pad + (W - 2 * pad) * x / max(xs)
    Y = lambda y: H - pad - (H - 2 * pad) * y / top
    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    for y in (0, top / 2, top):
        d.text((5, Y(y) - 5), f"{y:.1f}", fill="black")
    d.text((W // 2 - 40, H - pad + 10), f"training step (0..{max(xs)})", fill="black")
    d.text((pad, 10), title, fill="black")
    colours = iter(["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"])
    for i, (name, ys) in enumerate([*series.items(), *levels.items()]):
        c = next(colours)
        if name in series:
            d.line([(X(x), Y(y)) for x, y in zip(xs, ys)], fill=c, width=2)
        else:
            for x0 in range(pad, W - pad, 12):
                d.line([(x0, Y(ys)), (x0 + 6, Y(ys))], fill=c, width=2)
        d.text((W - pad - 260, pad + 8 + 14 * i), name, fill=c)
    img.save(path)


def bench_toy(args):
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    out = os.path.join(args.out, f"toy-seed{args.seed}")
    os.makedirs(out, exist_ok=True)
    modes, teacher = toy_modes(args.seed), os.path.join(out, "teacher")
    if not os.path.isdir(teacher):  # trained once, then cached
        t0 = time.time()
        shutil.rmtree(teacher + ".tmp", ignore_errors=True)
        train_toy_teacher(teacher + ".tmp", modes, args.teacher_steps)
        os.rename(teacher + ".tmp", teacher)
        print(f"teacher trained in {(time.time() - t0) / 60:.1f} min")
    # distillation: wadi.py's own command line, the paper's recipe with ranks and batch scaled down
    prompts, student = os.path.join(out, "prompts.txt"), os.path.join(out, "wadi")
    with open(prompts, "w") as f:
        f.write("\n".join(TOY_PROMPTS) + "\n")
    S = args.steps
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "wadi.py"),
           "--pretrained_model_name_or_path", teacher, "--prompts", prompts, "--validation_prompts", *TOY_PROMPTS,
           "--output_dir", student, "--train_batch_size", "16", "--student_rank", "16", "--fake_rank", "4",
           "--max_train_steps", str(S), "--checkpointing_steps", str(max(1, S // 10)), "--validation_steps", str(S),
           *args.wadi_args]
    done = os.path.join(out, "wadi.json")  # the finished run's command and wall time: rerun only what changed
    if not os.path.exists(done) or json.load(open(done))["cmd"] != cmd[1:]:
        print(" ".join(cmd[1:]))
        shutil.rmtree(student, ignore_errors=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        json.dump(dict(cmd=cmd[1:], minutes=(time.time() - t0) / 60), open(done, "w"))
    minutes = json.load(open(done))["minutes"]
    # scores, every sample through a stock diffusers pipeline
    pipe = StableDiffusionPipeline.from_pretrained(teacher, low_cpu_mem_usage=False)
    config, n = pipe.scheduler.config, args.samples
    one_step = DDPMScheduler.from_config(config, timestep_spacing="trailing")  # as wadi.py exports
    rows = {}
    pipe.scheduler = one_step
    rows["teacher, 1 step"] = toy_scores(toy_samples(pipe, 1, 0, n), modes)
    pipe.scheduler = DDIMScheduler.from_config(config)
    rows["teacher, 25 DDIM steps, no CFG"] = toy_scores(toy_samples(pipe, 25, 1.0, n), modes)
    rows["teacher, 25 DDIM steps, CFG 1.5"] = toy_scores(toy_samples(pipe, 25, 1.5, n), modes)
    exported = StableDiffusionPipeline.from_pretrained(os.path.join(student, "pipeline"), low_cpu_mem_usage=False)
    rows[f"wadi student, 1 step ({S} steps, {minutes:.1f} min)"] = toy_scores(toy_samples(exported, 1, 0, n), modes)
    # the curve: every checkpoint's student, merged into the teacher's UNet
    curve = {0: rows["teacher, 1 step"]}
    pipe.scheduler = one_step
    for ckpt in wadi.list_checkpoints(student):
        unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet", low_cpu_mem_usage=False)
        lorad.add_lorad(unet, 16, **wadi.STUDENT_LAYERS)
        lorad.load_lorad(unet, load_file(os.path.join(ckpt, "student_lorad.safetensors")))
        lorad.merge_lorad(unet)
        pipe.unet = unet
        curve[int(ckpt.rsplit("-", 1)[1])] = toy_scores(toy_samples(pipe, 1, 0, n), modes)
    print(f"| {n} samples per prompt | precision | coverage | adherence | mean distance to nearest mode "
          f"(tau = {toy_tau(modes):.2f}) | its part off the modes' span | FD to data |")
    print("|---|---|---|---|---|---|---|")
    for name, s in rows.items():
        print(f"| {name} | {s['precision']:.2f} | {s['coverage']:.2f} | {s['adherence']:.2f} | {s['dist']:.2f} "
              f"| {s['off']:.2f} | {s['fd']:.1f} |")
    print("\nstudent over training:", " ".join(f"{k}: {v['precision']:.2f}/{v['coverage']:.2f}/{v['adherence']:.2f}"
                                                for k, v in curve.items()), "(precision/coverage/adherence)")
    plot = os.path.join(out, "curve.png")
    line_plot(plot, list(curve), {"student, 1 step": [v["dist"] for v in curve.values()],
                                  "its part off the modes' span": [v["off"] for v in curve.values()]},
              {"teacher, 25 steps, CFG 1.5": rows["teacher, 25 DDIM steps, CFG 1.5"]["dist"],
               "precision threshold tau": toy_tau(modes)},
              "mean distance of a sample to its nearest mode")
    print(f"plot: {plot}")


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    import diffusers
    import transformers
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("layer", help="one Linear at SD1.5 shapes: full fine-tuning vs LoRaD variants")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per layer call (batch x positions)")
    p.add_argument("--repeats", type=int, default=5, help="minimum timed rounds per shape (small shapes run more)")
    p = sub.add_parser("step", help="one WaDi step: wadi.py's design vs the authors'")
    p.add_argument("--sizes", nargs="+", default=list(STEP_SIZES), choices=list(STEP_SIZES))
    p.add_argument("--rounds", type=int, default=2, help="processes per design, alternating")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--student_rank", type=int, default=16)
    p.add_argument("--fake_rank", type=int, default=4)
    p = sub.add_parser("step-worker", help=argparse.SUPPRESS)  # one (size, design) of `step`, in its own process
    p.add_argument("--size", choices=list(STEP_SIZES))
    p.add_argument("--design", choices=["ours", "authors"])
    for name, default in (("--steps", 5), ("--warmup", 2), ("--student_rank", 16), ("--fake_rank", 4)):
        p.add_argument(name, type=int, default=default)
    p = sub.add_parser("sd15", help="one step of the real SD1.5 architecture on CPU; the paper's recipe on paper")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--gpu_tflops", type=float, default=312, help="bf16 dense peak (A100 80GB: 312)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed share of the peak reached")
    p = sub.add_parser("toy", help="distill a toy teacher with wadi.py and score it against the known modes")
    p.add_argument("--seed", type=int, default=0, help="which toy (modes); the teacher is trained once per seed")
    p.add_argument("--teacher_steps", type=int, default=2500)
    p.add_argument("--steps", type=int, default=4000, help="wadi.py steps (~27 CPU-minutes)")
    p.add_argument("--samples", type=int, default=64, help="per prompt")
    p.add_argument("--out", default="bench-out")
    p.add_argument("wadi_args", nargs="*", help="more wadi.py flags, after --")
    args = parser.parse_args()
    {"layer": bench_layer, "step": bench_step, "step-worker": step_worker, "sd15": bench_sd15, "toy": bench_toy
     }[args.command](args)
