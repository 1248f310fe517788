"""Tests for bench.py plan, ops and step: GPU memory counted on fake tensors, held against the same step on real ones
(CPU); the ops a step dispatches; the SD architectures the plan builds; docs/gpu.md's plan line run as written.

    python -m pytest -q benchmarks/test_plan.py
"""
import argparse
import copy
import sys

import pytest
import torch

import wadi
from benchmarks import plan, sd
from conftest import PROMPTS, doc_text, in_background, make_run, readme_blocks, run_command

TINY_ARGV = ["--resolution", "64", "--student_rank", "16", "--fake_rank", "4"]  # the tiny pipeline's own 8x8 latents


def tiny_configs(tiny):
    """The tiny pipeline's UNet, text encoder and VAE configs, which the plan builds its models from."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig
    return (dict(UNet2DConditionModel.load_config(tiny, subfolder="unet")),
            CLIPTextConfig.from_pretrained(tiny, subfolder="text_encoder").to_dict(),
            dict(AutoencoderKL.load_config(tiny, subfolder="vae")))


def test_plan_counts_what_the_real_step_keeps(tiny, tmp_path, monkeypatch):
    """The plan's count on fake tensors against the same step on real ones, on the CPU where both run (fp32, batch 2,
    the tiny pipeline's UNet, text encoder and VAE): the bytes autograd keeps for backward, measured with
    saved-tensor hooks per backward pass, and the peak of the bytes allocated during the step, measured by
    torch.profiler from the CPU allocator's own events. Both are counted above the state between steps (weights,
    angles, AdamW moments), which the two runs share."""
    from diffusers import UNet2DConditionModel
    configs = tiny_configs(tiny)
    count = plan.count_step(*configs, [*TINY_ARGV, "--train_batch_size", "2"], as_on_gpu=False)
    predicted = plan.plan_row(count)
    predicted["step"] = predicted["peak"] - count["timeline"][0].sum().item()
    # the same run on real tensors, random weights
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(configs[0]).requires_grad_(False)
    tokenizer, text_encoder, vae, _, scheduler = wadi.load_pipeline_parts(tiny, torch.device("cpu"), torch.float32)
    args = wadi.parse_args(["--prompts", PROMPTS, "--output_dir", str(tmp_path / "out"), *TINY_ARGV,
                            "--train_batch_size", "2"])
    run = wadi.setup(args, parts=(tokenizer, text_encoder, vae, unet, scheduler))
    plan.as_between_steps(run)
    static = {t.untyped_storage().data_ptr() for m in (run.teacher, run.text_encoder, run.vae, run.student, run.fake)
              for t in [*m.parameters(), *m.buffers()]}
    static |= {t.untyped_storage().data_ptr() for opt in (run.opt_s, run.opt_f) for s in opt.state.values()
               for t in s.values()}
    saved, kept = {}, []  # storages saved for the coming backward pass; their bytes at each backward

    def pack(t):
        if t.untyped_storage().data_ptr() not in static:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage()  # held: no address reused while counting
        return t

    def update(loss, *rest):
        kept.append(sum(s.nbytes() for s in saved.values()))
        saved.clear()
        return wadi_update(loss, *rest)
    wadi_update = wadi.update
    monkeypatch.setattr(wadi, "update", update)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        wadi.train_step(run, 0)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    allocated = torch.tensor([n for _, n in events]).cumsum(0)
    assert len(kept) == 2 and min(kept) > 1e6  # the student's and the fake's backward; MB each
    print(f"kept for backward: predicted {predicted['most_kept']}, measured {max(kept)} bytes; step peak: predicted "
          f"{predicted['step']}, measured {allocated.max().item()} bytes")
    assert predicted["most_kept"] == pytest.approx(max(kept), rel=0.10)  # measured: exactly equal
    assert predicted["step"] == pytest.approx(allocated.max().item(), rel=0.10)  # measured: 0.9997


@pytest.fixture(scope="module")
def tiny_counts(tiny):
    """The plan's counts of the tiny UNet, as a GPU run would keep them: bf16, gradient checkpointing, batches 2, 4, 6."""
    return {b: plan.count_step(*tiny_configs(tiny), [*TINY_ARGV, "--mixed_precision", "bf16", "--gradient_checkpointing",
                                                 "--train_batch_size", str(b)]) for b in (2, 4, 6)}


