"""The toy's records as tables: bench.py toy --table, and the weight change it reports (the paper's Fig. 1 and
Table 2 columns) between the teacher and a distilled student. A record's "baseline" is its regression baseline: the
student fitted straight to the teacher's 25-step samples at a constant lr (benchmarks/toy.py, toy_baseline)."""
import glob
import hashlib
import json
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

from benchmarks.plot import line_plot


def ratio(a, b):
    return a / b if b else math.nan


@torch.no_grad()
def weight_change(w0, w1):
    """Norm change |(|w1| - |w0|)| / |w0| and direction change 1 - cos(w0, w1), per output row, averaged over rows: a
    (norm, direction) pair of fractions (x100 for the paper's percent)."""
    w0, w1 = w0.double().flatten(1), w1.double().flatten(1)
    n0, n1 = w0.norm(dim=1), w1.norm(dim=1)
    return ((n1 - n0).abs() / n0).mean().item(), (1 - F.cosine_similarity(w0, w1, dim=1)).mean().item()


@torch.no_grad()
def direction_vs_norm(teacher, student):
    """The paper's Fig. 1 and Table 2 columns on the student: per layer (Linear, and conv for full fine-tuning), the
    norm change NM and direction change DM of weight_change (x100, as the paper prints them), their ratio, and
    the share of the direction residual's energy (squared singular values of the row-normalised W1 minus W0) that its
    top 30% singular values hold, the paper's "30% of the rank recovers 93%". DM = 1 - cos is second order in a
    small change (~angle^2 / 2) while NM is first order, so a small step reads as a norm change: the row's angle
    (arccos, in percent of a radian) is the first-order measure of direction beside NM."""
    mine = dict(student.named_modules())
    out = {}
    for kind in (torch.nn.Linear, torch.nn.Conv2d):
        rows = []
        for name, m in teacher.named_modules():
            if type(m) is kind:
                w0, w1 = m.weight.double().flatten(1), mine[name].weight.double().flatten(1)
                nm, dm = weight_change(w0, w1)
                angle = torch.arccos(F.cosine_similarity(w0, w1, dim=1).clamp(-1, 1)).mean().item()
                s = torch.linalg.svdvals(F.normalize(w1, dim=1) - F.normalize(w0, dim=1)).square()
                top = s[:max(1, round(0.3 * len(s)))].sum() / s.sum() if s.sum() > 0 else torch.tensor(math.nan)  # unchanged
                rows.append((100 * nm, 100 * dm, 100 * angle, top.item()))
        nm, dm, angle, top = (sum(v) / len(v) for v in ([x for x in v if math.isfinite(x)] or [math.nan] for v in zip(*rows)))
        out[kind.__name__] = dict(layers=len(rows), nm=nm, dm=dm, ratio=dm / nm if nm else math.inf, angle=angle, top30=top)
    return out


