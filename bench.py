"""
Benchmarks, run on the CPU unless a GPU is there (not tests: each prints a table or a line for the README).

    python bench.py layer   # one adapted layer: time and saved memory, full fine-tuning vs LoRaD three ways
    python bench.py step    # one WaDi step: wadi.py's design vs the authors' (three UNets, hooks, 4 CFG calls)
                            #   on a GPU: --sizes sd15 --student_rank 256 --fake_rank 32 -- --gradient_checkpointing
    python bench.py plan    # GPU memory and time per step, counted from wadi's train_step on fake tensors
    python bench.py sd15    # one step of the real SD1.5 architecture on CPU, and the paper's recipe counted by plan
    python bench.py toy     # distill a toy teacher with wadi.py and score it against its known modes
"""
import argparse
import collections
import contextlib
import copy
import functools
import gc
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
import weakref
from unittest import mock

import numpy
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

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


def authors_vsd_loss(run, x0, cond, uncond, t, noise):
    """wadi.vsd_loss as the authors run it: four separate UNet calls for the two guided scores."""
    a = run.abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0.detach() + (1 - a).sqrt() * noise
    s = run.args.guidance_scale
    with torch.no_grad(), run.autocast:
        eps = [unet(x_t, t, c).sample.float() for unet in (run.teacher, run.fake) for c in (cond, uncond)]
    grad = torch.nan_to_num((1 - a) * ((eps[1] + s * (eps[0] - eps[1])) - (eps[3] + s * (eps[2] - eps[3]))))
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


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
    tok, _, vae, _, sched = wadi.load_pipeline_parts(wadi.resolve_model("tiny"), device, dtype)
    return wadi.setup(args, parts=(tok, text_encoder.to(device, dtype), vae, unet.to(device, dtype), sched))


