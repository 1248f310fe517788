"""The toy's records as tables: bench.py toy --table, and the weight change it reports (the paper's Fig. 1 and
Table 2 columns) between the teacher and a distilled student."""
import glob
import hashlib
import json
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

import lorad
from benchmarks.plot import line_plot


def ratio(a, b):
    return a / b if b else math.nan


@torch.no_grad()
def direction_vs_norm(teacher, student):
    """The paper's Fig. 1 and Table 2 columns on the student: per layer (Linear, and conv for full fine-tuning), the
    norm change NM and direction change DM of lorad.weight_change (x100, as the paper prints them), their ratio, and
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
                nm, dm = lorad.weight_change(w0, w1)
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
                      f"precise samples per mode {t.get('counts', '-')}" for sha, t in teachers.items()))
    print("| run | teacher | trainable | steps | minutes | precision | coverage | adherence | balance (min) | / teacher's | FD to data "
          "| ceiling precision | / ceiling | NM % | DM % | DM/NM | angle % | angle/NM | top 30% of direction change "
          "| conv NM / DM / angle % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    others = set()
    for name, r in runs.items():
        s, c, lin, conv = r["scores"], r["ceiling"], r["change"]["Linear"], r["change"]["Conv2d"]
        sha = r.get("teacher_sha", "-")
        other = "*" if c.get("teacher_sha", sha) != sha else ""  # a ceiling fitted on another build of the teacher
        others |= {c["teacher_sha"]} if other else set()
        print(f"| {name} | {sha[:4]} | {r['params'] / 1e3:.0f}k | {r['steps']} | {r['minutes']:.0f} | {s['precision']:.2f} "
              f"| {s['coverage']:.2f} | {s['adherence']:.2f} | {min(s['balance']):.2f} "
              f"| {ratio(min(s['balance']), min(r['teacher']['balance'])):.2f}x | {s['fd']:.1f} "
              + (f"| {c['precision']:.2f}{other} | {ratio(s['precision'], c['precision']):.2f}x " if math.isfinite(c["precision"])
                 else "| - | - ") + f"| {lin['nm']:.3f} "
              f"| {lin['dm']:.3f} | {ratio_text(lin, 'dm')} | {lin['angle']:.2f} | {ratio_text(lin, 'angle')} | {lin['top30']:.2f} "
              f"| {conv['nm']:.3f} / {max(conv['dm'], 0):.3f} / {conv['angle']:.2f} |")  # 1 - cos rounds to -1e-17
    if others:
        print(f"* the ceiling was fitted on the teacher with sha256 {', '.join(sorted(others))}, not the run's")
    goal = next(iter(teachers.values()))
    os.makedirs(os.path.dirname(plot) or ".", exist_ok=True)
    line_plot(plot, [("precision of the one-step student over training", None,
                      {name: ([int(k) for k in r["curve"]], [v["precision"] for v in r["curve"].values()])
                       for name, r in runs.items()}, {"25-step teacher, CFG 1.5": goal["precision"]})])
    print(f"plot: {plot}")