def test_ops_count_sees_w_formed_once_per_value(tiny, monkeypatch):
    """bench.py ops on the tiny UNet (fake tensors, bf16, checkpointing): every op of the step lands in one of its
    sources; with reuse_rotations each adapted layer forms W' exactly once a step (student and fake, one fake update),
    and the LoRaD ops fall by exactly the formations saved times the 6 ops of one (theta_a @ theta_b, the cast of
    the bf16 weight to fp32, ones_like, polar, the complex multiply, the cast back), nothing else moving."""
    from diffusers import UNet2DConditionModel
    from benchmarks import ops
    import lorad
    formed, rotate = [], lorad.rotate
    monkeypatch.setattr(lorad, "rotate", lambda w, theta: formed.append(1) or rotate(w, theta))
    models, counts, formations = tiny_configs(tiny), {}, {}
    for reuse in (False, True):
        formed.clear()
        counts[reuse] = ops.count_ops(2, argv=TINY_ARGV, models=models, reuse=reuse)
        formations[reuse] = len(formed)
    assert set(counts[False]) | set(counts[True]) <= set(ops.SOURCES)
    with torch.device("meta"):  # the adapted layers, as wadi.setup selects them
        unet = UNet2DConditionModel.from_config(models[0])
    n_s, n_f = (len(lorad.add_lorad(copy.deepcopy(unet), 4, **layers)) for layers in (wadi.STUDENT_LAYERS, wadi.FAKE_LAYERS))
    assert formations[True] == n_s + n_f < formations[False]
    lorad_ops = {r: sum(v for k, v in c.items() if "LoRaD" in k) for r, c in counts.items()}
    assert lorad_ops[False] - lorad_ops[True] == 6 * (formations[False] - formations[True])
    assert all(counts[False][k] == counts[True][k] for k in ops.SOURCES if "LoRaD" not in k)


def test_plan_reads_batches_off_exactly(tiny_counts, monkeypatch, capsys):
    """The table counts two batch sizes and reads those between off the two (every tensor's size is affine in the
    batch): the whole timeline at batch 4 from batches 2 and 6 equals a direct count, and so do the table's cells."""
    read_off = plan.at_batch({2: tiny_counts[2], 6: tiny_counts[6]}, 4)
    assert torch.equal(read_off["timeline"], tiny_counts[4]["timeline"]) and read_off["flops"] == tiny_counts[4]["flops"]
    assert not torch.equal(tiny_counts[2]["timeline"], tiny_counts[4]["timeline"])

    def plan_count(model, resolution, batch, mixed_precision, checkpointing):
        assert batch != 4, "batch 4 lies between 2 and 6: it is read off, not counted"
        return tiny_counts[batch]
    monkeypatch.setattr(plan, "plan_count", plan_count)
    monkeypatch.setattr(plan, "PLAN_BATCHES", (2, 4, 6))
    plan.bench_plan(argparse.Namespace(models=["sd15"], resolution=512, batch=None, gpu_tflops=312, mfu=0.4))
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[1], r[2], r[3]) for r in rows] == [(b, "bf16, fp16", ckpt) for ckpt in ("no", "yes") for b in "246"]
    direct = plan.plan_row(tiny_counts[4])
    weights, adapters, frozen, activations, peak = (float(c.strip("*")) for c in rows[1][4:9])
    assert (weights, adapters, frozen) == tuple(round(direct[k] / 2**30, 2) for k in plan.CATEGORIES[:3])
    assert (activations, peak) == (round(direct["activations at peak"] / 2**30, 2), round(direct["peak"] / 2**30, 2))
    assert float(rows[1][-2]) == round(direct["flops"] / 1e12, 1)


