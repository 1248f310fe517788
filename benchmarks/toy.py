"""Does wadi.py turn a multi-step teacher into a one-step generator? A toy with a known answer.

    python bench.py toy [--seed 1] [--toy_unet tiny] [-- more wadi.py flags]
    python bench.py toy --baseline_only --steps 4000 -- --learning_rate 3e-3   # the regression baseline alone
    python bench.py toy --toy_modes details --table 'exact-attention-2000-.*'  # a table from the records, no run

A conditional distribution whose modes are known exactly, a small teacher trained on it (cached), wadi.py's own
command line, and scores in latent space against the known modes and the 25-step teacher, beside a regression
baseline (the student fitted straight to the teacher's 25-step samples, at a constant lr unless --baseline_anneal).
"""
import argparse
import contextlib
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import wadi
from tiny import build_tiny_pipeline
from benchmarks.plot import line_plot
from benchmarks.students import fit_by_regression, lorad_from, student_from, vsd_models
from benchmarks.toy_table import direction_vs_norm, ratio, toy_table, weights_sha
from benchmarks.toy_problem import (TOY_NOISE, TOY_PROMPTS, make_pairs, toy_data, toy_exact_eps, toy_modes, toy_noise,
                                     toy_samples, toy_scores, toy_tau)


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
    one-step error is 4.03 / 2.78 / 2.32 at lr 1e-3 / 2e-3 / 3e-3 (benchmarks/records/LOG.md, 2026-11-25); the first
    toys' teachers used 1e-3."""
    from diffusers import UNet2DConditionModel
    build_tiny_pipeline(path)
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



TOY_RECIPE = ["--train_batch_size", "16", "--student_rank", "16", "--fake_rank", "4", "--learning_rate", "1e-3",
              "--fake_updates", "5", "--lr_schedule", "linear", "--fake_weighting", "none"]
# The paper's recipe (wadi.py's defaults) with ranks and batch scaled down to the tiny UNet; the student's lr at 1e-3,
# the one knob of the controlled runs that moved the student; 5 fake updates per step, the student's lr annealed and
# eq. 12 unweighted, the knobs that slowed VSD's mode dropping (docs/toy.md; the runs: benchmarks/records/LOG.md).
# 2000 steps (bench.py toy --steps): ~30 CPU-minutes. It drifts between a prompt's modes; DMD's regression keeps them:
# -- --learning_rate 3e-3 --student_rank 64 --regression_weight 1 --fake_updates 3 on the details toy (docs/details.md).


def toy_baseline(pipe, wadi_argv, n=384, anneal=False):
    """A regression baseline (constant lr): wadi.py's own student (wadi.setup on the distillation's command line: the
    same adapter, rank, initial angles, AdamW, clipping, batch and steps) fitted straight onto the teacher's 25-step
    samples (DDIM, the recipe's CFG) from the same noise, instead of by VSD, and read at its last step. The fit runs
    at the student's --learning_rate held constant: the student's --lr_schedule is applied only with anneal=True
    (linear: to 0 over the steps, as wadi.train_step anneals the student). It is a lower bound on what this adapter
    at this lr and budget makes of the one-step map, not a bound on the map: a bound needs several adapters, ranks and
    lrs converging to one value. The fit sees n noises per prompt, VSD fresh noise every step: with too few the fit
    learns the pairs, not the map (its MSE on held-out noise says so). Returns the fitted student and its mean squared
    error to the targets before and after (EMA, if any, is left out)."""
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
    fit_by_regression(run, lambda step: fit(torch.randint(len(z), (run.args.train_batch_size,), generator=g)), anneal)
    with torch.no_grad():
        return run.student.eval(), before, fit(slice(None)).item()


def baseline_key(wadi_argv):
    """What the regression baseline depends on: the student's flags alone, so runs that change only the fake or the
    loss share it (the key names the student's lr_schedule; the fit follows it only with --baseline_anneal). None for a
    recorded command that wadi.py no longer takes (a flag since removed): that record shares no baseline."""
    try:
        a = wadi.parse_args(wadi_argv)
    except wadi.UserError:
        return None
    return [f"{k}{getattr(a, k)}" for k in ("adapter", "student_rank", "learning_rate", "lr_schedule", "train_batch_size",
                                            "max_train_steps", "guidance_scale", "seed")]