def weights_sha(model_dir):
    """The first 16 hex digits of the sha256 of a diffusers folder's UNet weights: which teacher a run distilled (the
    teacher is retrained where bench-out/ is gone, the same on the same CPU build and thread count)."""
    with open(os.path.join(model_dir, "unet", "diffusion_pytorch_model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def samples_per_prompt(record):
    """The samples per prompt a record was scored on: its own count, else that of its per-mode nearest counts, else 256
    (bench.py toy's default when the records without either were made)."""
    nearest = record["scores"].get("nearest")
    return record.get("samples") or (sum(nearest[0]) if nearest else 256)


def standard_errors(record):
    """Binomial standard errors of a record's precision and smallest balance. Precision is a share of the n x prompts
    samples drawn: sqrt(p (1 - p) / (n P)). A prompt's balance is M x its smallest mode's share s of its N precise
    samples: M sqrt(s (1 - s) / N), at the prompt with the smallest balance (the smallest of several noisy shares
    also reads low; this leaves that bias out, and is 0 where a mode is empty). NaN where the counts are missing."""
    s = record["scores"]
    if "counts" not in s:
        return math.nan, math.nan
    n, p = samples_per_prompt(record) * len(s["counts"]), s["precision"]
    counts = s["counts"][min(range(len(s["balance"])), key=lambda j: s["balance"][j])]
    share, N = (min(counts) / sum(counts), sum(counts)) if sum(counts) else (math.nan, 1)
    return math.sqrt(p * (1 - p) / n), len(counts) * math.sqrt(share * (1 - share) / N)


def baselines_table(records):
    """The regression baselines recorded in `records` (baseline-*.json: the student fitted straight to the teacher's
    25-step samples, constant lr unless the name ends in -annealed), one row each, with their standard errors."""
    paths = sorted(glob.glob(os.path.join(records, "baseline-*.json")))
    if not paths:
        return
    print("\nregression baselines (the student fitted to the teacher's 25-step samples; constant lr, last iterate, unless "
          "'annealed'):")
    print("| baseline | teacher | samples per prompt | minutes | precision | SE | coverage | balance (min) | SE "
          "| FD to data | MSE to the targets: start / fitted / held out |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        s, (se_p, se_b) = r["scores"], standard_errors(r)
        # the file name less the teacher's tag and the student's lr_schedule (the fit's own: '-annealed' or not)
        name = re.sub(r"-lr_schedule[a-z]+", "", os.path.basename(path)[len("baseline-"):-len(".json")].split("-", 2)[2])
        print(f"| {name} | {s.get('teacher_sha', '-')[:4]} "
              f"| {samples_per_prompt(r)} | {r['minutes']:.0f} | {s['precision']:.3f} | {se_p:.3f} | {s['coverage']:.2f} "
              f"| {min(s['balance']):.2f} | {se_b:.2f} | {s['fd']:.1f} | {' / '.join(f'{m:.3f}' for m in r.get('mse', []))} |")


def ratio_text(change, what):  # DM or angle over NM; LoRaD keeps each row's norm, up to fp32 rounding
    return f"{change[what] / change['nm']:.1f}" if change["nm"] > 1e-4 else "norms kept"


def toy_table(records, match, plot):
    """The runs recorded in `records` whose names (less 'wadi-') match one of the regular expressions `match` (none:
    all), as one table, and their precision over training in one plot: from the records alone, no run, no sampling."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(records, "wadi-*.json"))):
        with open(path) as f:
            record = json.load(f)
        name = os.path.basename(path)[len("wadi-"):-len(".json")]
        if "scores" in record and (not match or any(re.fullmatch(m, name) for m in match)):
            runs[name] = record
    if not runs:
        sys.exit(f"bench.py toy: no scored runs in {records} match {match}")
    # a teacher retrained where bench-out/ is gone can differ in its last bits (another CPU, thread count): each
    # run names its own by its UNet's sha256, and the 25-step teacher's scores show whether two are alike
    teachers = {r.get("teacher_sha", "-"): r["teacher"] for r in runs.values()}  # "-": a record older than the sha
    print(f"{os.path.relpath(records)}: " + ("one teacher" if len(teachers) == 1 else "the runs' teachers differ") + "; "
          + "; ".join(f"sha256 {sha}: 25-step (CFG 1.5) precision {t['precision']:.3f}, balance {min(t['balance']):.3f}, "
                      + (f"FD {t['fd']:.1f}, " if "fd" in t else "") + f"precise samples per mode {t.get('counts', '-')}" for sha, t in teachers.items()))
    print("| run | teacher | trainable | steps | minutes | precision | coverage | adherence | balance (min) | / teacher's | FD to data "
          "| regression baseline (constant lr) precision | / baseline | NM % | DM % | DM/NM | angle % | angle/NM "
          "| top 30% of direction change | conv NM / DM / angle % | samples per prompt | precision SE | balance SE |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    others = set()
    for name, r in runs.items():
        s, c, lin, conv = r["scores"], r["baseline"], r["change"]["Linear"], r["change"]["Conv2d"]
        sha = r.get("teacher_sha", "-")
        other = "*" if c.get("teacher_sha", sha) != sha else ""  # a baseline fitted on another build of the teacher
        se_p, se_b = standard_errors(r)
        others |= {c["teacher_sha"]} if other else set()
        print(f"| {name} | {sha[:4]} | {r['params'] / 1e3:.0f}k | {r['steps']} | {r['minutes']:.0f} | {s['precision']:.2f} "
              f"| {s['coverage']:.2f} | {s['adherence']:.2f} | {min(s['balance']):.2f} "
              f"| {ratio(min(s['balance']), min(r['teacher']['balance'])):.2f}x | {s['fd']:.1f} "
              + (f"| {c['precision']:.2f}{other} | {ratio(s['precision'], c['precision']):.2f}x " if math.isfinite(c["precision"])
                 else "| - | - ") + f"| {lin['nm']:.3f} "
              f"| {lin['dm']:.3f} | {ratio_text(lin, 'dm')} | {lin['angle']:.2f} | {ratio_text(lin, 'angle')} | {lin['top30']:.2f} "
              f"| {conv['nm']:.3f} / {max(conv['dm'], 0):.3f} / {conv['angle']:.2f} "  # 1 - cos rounds to -1e-17
              f"| {samples_per_prompt(r)} | {se_p:.3f} | {se_b:.2f} |")
    if others:
        print(f"* the regression baseline was fitted on the teacher with sha256 {', '.join(sorted(others))}, not the run's")
    baselines_table(records)
    goal = next(iter(teachers.values()))
    os.makedirs(os.path.dirname(plot) or ".", exist_ok=True)
    line_plot(plot, [("precision of the one-step student over training", None,
                      {name: ([int(k) for k in r["curve"]], [v["precision"] for v in r["curve"].values()])
                       for name, r in runs.items()}, {"25-step teacher, CFG 1.5": goal["precision"]})])
    print(f"plot: {plot}")
