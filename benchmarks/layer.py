"""One adapted Linear at SD1.5 shapes: time and saved memory of full fine-tuning vs LoRaD three ways.

    python bench.py layer [--tokens 4096] [--repeats 5]
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import lorad

# -----------------------------------------------------------------------------
# timing: round-robin, compared as ratios


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


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py layer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per layer call (batch x positions)")
    p.add_argument("--repeats", type=int, default=5, help="minimum timed rounds per shape (small shapes run more)")
    bench_layer(p.parse_args(argv))