def share_baseline(records, teacher, key, scores):
    """A regression baseline fitted after the runs it belongs to (--no_baseline, then --baseline_only) goes into their
    records (under the key "baseline")."""
    for path in glob.glob(os.path.join(records, "wadi-*.json")):
        with open(path) as f:
            record = json.load(f)
        if "scores" in record and record["cmd"][2] == teacher and baseline_key(record["cmd"][1:]) == key:
            with open(path, "w") as f:
                json.dump(dict(record, baseline=scores), f)


TOY_BUCKETS = [(20, 200), (200, 500), (500, 800), (800, 981)]


@torch.no_grad()
def toy_diagnostics(teacher, ckpt, modes, guidance, previous=None):
    """Why the student moves or not, at one checkpoint, on 16 fixed noises per prompt. The student's error e is
    x0 minus the nearest mode of the asked prompt, split into its part in the span of all modes and off it. Per
    timestep bucket: the size of the VSD gradient g = (1 - abar_t)(eps_real - eps_fake) (eq. 11; the student's x0
    moves along -g), its cosine with e (> 0: it points the right way), in and off the span; and the fake model's
    denoising error (eps MSE) on the student's samples against the teacher's on the data: the fake has caught
    up with the student when the two are alike."""
    run, unet, abar, student, fake = vsd_models(teacher, ckpt)
    P, n = len(TOY_PROMPTS), 16
    cond, null = wadi.encode(run, TOY_PROMPTS).repeat_interleave(n, 0), wadi.encode(run, [""]).expand(P * n, -1, -1)
    g = torch.Generator().manual_seed(5)
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


