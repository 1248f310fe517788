"""How many ops one WaDi step dispatches at SD1.5 size, and where they come from: wadi.py's step and the authors'.

    python bench.py ops                 # batch 1 and 16, bf16, gradient checkpointing: ours vs the authors' design

Every eager op is at least one kernel launch on a GPU, so a step whose time does not grow with its batch (the H100:
1.00 s at batch 1, 0.96 s at 16) is bound by what the host dispatches, and the count says how much there is. Counted
here on the CPU, on the plan's fake tensors (no memory, no values), as the GPU would run the step (CUDA's autocast
norms, torch's foreach AdamW or the fused one where wadi asks for it). Compute ops only: views, allocations and
metadata launch nothing and are left out, and so are host ops (the step counts of the optimizers, the data draw).
"""
import argparse
import collections
import contextlib
import functools
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

import lorad
import wadi
from benchmarks.plan import count_step, tensors_in
from benchmarks.sd import SD15, SD15_TEXT, SD_VAE
from benchmarks.step import authors_design, authors_guided_eps

NO_LAUNCH = {getattr(torch.ops.aten, name) for name in (  # allocations and metadata: no kernel runs
    "empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh", "_local_scalar_dense", "set_", "resize_",
    "promote_types", "result_type", "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "_unsafe_view")}
SOURCES = ("student: LoRaD layers", "student: rest of the UNet", "teacher", "fake: LoRaD layers",
           "fake: rest of the UNet", "text encoder", "optimizers (clip, AdamW)", "the loss and the rest")


class OpCount(TorchDispatchMode):
    """Ops on device tensors, by where they come from: a stack of labels that forward hooks and patched
    functions push and pop (see labels)."""

    def __init__(self):
        super().__init__()
        self.net, self.part = ["the loss and the rest"], [""]
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_device = any(isinstance(t, FakeTensor) for t in tensors_in([*args, *kwargs.values()]))
        if on_device and func.namespace == "aten" and not func.is_view and func.overloadpacket not in NO_LAUNCH:
            net, part = self.net[-1], self.part[-1]
            self.counts[f"{net}: {part or 'rest of the UNet'}" if net in ("student", "fake") else net] += 1
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def pushed(self, stack, label):
        stack.append(label)
        try:
            yield
        finally:
            stack.pop()

    def labels(self, run):
        """Hooks and patches that label every op of run's step (entered around it)."""
        stack = contextlib.ExitStack()
        for name, model in (("teacher", run.teacher), ("student", run.student), ("fake", run.fake),
                            ("text encoder", run.text_encoder)):
            model.register_forward_pre_hook(lambda m, a, name=name: self.net.append(name))
            model.register_forward_hook(lambda m, a, out: self.net.pop() and None)  # None: keep the output
        for m in [*run.student.modules(), *run.fake.modules()]:  # ours: LoRaDLinear; theirs: hooked Linear
            if hasattr(m, "theta_a"):
                m.register_forward_pre_hook(lambda m, a: self.part.append("LoRaD layers"))
                m.register_forward_hook(lambda m, a, out: self.part.pop() and None, always_call=True)
        backward = lorad._LoRaDFunction.backward

        def lorad_backward(ctx, dy):  # our LoRaD layers' backward (the authors' runs as autograd's own nodes)
            with self.pushed(self.part, "LoRaD layers"):
                return backward(ctx, dy)
        update = wadi.update

        def labelled_update(loss, params, *rest):  # backward by the owner of params, the rest as the optimizer's
            owner = "student" if params is run.student_params else "fake"
            tensor_backward = torch.Tensor.backward

            def labelled_backward(t, *a, **k):
                with self.pushed(self.net, owner), self.pushed(self.part, ""):
                    return tensor_backward(t, *a, **k)
            with self.pushed(self.net, "optimizers (clip, AdamW)"), \
                    mock.patch.object(torch.Tensor, "backward", labelled_backward):
                return update(loss, params, *rest)
        stack.enter_context(mock.patch.object(lorad._LoRaDFunction, "backward", staticmethod(lorad_backward)))
        stack.enter_context(mock.patch.object(wadi, "update", labelled_update))
        return stack


def count_ops(batch, design="ours", argv=("--resolution", "512"), models=(SD15, SD15_TEXT, SD_VAE), reuse=True):
    """Ops of one step (SD1.5, 512 px by default), bf16, gradient checkpointing, by source. reuse=False: every LoRaD
    call forms W' afresh, as before reuse_rotations."""
    counter = OpCount()
    holder = {}

    def prepare(run):
        if design == "authors":
            authors_design(run)
        if not reuse:
            run.reuse_rotations = lambda model: contextlib.nullcontext()
        holder["labels"] = counter.labels(run)

    patch = mock.patch.object(wadi, "guided_eps", authors_guided_eps) if design == "authors" else contextlib.nullcontext()

    @contextlib.contextmanager
    def around_step():
        with holder["labels"], counter:
            yield
    argv = [*argv, "--train_batch_size", str(batch), "--mixed_precision", "bf16", "--gradient_checkpointing"]
    clip = torch.nn.utils.clip_grad_norm_  # its foreach path, which it takes for CUDA tensors (not for these)
    with patch, mock.patch.object(torch.nn.utils, "clip_grad_norm_", functools.partial(clip, foreach=True)):
        count_step(*models, argv, design=prepare, counter=around_step())
    return counter.counts


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py ops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--step_seconds", type=float, default=1.00, help="the measured step at the first batch (H100: 1.00)")
    args = p.parse_args(argv)
    counts = {(d, b): count_ops(b, d) for b in args.batches for d in ("ours", "authors")}
    cols = list(counts)
    print("| source | " + " | ".join(f"{d}, batch {b}" for d, b in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for source in SOURCES:
        print(f"| {source} | " + " | ".join(f"{counts[c][source]:,}" for c in cols) + " |")
    totals = {c: sum(counts[c].values()) for c in cols}
    print("| **all** | " + " | ".join(f"**{totals[c]:,}**" for c in cols) + " |")
    first = ("ours", args.batches[0])
    print(f"\nat {args.step_seconds:.2f} s per step (ours, batch {args.batches[0]}): "
          f"{args.step_seconds / totals[first] * 1e6:.0f} us per op dispatched")