def test_plan_gpu_numerics(tmp_path):
    """What the plan changes to count as on a GPU, checked on the real step: CUDA's autocast lists (torch.amp docs)
    treat this step's ops as the CPU's, except group_norm and layer_norm, which CUDA runs in fp32 from bf16 inputs,
    and which plan.cuda_autocast_norms runs in fp32 as well."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    cuda_fp32 = {  # "CUDA Ops that can autocast to float32"
        "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits", "cosh",
        "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum", "dist", "erfinv",
        "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss", "layer_norm", "log", "log_softmax",
        "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss", "multilabel_margin_loss", "multi_margin_loss",
        "nll_loss", "norm", "normalize", "pdist", "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh",
        "smooth_l1_loss", "soft_margin_loss", "softmax", "softmin", "softplus", "sum", "renorm", "tan",
        "triplet_margin_loss"}
    cuda_only_lower = {"addmv", "addr", "mv", "einsum", "chain_matmul", "multi_dot", "lstm_cell", "gru_cell",
                       "rnn_tanh_cell", "rnn_relu_cell"}  # cast to bf16/fp16 by CUDA's autocast, not by the CPU's
    seen = set()

    class Ops(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name, kwargs = getattr(func, "__name__", ""), kwargs or {}
            if torch.is_autocast_enabled("cpu") and (name in cuda_only_lower or name in cuda_fp32 and any(
                    t.dtype == torch.bfloat16 for t in plan.tensors_in([*args, *kwargs.values()]))):
                seen.add(name)
            return func(*args, **kwargs)
    run = make_run(tmp_path, "--mixed_precision", "bf16")
    with Ops():
        wadi.train_step(run, 0)
    assert seen == {"group_norm", "layer_norm"}
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.group_norm(x, 2).dtype == F.layer_norm(x, (4,)).dtype == torch.bfloat16  # the CPU's autocast
        with plan.cuda_autocast_norms():
            assert F.group_norm(x, 2).dtype == F.layer_norm(x, (4,)).dtype == torch.float32


def test_sd_architectures_have_their_published_sizes():
    """The configs the plan builds SD1.5 and SD2.1 from, against the parameter counts of the released checkpoints."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    count = lambda model: sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        assert count(UNet2DConditionModel(**sd.SD15)) == 859_520_964
        assert count(UNet2DConditionModel(**sd.SD21)) == 865_910_724
        assert count(CLIPTextModel(CLIPTextConfig(**sd.SD15_TEXT))) == 123_060_480
        assert count(CLIPTextModel(CLIPTextConfig(**sd.SD21_TEXT))) == 340_387_840
        assert count(AutoencoderKL(**sd.SD_VAE)) == 83_653_863


# docs/gpu.md's plan line and bench.py step, run as written (on the second core)

GPU_DOC = "docs/gpu.md"


@in_background
def plan_line_run(tmp, env):
    command = [line for b in readme_blocks("bash", GPU_DOC) for line in b.splitlines() if line.startswith("python bench.py plan")]
    assert len(command) == 1 and "--batch 16 --mixed_precision bf16 --gradient_checkpointing" in command[0]
    return run_command([sys.executable, *command[0].split()[1:]], env)


def test_readme_plan_line(plan_line_run):
    """docs/gpu.md's one-setting plan command, run as written: it prints the line the doc quotes, and that line's
    numbers are the doc's table row for the same setting."""
    r = plan_line_run
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.strip().splitlines()[-1]
    readme = doc_text(GPU_DOC)
    assert f"\n    {line}\n" in readme, line
    row = [cells.split(" | ") for cells in readme.splitlines() if cells.startswith("| SD1.5 | 16 | bf16, fp16 | yes |")]
    assert len(row) == 1
    weights, adapters, frozen, activations, peak = (c.strip("*") for c in row[0][4:9])
    assert (f"step peak {peak} GiB = weights {weights} + angles + grads + AdamW {adapters} + text encoder + VAE {frozen} "
            f"+ activations {activations} ") in line
    assert f"{row[0][-2]} TFLOP/step, {row[0][-1].rstrip(' |')} s/step" in line


@in_background
def bench_step_run(tmp, env):
    return run_command([sys.executable, "bench.py", "step", "--sizes", "tiny", "--rounds", "1", "--steps", "1",
                        "--warmup", "0", "--", "--gradient_checkpointing"], env)


def test_bench_step_runs_both_designs(bench_step_run):
    """`bench.py step` (the README's step table; on a GPU with `--sizes sd15 -- --gradient_checkpointing`): one
    round on the tiny UNet with wadi flags passed through. The authors' design holds three UNet copies (the
    parameter bytes), ours one base plus the angles."""
    r = bench_step_run
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("|")[3].strip(): line.split("|") for line in r.stdout.splitlines() if line.startswith("| tiny")}
    assert set(rows) == {"ours", "authors"} and "--gradient_checkpointing" in r.stdout
    assert float(rows["authors"][8].split("(")[1].rstrip("x) ")) > 2.5  # unique parameter bytes, authors / ours