def bench_toy(args):
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    for name in ("teacher_steps", "steps", "samples", "baseline_targets"):
        if getattr(args, name) < 1:
            sys.exit(f"bench.py toy: --{name} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.teacher_lr < math.inf:
        sys.exit(f"bench.py toy: --teacher_lr must be a finite number > 0, got {args.teacher_lr}")
    if not 0 < args.toy_detail < math.inf:
        sys.exit(f"bench.py toy: --toy_detail must be a finite number > 0, got {args.toy_detail}")
    toy = f"toy-{'details%g-' % args.toy_detail if args.toy_modes == 'details' else ''}seed{args.seed}"
    # the runs' outputs (teacher, checkpoints, pipelines) in --out; their records (a few kB each) in --records,
    # kept in git, so the docs' tables rebuild from a clone without a run
    out, records = os.path.join(args.out, toy), os.path.join(args.records, toy)
    if args.table is not None:
        return toy_table(records, args.table, os.path.join(out, "table-precision.png"))
    os.makedirs(out, exist_ok=True)
    os.makedirs(records, exist_ok=True)
    tag = args.teacher_target + ("" if args.toy_unet == "tiny" else f"-{args.toy_unet}")
    # the teacher's recipe in its folder's name: the cached student (its command names the teacher) follows it
    modes, teacher = toy_modes(args.seed, args.toy_modes, args.toy_detail), os.path.join(out, f"teacher-{tag}-{args.teacher_steps}-lr{args.teacher_lr:g}")
    # distillation: wadi.py's own command line
    # each run in its own folder, named by its steps and its flags beyond the recipe's: runs side by side, each cached
    variant = "".join("-" + a[2:] if a.startswith("--") else a for a in args.wadi_args)
    prompts, student = os.path.join(out, "prompts.txt"), os.path.join(out, f"wadi-{tag}-{args.steps}{variant}")
    with open(prompts, "w") as f:
        f.write("\n".join(TOY_PROMPTS) + "\n")
    S = args.steps
    flags = [*TOY_RECIPE, *args.wadi_args]
    pairs = os.path.join(out, "regression-pairs-1024.safetensors")  # DMD's pairs, from noise of their own
    if "--regression_weight" in flags and "--regression_pairs" not in flags:
        flags += ["--regression_pairs", pairs]
    cmd = [sys.executable, os.path.abspath(wadi.__file__),
           "--pretrained_model_name_or_path", teacher, "--prompts", prompts, "--validation_prompts", *TOY_PROMPTS,
           "--output_dir", student, "--max_train_steps", str(S), "--checkpointing_steps", str(max(1, S // 10)),
           "--validation_steps", str(S), *flags]
    print("wadi.py flags for the toy:", " ".join(flags), "--max_train_steps", S)
    shown = ["wadi.py", *cmd[2:]]  # the command as a record keeps it: the same from any checkout

    def cached(path, made_by=shown):  # a finished run's record (what made it, wall time, scores), if made so
        if os.path.exists(path):
            with open(path) as f:
                record = json.load(f)
            return record if record["cmd"] == made_by else None
    done = os.path.join(records, os.path.basename(student) + ".json")  # rerun only what changed
    if not args.baseline_only and "scores" in (cached(done) or {}):  # scored before: its record says it all
        return toy_table(records, [re.escape(os.path.basename(student)[len("wadi-"):])], student + "-curve.png")
    if not os.path.isdir(teacher):  # trained once, then cached
        t0 = time.time()
        shutil.rmtree(teacher + ".tmp", ignore_errors=True)
        train_toy_teacher(teacher + ".tmp", modes, args.teacher_steps, args.teacher_target, args.toy_unet,
                          lr=args.teacher_lr)
        os.rename(teacher + ".tmp", teacher)
        print(f"teacher trained in {(time.time() - t0) / 60:.1f} min")
    if pairs in flags and not os.path.exists(pairs):
        make_pairs(teacher, [p for p in TOY_PROMPTS for _ in range(256)], toy_noise(256, 3000).flatten(0, 1), pairs)
    if not args.baseline_only and not (cached(done) and os.path.isdir(student)):
        print(" ".join(shown))
        shutil.rmtree(student, ignore_errors=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        json.dump(dict(cmd=shown, minutes=(time.time() - t0) / 60), open(done, "w"))
    # scores, every sample through a stock diffusers pipeline
    pipe = StableDiffusionPipeline.from_pretrained(teacher, low_cpu_mem_usage=False)
    config, n = pipe.scheduler.config, args.samples
    one_step = DDPMScheduler.from_config(config, timestep_spacing="trailing")  # as wadi.py exports
    rows = {}
    pipe.scheduler = one_step
    rows["teacher, 1 step"] = toy_scores(toy_samples(pipe, 1, 0, n), modes)
    pipe.scheduler = DDIMScheduler.from_config(config)
    rows["teacher, 25 DDIM steps, no CFG"] = toy_scores(toy_samples(pipe, 25, 1.0, n), modes)
    rows["teacher, 25 DDIM steps, CFG 1.5"] = toy_scores(teacher_x0 := toy_samples(pipe, 25, 1.5, n), modes)
    # a baseline fitted to other than the default targets, or annealed, is its own, and shared with no run (share_baseline)
    key = (baseline_key(cmd[2:]) + ([] if args.baseline_targets == 384 else [f"targets{args.baseline_targets}"])
           + (["annealed"] if args.baseline_anneal else []))
    fitted = os.path.join(records, f"baseline-{tag}-{'-'.join(key)}.json")
    if not cached(fitted, key) and (args.baseline or args.baseline_only):
        t0 = time.time()
        pipe.unet, before, after = toy_baseline(pipe, [*cmd[2:], "--output_dir", os.path.join(out, "unused")],
                                                args.baseline_targets, args.baseline_anneal)
        pipe.scheduler = one_step
        x = toy_samples(pipe, 1, 0, n)  # the scores' noise, not the fit's: its MSE to the 25-step samples is held out
        json.dump(dict(cmd=key, minutes=(time.time() - t0) / 60, samples=n, mse=[before, after, F.mse_loss(x, teacher_x0).item()],
                       scores=dict(toy_scores(x, modes), teacher_sha=weights_sha(teacher))), open(fitted, "w"))
        share_baseline(records, teacher, key, cached(fitted, key)["scores"])
    fit = cached(fitted, key) or dict(scores=dict(precision=math.nan, coverage=math.nan, adherence=math.nan))
    if "mse" in fit:
        baseline = f"regression baseline ({'annealed' if args.baseline_anneal else 'constant lr'})"
        print(f"{baseline}: the student fitted to 25-step samples, MSE {fit['mse'][0]:.3f} -> {fit['mse'][1]:.3f}"
              + (f" (on held-out noise: {fit['mse'][2]:.3f})" if len(fit["mse"]) > 2 else ""))
        rows[f"{baseline}, the student fitted to the 25-step samples ({S} steps, {fit['minutes']:.1f} min)"] = fit["scores"]
    if not args.baseline_only:
        exported = StableDiffusionPipeline.from_pretrained(os.path.join(student, "pipeline"), low_cpu_mem_usage=False)
        rows[f"wadi student, 1 step ({S} steps, {cached(done)['minutes']:.1f} min)"] = toy_scores(toy_samples(exported, 1, 0, n), modes)
    centers = modes.flatten(2)
    gaps = [torch.cdist(c, c)[torch.triu_indices(len(c), len(c), 1).unbind()].min().item() for c in centers]
    print(f"modes: norm {centers.norm(dim=2).mean():.1f}, closest two of a prompt {min(gaps):.1f} apart, data noise "
          f"{TOY_NOISE * centers.shape[-1] ** 0.5:.1f} from its mode")
    print(f"| {n} samples per prompt | precision | coverage | adherence | mean distance to nearest mode "
          f"(tau = {toy_tau(modes):.2f}) | its part off the modes' span | FD to data | balance by prompt "
          f"(M x smallest share) | precise samples per mode, by prompt |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in rows.items():
        print(f"| {name} | {s['precision']:.2f} | {s['coverage']:.2f} | {s['adherence']:.2f} | {s['dist']:.2f} "
              f"| {s['off']:.2f} | {s['fd']:.1f} | {' '.join(f'{b:.2f}' for b in s['balance'])} "
              f"| {' '.join(str(c) for c in s['counts'])} |")
    if args.baseline_only:
        return
    goal = rows["teacher, 25 DDIM steps, CFG 1.5"]
    student_row = list(rows.values())[-1]
    print("student / 25-step teacher (CFG 1.5): " + ", ".join(
        f"{k} {ratio(student_row[k], goal[k]):.2f}x" for k in ("precision", "coverage", "adherence")) + " (goal >= 0.9x)")
    if "mse" in fit:  # a regression baseline was fitted
        print("student / regression baseline: " + ", ".join(
            f"{k} {ratio(student_row[k], fit['scores'][k]):.2f}x" for k in ("precision", "coverage", "adherence")))
    # over training: every checkpoint's student through the pipeline, and the diagnostics of toy_diagnostics
    # and the fake model's own samples (25 DDIM steps, no CFG: its estimate of the student's distribution), per mode:
    # eq. 11 pulls samples back to a mode the student has left only once the fake has learned that it is empty
    curve, diag, fake_counts, previous = {0: rows["teacher, 1 step"]}, {}, {}, None
    ddim = DDIMScheduler.from_config(config)
    for ckpt in wadi.list_checkpoints(student):
        step = int(ckpt.rsplit("-", 1)[1])
        pipe.unet, pipe.scheduler = student_from(teacher, ckpt), one_step
        curve[step] = toy_scores(toy_samples(pipe, 1, 0, n), modes)
        pipe.unet, pipe.scheduler = lorad_from(teacher, os.path.join(ckpt, "fake_lorad.safetensors"), wadi.FAKE_LAYERS), ddim
        fake_counts[step] = toy_scores(toy_samples(pipe, 25, 1.0, min(n, 64)), modes)["counts"]
        diag[step] = toy_diagnostics(teacher, ckpt, modes, 1.5, previous)
        previous = diag[step].pop("x0")
    # the record the table is rebuilt from (bench.py toy --table): scores, the curve, the regression baseline, the weight change
    teacher_unet, final = (UNet2DConditionModel.from_pretrained(p, subfolder="unet", low_cpu_mem_usage=False)
                           for p in (teacher, os.path.join(student, "pipeline")))
    (trained,) = glob.glob(os.path.join(student, "student_*.safetensors"))
    record = dict(cached(done), samples=n, scores=student_row, baseline=fit["scores"], teacher=goal, steps=S,
                  curve={step: dict(precision=c["precision"], balance=min(c["balance"]), counts=c["counts"],
                                    fake_counts=fake_counts.get(step)) for step, c in curve.items()},
                  change=direction_vs_norm(teacher_unet, final),
                  params=sum(t.numel() for t in load_file(trained).values()), teacher_sha=weights_sha(teacher))
    json.dump(record, open(done, "w"))
    print(f"\nover training ({n} samples per prompt through the pipeline; diagnostics on 16 fixed noises per prompt; "
          f"t buckets {', '.join(f'[{lo},{hi})' for lo, hi in TOY_BUCKETS)}):")
    print("| step | precision / coverage / adherence | balance by prompt | distance: in span / off | moved since last "
          "| |VSD grad| | cos(grad, error) | in span | off span | fake's eps MSE on student samples / teacher's on data "
          f"| precise samples per mode: student (of {n}) / the fake's 25-step samples (of {min(n, 64)}) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    per_bucket = lambda d, f: " ".join(f(d[lo]) for lo, _ in TOY_BUCKETS)
    for step, d in diag.items():
        c, moved = curve[step], "-" if d["move"] is None else f"{d['move']:.2f}"
        print(f"| {step} | {c['precision']:.2f} / {c['coverage']:.2f} / {c['adherence']:.2f} "
              f"| {' '.join(f'{b:.2f}' for b in c['balance'])} | {c['dist']:.2f}: {d['err_in']:.2f} / {d['err_off']:.2f} | {moved} "
              f"| {per_bucket(d, lambda b: format(b['g'], '.3f'))} | {per_bucket(d, lambda b: format(b['cos'], '.2f'))} "
              f"| {per_bucket(d, lambda b: format(b['cos_in'], '.2f'))} | {per_bucket(d, lambda b: format(b['cos_off'], '.2f'))} "
              f"| {per_bucket(d, lambda b: format(b['fake'], '.3f') + '/' + format(b['teacher'], '.3f'))} "
              f"| {' '.join(map(str, c['counts']))} / {' '.join(map(str, fake_counts[step]))} |")
    plot = student + "-curve.png"
    steps = list(curve)
    line_plot(plot, [
        ("precision of the one-step student (share of samples within tau of a mode)", steps,
         {"student, 1 step": [v["precision"] for v in curve.values()]},
         {"25-step teacher, CFG 1.5": goal["precision"], "0.9x of it (goal)": 0.9 * goal["precision"],
          "regression baseline": fit["scores"]["precision"]}),
        ("mean distance of a sample to its nearest mode", steps,
         {"student, 1 step": [v["dist"] for v in curve.values()],
          "its part off the modes' span": [v["off"] for v in curve.values()]},
         {"25-step teacher, CFG 1.5": goal["dist"], "precision threshold tau": toy_tau(modes)})])
    print(f"plot: {plot}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py toy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="which toy (modes); the teacher is trained once per seed")
    p.add_argument("--teacher_steps", type=int, default=4000)
    p.add_argument("--teacher_lr", type=float, default=3e-3, help="decayed linearly to 0; 1e-3: the first toys'")
    p.add_argument("--teacher_target", choices=["exact", "noise"], default="exact",
                   help="exact: E[eps | x_t, c] with v-space weights; noise: eq. (1), the first toy's teacher")
    p.add_argument("--toy_unet", choices=list(TOY_UNETS), default="attention", help="the teacher's UNet (TOY_UNETS)")
    p.add_argument("--steps", type=int, default=2000, help="wadi.py steps (~30 CPU-minutes)")
    p.add_argument("--toy_modes", choices=["places", "details"], default="places",
                   help="places: modes far apart (the first toys); details: a shared layout, modes differ in a detail")
    p.add_argument("--toy_detail", type=float, default=0.55, help="details: the detail's norm / the layout's (0.55: closest modes ~9.4 apart)")
    p.add_argument("--samples", type=int, default=256, help="per prompt (256: a share to +-0.03; balance, the smallest of 4, wants 1024)")
    p.add_argument("--out", default="bench-out", help="the runs' outputs: teachers, checkpoints, pipelines")
    p.add_argument("--records", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "records"),
                   help="the runs' records (commands, scores, curves) that --table reads")
    p.add_argument("--no_baseline", dest="baseline", action="store_false",
                   help="skip the regression baseline unless cached (it costs ~9 CPU-minutes per 1000 steps)")
    p.add_argument("--baseline_only", action="store_true",
                   help="no distillation: fit and score the regression baseline of these steps and student flags alone")
    p.add_argument("--baseline_targets", type=int, default=384,
                   help="per prompt, the 25-step samples the regression baseline is fitted to (~4 CPU-minutes per 384 to sample)")
    p.add_argument("--baseline_anneal", action="store_true",
                   help="fit the regression baseline at the student's --lr_schedule (linear: annealed to 0, as the "
                        "student is), not a constant lr; its record is its own (its name ends in '-annealed')")
    p.add_argument("--table", nargs="*", help="no run: the table and plot of this toy's cached runs whose names "
                   "match one of these regular expressions (none: all)")
    p.add_argument("wadi_args", nargs="*", help="more wadi.py flags, after --")
    bench_toy(p.parse_args(argv))
