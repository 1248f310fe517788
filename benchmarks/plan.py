"""How much GPU memory and time a run needs, counted from wadi's own setup and train_step on fake tensors.

    python bench.py plan                                   # the table: SD1.5 and SD2.1-base, batch 1..16
    python bench.py plan --batch 16 --mixed_precision bf16 --gradient_checkpointing   # one setting, in a line

The models are built on fake tensors (torch's FakeTensorMode: shapes, dtypes and storages, but no memory and no
values), the step runs on them, and every tensor storage is counted from the op that makes it until its last
reference goes.
"""
import argparse
import contextlib
import functools
import gc
import os
import tempfile
import weakref
from unittest import mock

import numpy
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

import wadi
from tiny import tiny_pipeline
from benchmarks.sd import SD15, SD15_TEXT, SD21, SD21_TEXT, SD_SCHEDULE, SD_VAE

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
    """Put a fresh run's optimizers in the state they hold between steps, with the moments they allocate at their
    first step: AdamW fused where the run asks for it (wadi.py does), else foreach, its choice for CUDA tensors."""
    for params, opt in ((run.student_params, run.opt_s), (run.fake_params, run.opt_f)):
        for group in opt.param_groups:
            group["foreach"] = not group.get("fused")
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def count_step(unet_config, text_config, vae_config, argv, as_on_gpu=True, between_steps=False, design=None,
               counter=contextlib.nullcontext()):
    """wadi.setup and one wadi.train_step on fake tensors, counted. argv: wadi.py's flags but --prompts and
    --output_dir; design(run), if given, changes the run before the step; counter: one more mode around the step. Returns the step's memory timeline (a row of bytes per category after every allocation, from the
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
        tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline(), subfolder="tokenizer")  # pads to 77 too
        with torch.device("meta"):  # the architectures in the training dtype, as loaded; storages come below
            text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).to(dtype)
            vae, unet = AutoencoderKL(**vae_config).to(dtype), UNet2DConditionModel(**unet_config).to(dtype)
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        memory = MemoryCount(fake_mode)
        with fake_mode, memory, cuda_autocast_norms() if as_on_gpu else contextlib.nullcontext():
            text_encoder, vae, unet = (m.to_empty(device="cpu").requires_grad_(False).eval()
                                       for m in (text_encoder, vae, unet))
            run = wadi.setup(args, parts=(tokenizer, text_encoder, vae, unet, DDPMScheduler(**SD_SCHEDULE)))
            if design is not None:
                design(run)
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
                        mock.patch.object(wadi, "draw", memory.on_host(wadi.draw)), counter:
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


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(PLAN_MODELS), choices=list(PLAN_MODELS), help="the table's")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, help="one setting instead of the table, in a line: per GPU")
    p.add_argument("--model", default="sd15", choices=list(PLAN_MODELS), help="with --batch")
    p.add_argument("--mixed_precision", default="bf16", choices=["bf16", "fp16"], help="with --batch")
    p.add_argument("--gradient_checkpointing", action="store_true", help="with --batch")
    p.add_argument("--gpu_tflops", type=float, default=312, help="bf16/fp16 dense peak (A100: 312, H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed share of the peak reached")
    p.add_argument("wadi_args", nargs="*", help="more wadi.py flags for the one setting, after --")
    bench_plan(p.parse_args(argv))