def step_run(size, design, student_rank, fake_rank, extra=()):
    """A wadi run on an SD-shaped UNet; design 'authors' swaps in their three-copy, hooked models."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    _, te, _, unet, _ = wadi.load_pipeline_parts(wadi.resolve_model("tiny"), torch.device("cpu"), torch.float32)
    config, side, batch = STEP_SIZES[size]
    torch.manual_seed(0)
    if config:
        unet = UNet2DConditionModel(sample_size=side, **config).requires_grad_(False)
    if size == "sd15":  # its cross-attention reads 768-wide CLIP embeddings
        te = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).requires_grad_(False)
    run = memory_run(unet, te, side, batch, student_rank, fake_rank, extra)
    if design == "authors":
        run.student = hook_lorad(run.teacher, student_rank, wadi.STUDENT_LAYERS).train()
        run.fake = hook_lorad(run.teacher, fake_rank, wadi.FAKE_LAYERS).train()
        if run.args.gradient_checkpointing:  # in their script a no-op (models left in eval mode): given them here
            run.student.enable_gradient_checkpointing()
            run.fake.enable_gradient_checkpointing()
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
    """One (size, design) in a fresh process, so its peak memory is its own (RSS on CPU, allocated on a GPU);
    prints one JSON line."""
    run = step_run(args.size, args.design, args.student_rank, args.fake_rank, args.wadi_args)
    if args.design == "authors":
        wadi.vsd_loss = authors_vsd_loss
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
                cmd = [sys.executable, __file__, "step-worker", "--size", size, "--design", design,
                       "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--student_rank", str(args.student_rank), "--fake_rank", str(args.fake_rank), "--", *args.wadi_args]
                res[design].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
        config, side, batch = STEP_SIZES[size]
        config = dict(sample_size=side, **config) if config else UNet2DConditionModel.load_config(wadi.resolve_model("tiny"), subfolder="unet")
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


# -----------------------------------------------------------------------------
# plan: how much GPU memory and time a run needs, counted from wadi's own setup and train_step. The models are built
# on fake tensors (torch's FakeTensorMode: shapes, dtypes and storages, but no memory and no values), the step runs
# on them, and every tensor storage is counted from the op that makes it until its last reference goes.

PLAN_MODELS = {  # name: (label, UNet, text tower); both at 512 px, with SD_VAE and SD_SCHEDULE
    "sd15": ("SD1.5", SD15, SD15_TEXT),
    "sd21-base": ("SD2.1-base", dict(SD21, sample_size=64), SD21_TEXT),
}
CARDS = {"24 GB": 23.6, "40 GB": 39.4, "80 GB": 79.1}  # GiB that torch reports: RTX 4090, A100 40GB, A100/H100 80GB
HEADROOM, CUDA_CONTEXT = 0.10, 0.5  # fits: count x 1.10 (allocator fragmentation) + 0.5 GiB (CUDA context) <= card
PLAN_BATCHES = (1, 2, 4, 8, 16)  # per GPU
CATEGORIES = ("weights", "angles + grads + AdamW", "text encoder + VAE", "kept for backward", "activations")
WEIGHTS, ADAPTERS, FROZEN, KEPT, ACTIVATIONS = CATEGORIES  # activations: everything else (temporaries included)


def tensors_in(values):
    """The tensors among values and in their lists (an op's arguments or outputs: foreach ops take lists)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            yield from (t for t in v if isinstance(t, torch.Tensor))


class MemoryCount(TorchDispatchMode):
    """What a caching allocator would hold, minus its fragmentation: the bytes of every tensor storage alive, op by op,
    under FakeTensorMode. A storage is counted once (views share it), from the op that makes it until a weak reference
    to it fires, in one of CATEGORIES (see label); once `timeline` is a list, every change is appended to it.

    Host-side work stays real: what runs in on_host (wadi's data draw: noise, timesteps and prompts from a seeded CPU
    generator) and ops on real tensors alone (their results, the optimizers' step counts). A fake tensor's .item()
    (a loss, a norm, GradScaler's found-inf flag) reads as 0, and as True for a bool: finite, so every update is
    taken."""

    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode, self.host = fake_mode, False
        self.live = dict.fromkeys(CATEGORIES, 0)
        self.storages = {}  # id(storage) -> [weak reference, bytes, category]
        self.timeline = None  # once recording: the bytes per category after every allocation or label

    def count(self, t, category=ACTIVATIONS):
        storage = t.untyped_storage()
        key = id(storage)
        if key not in self.storages:
            self.storages[key] = [weakref.ref(storage, lambda _, key=key: self.free(key)), storage.nbytes(), category]
            self.live[category] += storage.nbytes()
            self.record()

    def free(self, key):
        _, nbytes, category = self.storages.pop(key)
        self.live[category] -= nbytes

    def label(self, t, category, only_from=None):
        """Count t's storage under `category` from now on (if it is under `only_from`, when given)."""
        self.count(t, category)
        entry = self.storages[id(t.untyped_storage())]
        if entry[2] != category and only_from in (None, entry[2]):
            self.live[entry[2]] -= entry[1]
            self.live[category] += entry[1]
            entry[2] = category
            self.record()

    def record(self):
        if self.timeline is not None:
            self.timeline.append(tuple(self.live.values()))

    def on_host(self, fn):
        """fn, run for real: a GPU run does it on the CPU too."""
        def host_fn(*args, **kwargs):
            self.host = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.host = False
        return host_fn

    def fake(self, t):
        if isinstance(t, FakeTensor) or t.is_meta:
            return t
        fake = self.fake_mode.from_tensor(t)  # a host tensor meeting the models: its copy on the GPU
        self.count(fake)
        return fake

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = list(tensors_in([*args, *kwargs.values()]))
        real = [t for t in tensors if not (isinstance(t, FakeTensor) or t.is_meta)]
        if self.host or (real and len(real) == len(tensors)):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            return True if args[0].dtype == torch.bool else 0
        if real:
            args, kwargs = pytree.tree_map_only(torch.Tensor, self.fake, (args, kwargs))
        out = func(*args, **kwargs)
        for t in tensors_in(out if isinstance(out, (tuple, list)) else [out]):
            self.count(t)
        return out


class FlopCount(TorchDispatchMode):
    """FLOPs of the ops that run, by torch's own formulas (torch.utils.flop_counter.flop_registry), plus `extra`
    ones. Not FlopCounterMode itself: its module tracking keeps graph nodes alive, and with them the tensors that
    gradient checkpointing recomputes, which the memory count would then see."""

    def __init__(self, extra):
        from torch.utils.flop_counter import flop_registry, shape_wrapper
        super().__init__()
        self.formulas = {**flop_registry, **{op: shape_wrapper(f) for op, f in extra.items()}}
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in self.formulas:
            self.flops += self.formulas[func.overloadpacket](*args, **kwargs, out_val=out)
        return out


@contextlib.contextmanager
def cuda_autocast_norms():
    """The one place where CUDA's autocast keeps other tensors than the CPU's in this step: it runs group_norm and
    layer_norm in fp32 (their input is cast up, and the norm keeps that copy for backward), where the CPU's runs them
    in bf16/fp16 (the tests check that no other op of the step autocasts differently). Patched in torch.nn.functional,
    not in a TorchFunctionMode: those are off in backward, where gradient checkpointing runs the forward again."""
    def in_fp32(norm):
        def norm_in_fp32(*args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                args, kwargs = pytree.tree_map_only(
                    torch.Tensor, lambda t: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t,
                    (args, kwargs))
            return norm(*args, **kwargs)
        return norm_in_fp32
    with mock.patch.object(F, "group_norm", in_fp32(F.group_norm)), \
            mock.patch.object(F, "layer_norm", in_fp32(F.layer_norm)):
        yield


def as_between_steps(run):
    """Put a fresh run's optimizers in the state they hold between steps: torch.optim's foreach AdamW, its choice
    for CUDA tensors (the CPU gets a per-tensor loop), with the moments it allocates at its first step."""
    for params, opt in ((run.student_params, run.opt_s), (run.fake_params, run.opt_f)):
        for group in opt.param_groups:
            group["foreach"] = True
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def count_step(unet_config, text_config, vae_config, argv, as_on_gpu=True, between_steps=False):
    """wadi.setup and one wadi.train_step on fake tensors, counted. argv: wadi.py's flags but --prompts and
    --output_dir. Returns the step's memory timeline (a row of bytes per category after every allocation, from the
    state a run is in between steps) and its FLOPs; with between_steps, also the peaks of a validation
    (wadi.validate, its PNG neither made nor written) and of the export at the end."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from torch.utils import flop_counter
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    with tempfile.TemporaryDirectory() as tmp:  # a prompts file for wadi.setup; nothing is written
        with open(os.path.join(tmp, "prompts.txt"), "w") as f:
            f.write("a prompt\n")
        args = wadi.parse_args(["--prompts", f.name, "--output_dir", os.path.join(tmp, "out"), *argv])
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(wadi.resolve_model("tiny"), subfolder="tokenizer")  # pads to 77 too
        with torch.device("meta"):  # the architectures in the training dtype, as loaded; storages come below
            text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).to(dtype)
            vae, unet = AutoencoderKL(**vae_config).to(dtype), UNet2DConditionModel(**unet_config).to(dtype)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        memory = MemoryCount(fake_mode)
        with fake_mode, memory, cuda_autocast_norms() if as_on_gpu else contextlib.nullcontext():
            text_encoder, vae, unet = (m.to_empty(device="cpu").requires_grad_(False).eval()
                                       for m in (text_encoder, vae, unet))
            run = wadi.setup(args, parts=(tokenizer, text_encoder, vae, unet, DDPMScheduler(**SD_SCHEDULE)))
            as_between_steps(run)
            state = [t for opt in (run.opt_s, run.opt_f) for s in opt.state.values() for t in s.values()
                     if isinstance(t, FakeTensor)]  # not the step counts: they live on the host
            for category, tensors in ((WEIGHTS, [*unet.parameters(), *unet.buffers()]),
                                      (FROZEN, [*text_encoder.parameters(), *text_encoder.buffers(), *vae.parameters(),
                                                *vae.buffers()]),
                                      (ADAPTERS, [*run.student_params, *run.fake_params, *state,
                                                  *(run.ema_params if run.ema is not None else [])])):
                for t in tensors:
                    memory.label(t, category)
            for p in run.student_params + run.fake_params:
                p.register_post_accumulate_grad_hook(lambda p: memory.label(p.grad, ADAPTERS))
            # attention runs the CPU's flash kernel: it keeps what CUDA's keeps (q, k, v, the output, an fp32
            # log-sum-exp per query) and does the same matmuls, but torch's FLOP formulas know CUDA's alone
            cpu_flash = {  # given shapes: (q, k, v, ...) and (grad_out, q, k, v, ...)
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                    lambda q, k, v, *_, **__: flop_counter.sdpa_flop_count(q, k, v),
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                    lambda dout, q, k, v, *_, **__: flop_counter.sdpa_backward_flop_count(dout, q, k, v)}
            kept = lambda t: memory.label(t, KEPT, only_from=ACTIVATIONS) or t.detach()  # not t: a cycle for outputs
            gc.collect()
            gc.disable()  # frees come from reference counts alone, at the same points at every batch size
            memory.timeline = [tuple(memory.live.values())]
            try:
                with torch.autograd.graph.saved_tensors_hooks(kept, lambda t: t), FlopCount(cpu_flash) as flops, \
                        mock.patch.object(wadi, "draw", memory.on_host(wadi.draw)):
                    wadi.train_step(run, 0)
                count = dict(timeline=torch.tensor(memory.timeline), flops=flops.flops)
                if between_steps:
                    memory.timeline = [tuple(memory.live.values())]
                    with mock.patch.object(torch.Tensor, "numpy", lambda t: numpy.zeros(t.shape, numpy.uint8)), \
                            mock.patch("PIL.Image.Image.save"):
                        wadi.validate(run, 1)
                    count["validation"] = max(map(sum, memory.timeline))
                    # the export merges the angles into fp32 weights and loads that pipeline (4 bytes a parameter) to
                    # check it, beside the training state
                    count["export"] = sum(memory.timeline[0]) + 4 * sum(
                        p.numel() for m in (unet, text_encoder, vae) for p in m.parameters())
            finally:
                gc.enable()
    return count


def at_batch(counts, batch):
    """The count at `batch` from counts at two other batch sizes ({batch: count_step(...)}). The step runs the same
    ops at any batch size and each tensor's size is affine in it, so every point of the memory timeline and the
    FLOPs are too: exact, checked here (same length, differences divisible) and against direct counts in the tests.
    None if the check fails."""
    (a, ca), (b, cb) = sorted(counts.items())
    ta, tb, fa, fb = ca["timeline"], cb["timeline"], ca["flops"], cb["flops"]
    if ta.shape != tb.shape or ((tb - ta) % (b - a)).any() or (fb - fa) % (b - a):
        return None
    return dict(timeline=ta + (tb - ta) // (b - a) * (batch - a), flops=fa + (fb - fa) // (b - a) * (batch - a))


def plan_count(model, resolution, batch, mixed_precision, checkpointing, wadi_args=(), between_steps=False):
    _, unet, text = PLAN_MODELS[model]
    argv = ["--resolution", str(resolution), "--train_batch_size", str(batch), "--mixed_precision", mixed_precision,
            *(["--gradient_checkpointing"] if checkpointing else []), *wadi_args]
    return count_step(unet, text, SD_VAE, argv, between_steps=between_steps)


def plan_row(count):
    """Bytes per category at the peak, the peak, the most kept for backward at any time, and the FLOPs."""
    timeline = count["timeline"]
    at_peak = timeline[timeline.sum(1).argmax()].tolist()
    row = dict(zip(CATEGORIES, at_peak), peak=sum(at_peak), flops=count["flops"],
               most_kept=timeline[:, CATEGORIES.index(KEPT)].max().item())
    row["activations at peak"] = row.pop(KEPT) + row.pop(ACTIVATIONS)
    return row


def fits(peak):
    need = peak / 2**30 * (1 + HEADROOM) + CUDA_CONTEXT
    return [card for card, size in CARDS.items() if need <= size]


def gib(nbytes):
    return f"{nbytes / 2**30:.2f}"


def plan_line(count, model, resolution, batch, mixed_precision, checkpointing, wadi_args, gpu_tflops, mfu):
    """One setting's count (with between_steps) in a line, to hold against a measured max_memory_allocated()."""
    r, seconds = plan_row(count), count["flops"] / (gpu_tflops * 1e12 * mfu)
    return (f"{PLAN_MODELS[model][0]}, {resolution} px, batch {batch}, {mixed_precision}"
            f"{', gradient checkpointing' if checkpointing else ''}{', ' + ' '.join(wadi_args) if wadi_args else ''}: "
            f"step peak {gib(r['peak'])} GiB = {WEIGHTS} {gib(r[WEIGHTS])} + {ADAPTERS} {gib(r[ADAPTERS])} + {FROZEN} "
            f"{gib(r[FROZEN])} + activations {gib(r['activations at peak'])} (kept for backward: at most "
            f"{gib(r['most_kept'])}); between steps: validation {gib(count['validation'])}, the export at the end "
            f"{gib(count['export'])} | fits: {', '.join(fits(r['peak'])) or 'none of ' + ', '.join(CARDS)} | "
            f"{count['flops'] / 1e12:.1f} TFLOP/step, {seconds:.2f} s/step at {gpu_tflops:.0f} TFLOP/s x {mfu:.0%}")


def bench_plan(args):
    if args.batch:
        setting = (args.model, args.resolution, args.batch, args.mixed_precision, args.gradient_checkpointing,
                   args.wadi_args)
        print(plan_line(plan_count(*setting, between_steps=True), *setting, args.gpu_tflops, args.mfu))
        return
    print(f"| model | batch | precision | gradient checkpointing | {WEIGHTS} | {ADAPTERS} | {FROZEN} | activations "
          f"| peak | {' | '.join(CARDS)} | TFLOP/step | s/step |")
    print("|---|---|---|---|---|---|---|---|---|" + "---|" * len(CARDS) + "---|---|")
    for model in args.models:
        for checkpointing in (False, True):
            cells = {}  # (precision, batch): the row's cells after the precision
            for mixed_precision in ("bf16", "fp16"):
                count = functools.partial(plan_count, model, args.resolution, mixed_precision=mixed_precision,
                                          checkpointing=checkpointing)
                # batch 1 is counted on its own: its size-1 dimensions turn some copies into views
                ends = {b: count(b) for b in (2, PLAN_BATCHES[-1])}
                for batch in PLAN_BATCHES:
                    r = plan_row(ends.get(batch) or (batch > 2 and at_batch(ends, batch)) or count(batch))
                    cells[mixed_precision, batch] = (
                        f"{'yes' if checkpointing else 'no'} | {gib(r[WEIGHTS])} | {gib(r[ADAPTERS])} | "
                        f"{gib(r[FROZEN])} | {gib(r['activations at peak'])} | **{gib(r['peak'])}** | "
                        + " | ".join("yes" if card in fits(r["peak"]) else "**no**" for card in CARDS)
                        + f" | {r['flops'] / 1e12:.1f} | {r['flops'] / (args.gpu_tflops * 1e12 * args.mfu):.2f} |")
            for batch in PLAN_BATCHES:  # one row for both precisions where they count the same
                same = cells["bf16", batch] == cells["fp16", batch]
                for mixed_precision in (["bf16, fp16"] if same else ["bf16", "fp16"]):
                    print(f"| {PLAN_MODELS[model][0]} | {batch} | {mixed_precision} | "
                          f"{cells[mixed_precision.split(',')[0], batch]}", flush=True)


# -----------------------------------------------------------------------------
# sd15: the real SD1.5 architecture, one step on CPU; and the paper's recipe on a GPU, counted by plan


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


def toy_exact_eps(x_t, t, prompt, modes, abar):
    """E[eps | x_t, c]: what an infinitely trained teacher predicts (SPEC §6). For data N(mu_k, s^2 I) with equal
    weights, x_t | k ~ N(a mu_k, v I) with a = sqrt(abar_t), v = a^2 s^2 + 1 - abar_t, so the posterior over modes is
    a softmax and eps* = sqrt(1 - abar_t) (x_t - a sum_k w_k mu_k) / v. prompt -1 is the empty prompt: every mode."""
    P, M = modes.shape[:2]
    centers = modes.flatten(2).flatten(0, 1)  # (P*M, D)
    a, var = abar[t].sqrt().view(-1, 1), 1 - abar[t].view(-1, 1)
    v = a ** 2 * TOY_NOISE ** 2 + var
    x = x_t.flatten(1)
    logits = (2 * a * x @ centers.T - a ** 2 * centers.square().sum(1)) / (2 * v)  # -|x - a mu|^2 / 2v, up to a const
    own = (torch.arange(P * M) // M == prompt[:, None]) | (prompt[:, None] < 0)
    w = logits.masked_fill(~own, -math.inf).softmax(1)
    return (var.sqrt() * (x - a * w @ centers) / v).view_as(x_t)


TOY_UNETS = {  # changes to the tiny pipeline's UNet config for the toy's teacher
    "tiny": {},  # wadi.py's tiny UNet: cross-attention at its first level only, 1x1-conv projections around it
    # cross-attention at both levels and Linear projections in and out of it (as SD2.1's): more of the UNet in the
    # Linear layers that LoRaD adapts (SD1.5 has cross-attention at 3 of its 4 levels)
    "attention": dict(down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                      use_linear_projection=True),
}


def train_toy_teacher(path, modes, steps, target="exact", unet_kind="tiny", batch=32, lr=3e-3):
    """The tiny pipeline's UNet trained from scratch, with 10% empty prompts (for CFG).
    target 'exact': regress onto E[eps | x_t, c] (toy_exact_eps) with v-space weights 1/abar_t. The sampled noise of
    eq. (1) is a target whose variance at t ~ 999 (abar/(1-abar) s^2 per element) is far above the precision the
    one-step output needs, since x0 = (x_t - sigma eps)/a multiplies every eps error by sigma/a = 14.6; exact targets
    remove that variance, and 1/abar_t (the error of a v-prediction) makes t ~ 999 count as much as it matters.
    target 'noise': eq. (1) as SD was trained (unweighted MSE to the sampled noise), the first toy's teacher.
    lr 3e-3 (decayed to 0) is what makes the one-step output blur-like: the off-span part of the attention UNet's
    one-step error is 4.03 / 2.78 / 2.32 at lr 1e-3 / 2e-3 / 3e-3 (README); the first toys' teachers used 1e-3."""
    from diffusers import UNet2DConditionModel
    wadi.build_tiny_pipeline(path)
    tok, te, vae, unet, sched = wadi.load_pipeline_parts(path, torch.device("cpu"), torch.float32)
    if TOY_UNETS[unet_kind]:
        unet = UNet2DConditionModel.from_config(unet.config, **TOY_UNETS[unet_kind])
    run = argparse.Namespace(tokenizer=tok, text_encoder=te, device=torch.device("cpu"), autocast=contextlib.nullcontext())
    cond, null = wadi.encode(run, TOY_PROMPTS), wadi.encode(run, [""])
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)  # to 0: a precise final model
    g, abar = torch.Generator().manual_seed(0), sched.alphas_cumprod.float()
    for step in range(steps):
        p = torch.randint(len(TOY_PROMPTS), (batch,), generator=g)
        x0, noise, t = toy_data(modes, p, g), torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        drop = torch.rand(batch, generator=g) < 0.1
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        eps = unet(x_t, t, torch.where(drop.view(-1, 1, 1), null, cond[p])).sample
        if target == "exact":
            w = 1 / a
            loss = (w * (eps - toy_exact_eps(x_t, t, torch.where(drop, -1, p), modes, abar)) ** 2).mean() / w.mean()
        else:
            loss = F.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        if step % 500 == 0:
            print(f"teacher step {step}/{steps} | loss {loss.item():.4g}", flush=True)
    unet.save_pretrained(os.path.join(path, "unet"))


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + Tr(Ca + Cb - 2 (Ca^1/2 Cb Ca^1/2)^1/2), in fp64."""
    a, b = a.double(), b.double()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    e, v = torch.linalg.eigh(ca)
    root = v @ torch.diag(e.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root @ cb @ root).clamp(min=0).sqrt().sum()
    return ((a.mean(0) - b.mean(0)).square().sum() + ca.trace() + cb.trace() - 2 * cross).item()


def toy_noise(n, seed):
    """n fixed starting latents per prompt: (prompts, n, 4, 8, 8)."""
    return torch.stack([torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed + p))
                        for p in range(len(TOY_PROMPTS))])


@torch.no_grad()
def toy_samples(pipe, steps, guidance, n, seed=1000):
    """n latents per prompt from a stock diffusers pipeline, from toy_noise(n, seed): (prompts, n, 4, 8, 8)."""
    pipe.set_progress_bar_config(disable=True)
    return torch.stack([pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                             latents=z).images for prompt, z in zip(TOY_PROMPTS, toy_noise(n, seed))])


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


TOY_RECIPE = ["--train_batch_size", "16", "--student_rank", "16", "--fake_rank", "4", "--learning_rate", "1e-3",
              "--fake_updates", "5", "--lr_schedule", "linear", "--fake_weighting", "none"]
# The paper's recipe (wadi.py's defaults) with ranks and batch scaled down to the tiny UNet; the student's lr at 1e-3,
# the one knob of the controlled runs that moved the student (README, "Why the student was slow"); 5 fake updates
# per step, the student's lr annealed and eq. 12 unweighted, the knobs that slowed VSD's mode dropping (README,
# "Why VSD drops modes"). 2000 steps (bench.py toy --steps): ~25 CPU-minutes.


def lorad_from(teacher, path, layers):
    """The teacher's UNet with the LoRaD angles of a checkpoint file (rank read off theta_a), unmerged."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    angles = load_file(path)
    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet", low_cpu_mem_usage=False)
    lorad.add_lorad(unet, next(v for k, v in angles.items() if k.endswith("theta_a")).shape[1], **layers)
    lorad.load_lorad(unet, angles)
    return unet.eval()


def toy_ceiling(pipe, wadi_argv, n=384):
    """The regression ceiling (SPEC §6): wadi.py's own student (wadi.setup on the distillation's command line: the
    same adapter, rank, initial angles, AdamW, clipping, batch and steps) fitted straight onto the teacher's 25-step
    samples (DDIM, the recipe's CFG) from the same noise, instead of by VSD. No one-step target is easier: where
    VSD comes near it, what is left is the student's reach, not VSD. Returns the fitted student and its mean squared
    error to the targets before and after (EMA, if the recipe has one, is left out)."""
    from diffusers import DDIMScheduler
    run = wadi.setup(wadi.parse_args(wadi_argv))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    z, target = toy_noise(n, 2000), toy_samples(pipe, 25, run.args.guidance_scale, n, 2000)  # not the scores' noise
    z, target = z.flatten(0, 1).to(run.device), target.flatten(0, 1).to(run.device)
    cond = wadi.encode(run, TOY_PROMPTS)[torch.arange(len(TOY_PROMPTS)).repeat_interleave(n)]
    g = torch.Generator().manual_seed(run.args.seed)

    def fit(i):
        with run.autocast:
            return F.mse_loss(wadi.one_step(run.student, z[i], cond[i], run.abar), target[i])
    with torch.no_grad():
        before = fit(slice(None)).item()
    for _ in range(run.max_steps):
        loss = fit(torch.randint(len(z), (run.args.train_batch_size,), generator=g))
        wadi.update(loss, run.student_params, run.opt_s, run.scaler_s, run.world)
    with torch.no_grad():
        return run.student.eval(), before, fit(slice(None)).item()


TOY_BUCKETS = [(20, 200), (200, 500), (500, 800), (800, 981)]


@torch.no_grad()
def toy_diagnostics(teacher, ckpt, modes, guidance, previous=None):
    """Why the student moves or not, at one checkpoint, on 16 fixed noises per prompt. The student's error e is
    x0 minus the nearest mode of the asked prompt, split into its part in the span of all modes and off it. Per
    timestep bucket: the size of the VSD gradient g = (1 - abar_t)(eps_real - eps_fake) (eq. 11; the student's x0
    moves along -g), its cosine with e (> 0: it points the right way), in and off the span; and the fake model's
    denoising error (eps MSE) on the student's samples against the teacher's on the data: the fake has caught
    up with the student when the two are alike."""
    _, te, _, unet, sched = wadi.load_pipeline_parts(teacher, torch.device("cpu"), torch.float32)
    student = lorad_from(teacher, os.path.join(ckpt, "student_lorad.safetensors"), wadi.STUDENT_LAYERS)
    fake = lorad_from(teacher, os.path.join(ckpt, "fake_lorad.safetensors"), wadi.FAKE_LAYERS)
    from transformers import CLIPTokenizer
    run = argparse.Namespace(tokenizer=CLIPTokenizer.from_pretrained(teacher, subfolder="tokenizer"), text_encoder=te,
                             device=torch.device("cpu"), autocast=contextlib.nullcontext())
    P, n = len(TOY_PROMPTS), 16
    cond, null = wadi.encode(run, TOY_PROMPTS).repeat_interleave(n, 0), wadi.encode(run, [""]).expand(P * n, -1, -1)
    g, abar = torch.Generator().manual_seed(5), sched.alphas_cumprod.float()
    z = torch.randn(P * n, *modes.shape[2:], generator=g)
    x0 = wadi.one_step(student, z, cond, abar)
    centers = modes.flatten(2)  # (P, M, D)
    asked = torch.arange(P).repeat_interleave(n)
    x = x0.flatten(1)
    own = centers[asked]  # (P*n, M, D): the asked prompt's modes
    e = x - own[torch.arange(P * n), (x[:, None] - own).norm(dim=2).argmin(1)]
    basis = torch.linalg.qr(centers.flatten(0, 1).T).Q
    inside = lambda v: v @ basis @ basis.T
    cos = lambda u, v: F.cosine_similarity(u, v, dim=1).mean().item()
    row = dict(err_in=inside(e).norm(dim=1).mean().item(), err_off=(e - inside(e)).norm(dim=1).mean().item(),
               move=None if previous is None else (x - previous).norm(dim=1).mean().item(), x0=x)
    for lo, hi in TOY_BUCKETS:
        t = torch.randint(lo, hi, (P * n,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        grad = ((1 - a) * (wadi.guided_eps(unet, a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond, null, guidance)
                           - wadi.guided_eps(fake, a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond, null, guidance))).flatten(1)
        data = toy_data(modes, asked, g)
        row[lo] = dict(g=grad.norm(dim=1).mean().item(), cos=cos(grad, e), cos_in=cos(inside(grad), inside(e)),
                       cos_off=cos(grad - inside(grad), e - inside(e)),
                       fake=F.mse_loss(fake(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond).sample, noise).item(),
                       teacher=F.mse_loss(unet(a.sqrt() * data + (1 - a).sqrt() * noise, t, cond).sample, noise).item())
    return row


def line_plot(path, panels):
    """A PNG of stacked line plots with Pillow alone. panels: [(title, xs, {name: ys}, {name: level})], one
    coloured line per series and a dashed line per level."""
    from PIL import Image, ImageDraw
    W, H, pad = 640, 300, 40
    img = Image.new("RGB", (W, H * len(panels)), "white")
    d = ImageDraw.Draw(img)
    for k, (title, xs, series, levels) in enumerate(panels):
        top = 1.1 * max(max(max(ys) for ys in series.values()), *levels.values())
        X = lambda x: pad + (W - 2 * pad) * x / max(xs)
        Y = lambda y: k * H + H - pad - (H - 2 * pad) * y / top
        d.rectangle([pad, k * H + pad, W - pad, k * H + H - pad], outline="black")
        for y in (0, top / 2, top):
            d.text((5, Y(y) - 5), f"{y:.1f}", fill="black")
        d.text((W // 2 - 40, k * H + H - pad + 10), f"training step (0..{max(xs)})", fill="black")
        d.text((pad, k * H + 10), title, fill="black")
        colours = iter(["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"])
        for i, (name, ys) in enumerate([*series.items(), *levels.items()]):
            c = next(colours)
            if name in series:
                d.line([(X(x), Y(y)) for x, y in zip(xs, ys)], fill=c, width=2)
            else:
                for x0 in range(pad, W - pad, 12):
                    d.line([(x0, Y(ys)), (x0 + 6, Y(ys))], fill=c, width=2)
            d.text((W - pad - 260, k * H + pad + 8 + 14 * i), name, fill=c)
    img.save(path)


def bench_toy(args):
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
    for name in ("teacher_steps", "steps", "samples"):
        if getattr(args, name) < 1:
            sys.exit(f"bench.py toy: --{name} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.teacher_lr < math.inf:
        sys.exit(f"bench.py toy: --teacher_lr must be a finite number > 0, got {args.teacher_lr}")
    out = os.path.join(args.out, f"toy-seed{args.seed}")
    os.makedirs(out, exist_ok=True)
    tag = args.teacher_target + ("" if args.toy_unet == "tiny" else f"-{args.toy_unet}")
    # the teacher's recipe in its folder's name: the cached student (its command names the teacher) follows it
    modes, teacher = toy_modes(args.seed), os.path.join(out, f"teacher-{tag}-{args.teacher_steps}-lr{args.teacher_lr:g}")
    if not os.path.isdir(teacher):  # trained once, then cached
        t0 = time.time()
        shutil.rmtree(teacher + ".tmp", ignore_errors=True)
        train_toy_teacher(teacher + ".tmp", modes, args.teacher_steps, args.teacher_target, args.toy_unet,
                          lr=args.teacher_lr)
        os.rename(teacher + ".tmp", teacher)
        print(f"teacher trained in {(time.time() - t0) / 60:.1f} min")
    # distillation: wadi.py's own command line
    prompts, student = os.path.join(out, "prompts.txt"), os.path.join(out, f"wadi-{tag}")
    with open(prompts, "w") as f:
        f.write("\n".join(TOY_PROMPTS) + "\n")
    S = args.steps
    flags = [*TOY_RECIPE, *args.wadi_args]
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "wadi.py"),
           "--pretrained_model_name_or_path", teacher, "--prompts", prompts, "--validation_prompts", *TOY_PROMPTS,
           "--output_dir", student, "--max_train_steps", str(S), "--checkpointing_steps", str(max(1, S // 10)),
           "--validation_steps", str(S), *flags]
    print("wadi.py flags for the toy:", " ".join(flags), "--max_train_steps", S)
    def cached(path):  # a finished run's record (its command, wall time, scores), if made by this very command
        if os.path.exists(path):
            with open(path) as f:
                record = json.load(f)
            return record if record["cmd"] == cmd[1:] else None
    done = student + ".json"  # rerun only what changed
    if not cached(done):
        print(" ".join(cmd[1:]))
        shutil.rmtree(student, ignore_errors=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        json.dump(dict(cmd=cmd[1:], minutes=(time.time() - t0) / 60), open(done, "w"))
    minutes = cached(done)["minutes"]
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
    ceiling = os.path.join(out, f"ceiling-{tag}.json")  # cached like the run it is compared with
    if not cached(ceiling):
        t0 = time.time()
        pipe.unet, before, after = toy_ceiling(pipe, [*cmd[2:], "--output_dir", os.path.join(out, "unused")])
        pipe.scheduler = one_step
        json.dump(dict(cmd=cmd[1:], minutes=(time.time() - t0) / 60, mse=[before, after],
                       scores=toy_scores(toy_samples(pipe, 1, 0, n), modes)), open(ceiling, "w"))
    fit = cached(ceiling)
    print(f"regression ceiling: the student fitted to 25-step samples, MSE {fit['mse'][0]:.3f} -> {fit['mse'][1]:.3f}")
    rows[f"student fitted to the 25-step samples ({S} steps, {fit['minutes']:.1f} min): the ceiling"] = fit["scores"]
    exported = StableDiffusionPipeline.from_pretrained(os.path.join(student, "pipeline"), low_cpu_mem_usage=False)
    rows[f"wadi student, 1 step ({S} steps, {minutes:.1f} min)"] = toy_scores(toy_samples(exported, 1, 0, n), modes)
    print(f"| {n} samples per prompt | precision | coverage | adherence | mean distance to nearest mode "
          f"(tau = {toy_tau(modes):.2f}) | its part off the modes' span | FD to data |")
    print("|---|---|---|---|---|---|---|")
    for name, s in rows.items():
        print(f"| {name} | {s['precision']:.2f} | {s['coverage']:.2f} | {s['adherence']:.2f} | {s['dist']:.2f} "
              f"| {s['off']:.2f} | {s['fd']:.1f} |")
    goal = rows["teacher, 25 DDIM steps, CFG 1.5"]
    student_row = list(rows.values())[-1]
    print("student / 25-step teacher (CFG 1.5): " + ", ".join(
        f"{k} {student_row[k] / goal[k]:.2f}x" for k in ("precision", "coverage", "adherence")) + " (goal >= 0.9x)")
    print("student / regression ceiling: " + ", ".join(
        f"{k} {student_row[k] / fit['scores'][k]:.2f}x" for k in ("precision", "coverage", "adherence")))
    # over training: every checkpoint's student through the pipeline, and the diagnostics of toy_diagnostics
    curve, diag, previous = {0: rows["teacher, 1 step"]}, {}, None
    pipe.scheduler = one_step
    for ckpt in wadi.list_checkpoints(student):
        step = int(ckpt.rsplit("-", 1)[1])
        pipe.unet = lorad_from(teacher, os.path.join(ckpt, "student_lorad.safetensors"), wadi.STUDENT_LAYERS)
        curve[step] = toy_scores(toy_samples(pipe, 1, 0, n), modes)
        diag[step] = toy_diagnostics(teacher, ckpt, modes, 1.5, previous)
        previous = diag[step].pop("x0")
    print(f"\nover training ({n} samples per prompt through the pipeline; diagnostics on 16 fixed noises per prompt; "
          f"t buckets {', '.join(f'[{lo},{hi})' for lo, hi in TOY_BUCKETS)}):")
    print("| step | precision / coverage / adherence | distance: in span / off | moved since last | |VSD grad| "
          "| cos(grad, error) | in span | off span | fake's eps MSE on student samples / teacher's on data |")
    print("|---|---|---|---|---|---|---|---|---|")
    per_bucket = lambda d, f: " ".join(f(d[lo]) for lo, _ in TOY_BUCKETS)
    for step, d in diag.items():
        c, moved = curve[step], "-" if d["move"] is None else f"{d['move']:.2f}"
        print(f"| {step} | {c['precision']:.2f} / {c['coverage']:.2f} / {c['adherence']:.2f} "
              f"| {c['dist']:.2f}: {d['err_in']:.2f} / {d['err_off']:.2f} | {moved} "
              f"| {per_bucket(d, lambda b: format(b['g'], '.3f'))} | {per_bucket(d, lambda b: format(b['cos'], '.2f'))} "
              f"| {per_bucket(d, lambda b: format(b['cos_in'], '.2f'))} | {per_bucket(d, lambda b: format(b['cos_off'], '.2f'))} "
              f"| {per_bucket(d, lambda b: format(b['fake'], '.3f') + '/' + format(b['teacher'], '.3f'))} |")
    plot = os.path.join(out, f"curve-{tag}.png")
    steps = list(curve)
    line_plot(plot, [
        ("precision of the one-step student (share of samples within tau of a mode)", steps,
         {"student, 1 step": [v["precision"] for v in curve.values()]},
         {"25-step teacher, CFG 1.5": goal["precision"], "0.9x of it (goal)": 0.9 * goal["precision"],
          "regression ceiling": fit["scores"]["precision"]}),
        ("mean distance of a sample to its nearest mode", steps,
         {"student, 1 step": [v["dist"] for v in curve.values()],
          "its part off the modes' span": [v["off"] for v in curve.values()]},
         {"25-step teacher, CFG 1.5": goal["dist"], "precision threshold tau": toy_tau(modes)})])
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
    p.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=list(STEP_SIZES),
                   help="sd15: the paper's per-GPU step (512 px, batch 16), for a GPU")
    p.add_argument("--rounds", type=int, default=2, help="processes per design, alternating")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--student_rank", type=int, default=16)
    p.add_argument("--fake_rank", type=int, default=4)
    p.add_argument("wadi_args", nargs="*", help="wadi.py flags for both designs, after --")
    p = sub.add_parser("step-worker", help=argparse.SUPPRESS)  # one (size, design) of `step`, in its own process
    p.add_argument("--size", choices=list(STEP_SIZES))
    p.add_argument("--design", choices=["ours", "authors"])
    for name, default in (("--steps", 5), ("--warmup", 2), ("--student_rank", 16), ("--fake_rank", 4)):
        p.add_argument(name, type=int, default=default)
    p.add_argument("wadi_args", nargs="*")
    p = sub.add_parser("sd15", help="one step of the real SD1.5 architecture on CPU; the paper's recipe, counted")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--gpu_tflops", type=float, default=312, help="bf16 dense peak (A100 80GB: 312)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed share of the peak reached")
    p = sub.add_parser("plan", help="GPU memory and time per step, counted from wadi's train_step on fake tensors")
    p.add_argument("--models", nargs="+", default=list(PLAN_MODELS), choices=list(PLAN_MODELS), help="the table's")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, help="one setting instead of the table, in a line: per GPU")
    p.add_argument("--model", default="sd15", choices=list(PLAN_MODELS), help="with --batch")
    p.add_argument("--mixed_precision", default="bf16", choices=["bf16", "fp16"], help="with --batch")
    p.add_argument("--gradient_checkpointing", action="store_true", help="with --batch")
    p.add_argument("--gpu_tflops", type=float, default=312, help="bf16/fp16 dense peak (A100: 312, H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed share of the peak reached")
    p.add_argument("wadi_args", nargs="*", help="more wadi.py flags for the one setting, after --")
    p = sub.add_parser("toy", help="distill a toy teacher with wadi.py and score it against the known modes")
    p.add_argument("--seed", type=int, default=0, help="which toy (modes); the teacher is trained once per seed")
    p.add_argument("--teacher_steps", type=int, default=4000)
    p.add_argument("--teacher_lr", type=float, default=3e-3, help="decayed linearly to 0; 1e-3: the first toys'")
    p.add_argument("--teacher_target", choices=["exact", "noise"], default="exact",
                   help="exact: E[eps | x_t, c] with v-space weights; noise: eq. (1), the first toy's teacher")
    p.add_argument("--toy_unet", choices=list(TOY_UNETS), default="attention", help="the teacher's UNet (TOY_UNETS)")
    p.add_argument("--steps", type=int, default=2000, help="wadi.py steps (~25 CPU-minutes)")
    p.add_argument("--samples", type=int, default=64, help="per prompt")
    p.add_argument("--out", default="bench-out")
    p.add_argument("wadi_args", nargs="*", help="more wadi.py flags, after --")
    args = parser.parse_args()
    {"layer": bench_layer, "step": bench_step, "step-worker": step_worker, "sd15": bench_sd15, "plan": bench_plan,
     "toy": bench_toy}[args.command](args)
