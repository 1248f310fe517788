"""Does wadi.py distill real images? Handwritten digits on a CPU, scored like the paper's Table 1.

    python bench.py digits -- --adapter full --learning_rate 1e-4 --regression_weight 1 --fake_updates 2
                                              # the digits recipe: teacher, student, scores, picture in bench-out/digits
                                              # (~13 minutes of teacher, ~25 CPU-minutes of student, then scores)
    python bench.py digits                    # the toy's recipe alone (LoRaD rank 16, VSD alone)
    python bench.py digits --seed 1           # a second seed: bench-out/digits-seed1
    python bench.py digits --table            # the tables, assets/digits.png and its curve from the records, no run
    python bench.py digits -- --fake_rank 16  # flags after -- go to wadi.py
    python bench.py digits --baseline -- --student_rank 64   # the regression baseline of those flags (a few CPU-minutes)
    python bench.py digits --teacher_steps 4000 --steps 2000  # another setting: its own --out, student and record

A text-to-image teacher trained on the real digits (benchmarks/digits_problem.py), distilled by wadi.py's own
command line into a one-step student, both sampled through stock diffusers pipelines and scored against the
held-out digits. Each part is cached in --out; each seed's and setting's record (a few kB) in --records, kept in git.
"""
import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file

import wadi
from benchmarks.digits_problem import (DIGIT_PROMPTS, DigitScorer, digit_noise, digit_samples, digit_split,
                                       train_digit_teacher)
from benchmarks.plot import line_plot
from benchmarks.students import fit_by_regression, student_from, vsd_models
from benchmarks.toy_problem import make_pairs
from benchmarks.toy_table import ratio, weights_sha

DIGIT_RECIPE = ["--train_batch_size", "16", "--student_rank", "16", "--fake_rank", "4", "--learning_rate", "1e-3",
                "--fake_updates", "5", "--lr_schedule", "linear", "--fake_weighting", "none"]
# The toy's recipe (benchmarks/toy.py TOY_RECIPE): the paper's, with ranks and batch scaled to the tiny UNet, the
# student's lr 1e-3 annealed, 5 fake updates per step and eq. 12 unweighted. CFG 1.5 on both scores: wadi.py's default.
REAL_IMAGES = ["--adapter", "full", "--learning_rate", "1e-4", "--regression_weight", "1", "--fake_updates", "2"]
# What the digits need beyond it (docs/digits.md): a student that can fit the one-step map (full fine-tuning; its lr
# the toy's), and DMD's regression, which cuts the background noise that VSD leaves; 2 fake updates per step instead
# of 5 (given after the base's 5: argparse keeps the last) buy more steps (--steps), which lower that noise further,
# within ~25 CPU-minutes. The picture shows this student.
GUIDANCE = 1.5
ROWS = ("real training split", "teacher, 25 steps", "teacher, 1 step", "student, 1 step")
BASELINE = "regression baseline, 1 step"  # the last row of a --baseline record, in the student's place
SHOWN = 2  # samples per digit in the picture


def write_json(path, obj):
    """Atomically: a kill mid-write leaves the old file or none, never half of one."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def cost(t0, cpu0, cpu_seconds=time.process_time):
    """Wall and CPU minutes since (t0, cpu0), and the torch threads (a child process reads the same environment)."""
    return dict(minutes=(time.time() - t0) / 60, cpu_minutes=(cpu_seconds() - cpu0) / 60, threads=torch.get_num_threads())


def teacher_part(out, args, x_train, y_train):
    """DIR/teacher, trained once per recipe (DIR/teacher.json says which): a stock StableDiffusionPipeline folder."""
    path, recipe = os.path.join(out, "teacher"), dict(seed=args.seed, steps=args.teacher_steps, lr=args.teacher_lr)
    made = os.path.join(out, "teacher.json")
    if os.path.isdir(path) and os.path.exists(made) and {k: json.load(open(made))[k] for k in recipe} == recipe:
        return path, json.load(open(made))
    t0, cpu0 = time.time(), time.process_time()
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    train_digit_teacher(path + ".tmp", x_train, y_train, args.seed, args.teacher_steps, lr=args.teacher_lr)
    for old in glob.glob(os.path.join(out, "*")):  # the old teacher and what was made of it: stale now
        if old != path + ".tmp" and os.path.basename(old).startswith(("teacher", "student", "baseline", "regression")):
            (shutil.rmtree if os.path.isdir(old) else os.remove)(old)
    os.rename(path + ".tmp", path)
    write_json(made, dict(recipe, **cost(t0, cpu0), sha=weights_sha(path)))
    return path, json.load(open(made))


def student_cmd(out, args, teacher, path):
    """wadi.py's command line for a student of the teacher at `path`: the recipe, then the flags after --. Given
    --regression_weight, DMD's pairs: the teacher's 25-step samples of --pairs fixed noises per digit, made once."""
    prompts = os.path.join(out, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(DIGIT_PROMPTS) + "\n")
    S, flags = args.steps, [*DIGIT_RECIPE, *args.wadi_args]
    if "--regression_weight" in flags and "--regression_pairs" not in flags:
        n = args.pairs
        flags += ["--regression_pairs", os.path.join(out, f"regression-pairs{'' if n == 100 else f'-{n}'}.safetensors")]
        made = flags[-1] + ".json"  # their cost, written after them, atomically: pairs without it are made again
        if not (os.path.exists(flags[-1]) and os.path.exists(made)):
            t0, cpu0 = time.time(), time.process_time()
            make_pairs(teacher, [p for p in DIGIT_PROMPTS for _ in range(n)], digit_noise(n, 3000), flags[-1])
            write_json(made, dict(per_digit=n, **cost(t0, cpu0)))
    return [sys.executable, os.path.abspath(wadi.__file__), "--pretrained_model_name_or_path", teacher, "--prompts",
            prompts, "--validation_prompts", *DIGIT_PROMPTS, "--output_dir", path, "--max_train_steps", str(S),
            "--checkpointing_steps", str(max(1, S // 10)), "--validation_steps", str(S), "--seed", str(args.seed),
            *flags]


def cached_part(path, shown, make, cpu_seconds):
    """`path` and how it was made (path.json: the command `shown`, wall and CPU minutes); make() runs only when path
    is missing or another command made it."""
    made = path + ".json"
    if not (os.path.isdir(path) and os.path.exists(made) and json.load(open(made))["cmd"] == shown):
        if os.path.exists(made):
            os.remove(made)  # a kill during make() leaves no record of an older, same command
        t0, cpu0 = time.time(), cpu_seconds()
        make()
        write_json(made, dict(cmd=shown, **cost(t0, cpu0, cpu_seconds)))
    return path, json.load(open(made))


def student_part(out, args, teacher):
    """DIR/student: wadi.py's own command line on the teacher; rerun only when the command changed."""
    path = os.path.join(out, "student" + run_name(args))
    cmd = student_cmd(out, args, teacher, path)
    shown = ["wadi.py", *cmd[2:]]  # as a record keeps it: the same from any checkout

    def make():
        print(" ".join(shown), flush=True)
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return cached_part(path, shown, make, children_cpu)


def baseline_part(out, args, teacher):
    """DIR/baseline: the regression baseline. wadi.py's student on the same command line (adapter, rank, initial
    angles, AdamW, clipping, batch, steps, lr annealed alike) fitted by DMD's regression alone onto the pairs, no
    VSD: the teacher's one-step map shown to the student directly, pair by pair. A lower bound on what this adapter,
    rank, lr and budget make of the map, not a bound on the map."""
    path = os.path.join(out, "baseline" + run_name(args))
    weight = [] if "--regression_weight" in args.wadi_args else ["--regression_weight", "1"]
    cmd = student_cmd(out, argparse.Namespace(**{**vars(args), "wadi_args": [*args.wadi_args, *weight]}), teacher, path)
    if wadi.parse_args(cmd[2:]).ema_decay:
        sys.exit("bench.py digits: --baseline fits no EMA; leave --ema_decay out")

    def make():  # the models are loaded only to fit; setup never writes its output_dir: the fit is saved below
        run = wadi.setup(wadi.parse_args(cmd[2:]))
        fit_by_regression(run, lambda step: wadi.regression_loss(run, wadi.draw(run, step)))
        own = {k: v.contiguous() for k, v in wadi.own_tensors(run.student, run.teacher).items()}
        wadi.replace_atomically(path, lambda tmp: (os.makedirs(tmp), save_file(
            own, os.path.join(tmp, f"student_{run.args.adapter}.safetensors"))))
    return cached_part(path, ["wadi.py", *cmd[2:]], make, time.process_time)


def variant(args):
    """The wadi.py flags beyond the recipe's, as a name: each variant's student and record of its own (a path by its
    file name)."""
    return "".join("-" + a[2:] if a.startswith("--") else os.path.basename(a) for a in args.wadi_args)


def run_name(args):
    """A student's folder in --out (which names the teacher): the changed --steps and --pairs, then variant(): another
    setting never overwrites a student made before."""
    return "".join(c for c in args.changed if c.startswith(("-steps", "-pairs"))) + variant(args)


def children_cpu():
    """CPU seconds of this process's finished subprocesses, every thread counted."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench_digits(args):
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
    out = args.out or os.path.join("bench-out", "digits" + (f"-seed{args.seed}" if args.seed else "")
                                   + "".join(c for c in args.changed if c.startswith("-teacher_")))  # a teacher per folder
    os.makedirs(out, exist_ok=True)
    x_train, x_test, y_train, y_test = digit_split()
    teacher, teacher_made = teacher_part(out, args, x_train, y_train)
    student, student_made = (baseline_part if args.baseline else student_part)(out, args, teacher)
    # every sample through a stock diffusers pipeline: the teacher's folder, and wadi.py's export
    scorer, n = DigitScorer(x_train, y_train, x_test, y_test), args.samples
    y = np.repeat(np.arange(10), n)
    pipe = StableDiffusionPipeline.from_pretrained(teacher, low_cpu_mem_usage=False)
    one_step = DDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")  # as wadi.py exports
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    cache = os.path.join(out, f"teacher-samples-{n}.npz")  # the teacher's rows, shared by every student of it
    if not os.path.exists(cache) or str(np.load(cache)["sha"]) != teacher_made["sha"]:
        x25 = digit_samples(pipe, 25, GUIDANCE, n)
        pipe.scheduler = one_step
        np.savez(cache, x25=x25, x1=digit_samples(pipe, 1, 0, n), sha=teacher_made["sha"])
    teacher_x = np.load(cache)
    pipe.scheduler = one_step
    samples = {ROWS[0]: (x_train, y_train), ROWS[1]: (teacher_x["x25"], y), ROWS[2]: (teacher_x["x1"], y)}
    if args.baseline:  # the fitted UNet in the teacher's pipeline, as wadi.py would export it
        pipe.unet = student_from(teacher, student)
        samples[BASELINE] = (digit_samples(pipe, 1, 0, n), y)
    else:
        exported = StableDiffusionPipeline.from_pretrained(os.path.join(student, "pipeline"), low_cpu_mem_usage=False)
        samples[ROWS[3]] = (digit_samples(exported, 1, 0, n), y)
    rows = {name: scorer.scores_with_errors(x, labels) for name, (x, labels) in samples.items()}
    # over training: each checkpoint's student (its EMA where kept: what wadi.py exports), in one step
    curve = {0: {k: rows[ROWS[2]]["classifier"][k] for k in ("fd", "accuracy")}}
    for ckpt in (ckpts := wadi.list_checkpoints(student)):
        pipe.unet = student_from(teacher, ckpt)
        s = scorer.scores(digit_samples(pipe, 1, 0, n), y)
        curve[int(ckpt.rsplit("-", 1)[1])] = dict(fd=s["fd"], accuracy=s["accuracy"])
    if ckpts:  # a VSD run: does eq. 11's gradient see its background noise?
        blank = np.stack([x_train[y_train == d].mean(0) < 1 / 32 for d in range(10)])  # the real digits' mean: < 1/32
        guidance = wadi.parse_args(student_made["cmd"][1:]).guidance_scale  # the run's own
        background = background_gradient(teacher, ckpts[-1], blank, guidance)
    shown = lambda x, labels: [np.round(16 * x[labels == d][:SHOWN]).astype(int).tolist() for d in range(10)]
    pairs = student_made["cmd"][student_made["cmd"].index("--regression_pairs") + 1] + ".json" \
        if "--regression_pairs" in student_made["cmd"] else None  # their cost, made once per teacher for every run
    record = dict(seed=args.seed, teacher=teacher_made, student=student_made, samples_per_digit=n, heldout=len(y_test),
                  **({"pairs": json.load(open(pairs))} if pairs and os.path.exists(pairs) else {}),
                  classifier_accuracy=scorer.accuracy, rows=rows, curve=curve,
                  **({"background": background} if ckpts else {}),
                  images={"real digits (held out)": shown(x_test, y_test),
                          **{name: shown(*samples[name]) for name in list(samples)[1:]}})
    os.makedirs(args.records, exist_ok=True)
    name = f"digits-seed{args.seed}{'-baseline' if args.baseline else ''}{''.join(args.changed)}{variant(args)}.json"
    write_json(os.path.join(args.records, name), record)
    digits_table(args.records, args.assets)


VSD_BUCKETS = [(1, 20), (20, 100), (100, 300), (300, 600), (600, 981)]  # t in [lo, hi): the first, below eq. 11's


@torch.no_grad()
def background_gradient(teacher, ckpt, blank, guidance, n=16):
    """Does eq. 11's gradient see the student's noisy background? At a checkpoint, on n fixed noises per digit: e is the
    student's x0 minus the data's background level (pixel 0) on each digit's background (`blank`: (10, 64) booleans),
    0 elsewhere. Per timestep bucket, the VSD gradient g = (1 - abar_t)(eps_real - eps_fake) (the student's x0 moves
    along -g) on those pixels: its cosine with e (> 0: it points the right way) and
    its size beside e's. The first bucket lies below the timesteps eq. 11 draws from (T_VSD), for comparison."""
    from diffusers import AutoencoderKL
    run, unet, abar, student, fake = vsd_models(teacher, ckpt)
    level = -AutoencoderKL.load_config(teacher, subfolder="vae")["scaling_factor"]  # pixel 0 = image -1, as a latent
    cond = wadi.encode(run, DIGIT_PROMPTS).repeat_interleave(n, 0)
    null, mask = wadi.encode(run, [""]).expand_as(cond), torch.tensor(blank).repeat_interleave(n, 0)
    g = torch.Generator().manual_seed(5)
    x0 = wadi.one_step(student, digit_noise(n, 2000), cond, abar)
    e = (x0.flatten(1) - level) * mask
    rows = {}
    for lo, hi in VSD_BUCKETS:
        t = torch.randint(lo, hi, (len(x0),), generator=g)
        x_t = wadi.diffuse(x0, t, torch.randn(x0.shape, generator=g), abar)
        grad = ((1 - abar[t]).view(-1, 1) * (wadi.guided_eps(unet, x_t, t, cond, null, guidance)
                                             - wadi.guided_eps(fake, x_t, t, cond, null, guidance)).flatten(1)) * mask
        rows[f"{lo}-{hi - 1}"] = dict(cos=torch.nn.functional.cosine_similarity(grad, e, dim=1).mean().item(),
                                      size=(grad.norm(dim=1) / e.norm(dim=1)).mean().item())
    return dict(rows, noise=(e.norm(dim=1) / mask.sum(1).sqrt()).mean().item())  # e's rms per background pixel


def digits_table(records, assets):
    """The records' tables (one per seed), the acceptance ratios, and seed 0's picture and curve: no run."""
    found = sorted(glob.glob(os.path.join(records, "digits-seed*.json")))
    if not found:
        sys.exit(f"bench.py digits: no records in {records}: run python bench.py digits first")
    loaded = {path: json.load(open(path)) for path in found}
    for path, r in loaded.items():
        n, st = r["samples_per_digit"], r["student"]
        spent = [f"{st[k]:.1f} CPU-min" if k == "cpu_minutes" else f"threads {st[k]}" for k in ("cpu_minutes", "threads") if k in st]
        print(f"\n{os.path.basename(path)}, seed {r['seed']}: {10 * n} samples per generated row ({n} per digit), against the {r['heldout']} held-out "
              f"digits; the scorer's classifier is {r['classifier_accuracy']:.3f} accurate on them; "
              f"teacher {r['teacher']['sha'][:4]} ({r['teacher']['steps']} steps, {r['teacher']['minutes']:.1f} min, "
              f"threads {r['teacher']['threads']}"
              + (f", {r['teacher']['cpu_minutes']:.1f} CPU-min), " if "cpu_minutes" in r["teacher"] else "), ")
              + f"{list(r['rows'])[-1].split(',')[0]} {r['student']['minutes']:.0f} min"
              + (f" ({', '.join(spent)})" if spent else "")
              + (f", its pairs {r['pairs']['cpu_minutes']:.1f} CPU-min ({r['student']['cpu_minutes'] + r['pairs']['cpu_minutes']:.1f} "
                 "in all)" if "pairs" in r and "cpu_minutes" in r["student"] else "")
              + f": {' '.join(r['student']['cmd'][r['student']['cmd'].index('--seed'):])}")
        for space in ("classifier", "pca"):
            print(f"\n{'classifier features' if space == 'classifier' else 'PCA features (16 components of the real pixels)'}"
                  " | FD | precision | recall | adherence | smallest recall of a digit | smallest adherence of a digit "
                  "| blank pixels |")
            print("|---|---|---|---|---|---|---|---|")
            for name in r["rows"]:
                s = r["rows"][name][space]
                cell = lambda k, f: f"{s[k]:{f}} ± {s['err'][k]:{f}}"
                print(f"| {name} | {cell('fd', '.2f')} | {cell('precision', '.3f')} | {cell('recall', '.3f')} "
                      f"| {cell('accuracy', '.3f')} | {cell('min_recall', '.3f')} | {min(s['accuracy_per_digit']):.3f} "
                      f"| {cell('blank', '.3f')} |")
            last = list(r["rows"])[-1]  # the student, or the regression baseline
            s, t = r["rows"][last][space], r["rows"][ROWS[1]][space]
            print(f"{last.split(',')[0]} / teacher at 25 steps: FD {ratio(s['fd'], t['fd']):.2f}x (goal <= 1.25x), adherence "
                  f"{ratio(s['accuracy'], t['accuracy']):.2f}x (>= 0.95x), recall {ratio(s['recall'], t['recall']):.2f}x "
                  f"(>= 0.85x); every digit present (adherence >= 0.5 for each): {min(s['accuracy_per_digit']) >= 0.5}; "
                  f"teacher adherence {t['accuracy']:.3f} (>= 0.90)")
        if "background" in r:
            b = r["background"]
            print(f"\nthe student's background noise (rms {b['noise']:.3f} per blank pixel, latent units) and eq. 11's "
                  "gradient there, by timestep (cosine > 0: it removes the noise; size: |gradient| / |noise|): "
                  + ", ".join(f"t {k}: cos {v['cos']:.2f}, size {v['size']:.3f}" for k, v in b.items() if k != "noise"))
    print("\nevery record against its teacher at 25 steps (student / teacher); blank pixels: the share with no ink "
          "(teacher's in brackets); background noise: its rms at the last checkpoint\n| seed | teacher / student steps | "
          "wadi.py flags beyond the recipe | FD | recall | adherence | PCA: FD | PCA: recall | blank pixels | "
          "background noise |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in loaded.values():
        cmd, last = r["student"]["cmd"], list(r["rows"])[-1]
        i = cmd.index("--seed") + 2
        flags = cmd[i + len(DIGIT_RECIPE):] if cmd[i:i + len(DIGIT_RECIPE)] == DIGIT_RECIPE else cmd[i:]
        flags = " ".join(flags[:flags.index("--regression_pairs")] if "--regression_pairs" in flags else flags)
        if last == BASELINE:  # its implied weight
            flags = flags.replace(" --regression_weight 1", "").replace("--regression_weight 1", "")
        s, t = ({space: r["rows"][name][space] for space in ("classifier", "pca")} for name in (last, ROWS[1]))
        x = lambda space, k: f"{ratio(s[space][k], t[space][k]):.2f}x"
        print(f"| {r['seed']} | {r['teacher']['steps']} / {cmd[cmd.index('--max_train_steps') + 1]} "
              f"| {'regression alone: ' if last == BASELINE else ''}{flags or 'none (the recipe)'} "
              f"| {x('classifier', 'fd')} | {x('classifier', 'recall')} | {x('classifier', 'accuracy')} | {x('pca', 'fd')} "
              f"| {x('pca', 'recall')} | {s['pca']['blank']:.3f} ({t['pca']['blank']:.3f}) "
              f"| {r['background']['noise'] if 'background' in r else '-':{'.3f' if 'background' in r else ''}} |")
    students = [path for path, r in loaded.items() if list(r["rows"])[-1] != BASELINE]
    if not students:
        return
    real = os.path.join(records, f"digits-seed0{variant(argparse.Namespace(wadi_args=REAL_IMAGES))}.json")
    shown = real if real in students else students[0]  # seed 0, the digits recipe at the defaults
    r, name = loaded[shown], "full FT + regression" if shown == real else "student, 1 step"
    images = {(name if k == ROWS[3] else k): v for k, v in r["images"].items()}
    os.makedirs(assets, exist_ok=True)
    digit_picture(os.path.join(assets, "digits.png"), images)
    steps = sorted(int(k) for k in r["curve"])
    line_plot(os.path.join(assets, "digits-curve.png"), [
        (f"FD to the held-out digits (classifier features), seed {r['seed']}", steps,
         {name: [r["curve"][str(k)]["fd"] for k in steps]},
         {"teacher, 25 steps": r["rows"][ROWS[1]]["classifier"]["fd"], "real training split": r["rows"][ROWS[0]]["classifier"]["fd"]}),
        ("adherence: the share classified as the prompt's digit", steps,
         {name: [r["curve"][str(k)]["accuracy"] for k in steps]},
         {"teacher, 25 steps": r["rows"][ROWS[1]]["classifier"]["accuracy"]})])
    print(f"\npicture: {os.path.join(assets, 'digits.png')}, curve: {os.path.join(assets, 'digits-curve.png')}")


def digit_picture(path, images, scale=5, gap=2):
    """One row per entry of `images` ({row name: per digit, a list of 64 pixel levels 0-16}), digits 0-9 left to right."""
    from PIL import Image, ImageDraw
    cell, label = 8 * scale + gap, 130
    per_row = [[img for digit in imgs for img in digit] for imgs in images.values()]
    pic = Image.new("L", (label + cell * max(map(len, per_row)), cell * len(per_row)), 255)
    d = ImageDraw.Draw(pic)
    for i, (name, row) in enumerate(zip(images, per_row)):
        d.text((4, i * cell + cell // 2 - 6), name, fill=0)
        for j, img in enumerate(row):
            tile = Image.fromarray(np.uint8(255 - 255 * np.array(img).reshape(8, 8) / 16))  # ink dark, as on paper
            pic.paste(tile.resize((8 * scale, 8 * scale), Image.NEAREST), (label + j * cell, i * cell))
    pic.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench.py digits", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="the teacher's and the student's seed (the split is fixed)")
    p.add_argument("--out", help="the runs' outputs (default: bench-out/digits, or bench-out/digits-seedN, then any "
                   "changed --teacher_ flag, as in the record's name: one teacher per folder)")
    p.add_argument("--teacher_steps", type=int, default=3000, help="at batch 64 (~13 minutes on 2 cores)")
    p.add_argument("--teacher_lr", type=float, default=2e-3, help="AdamW, decayed linearly to 0")
    p.add_argument("--steps", type=int, default=2400, help="wadi.py steps (~0.6 CPU-seconds each, 1 thread, with the digits recipe)")
    p.add_argument("--samples", type=int, default=144, help="per digit and generated row (144: as many as the real split)")
    p.add_argument("--records", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "records"))
    p.add_argument("--assets", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets"),
                   help="where --table and a run write digits.png and digits-curve.png")
    p.add_argument("--pairs", type=int, default=100, help="DMD's regression pairs per digit, with --regression_weight")
    p.add_argument("--baseline", action="store_true",
                   help="the regression baseline in the student's place: its flags fitted by DMD's regression alone")
    p.add_argument("--table", action="store_true", help="no run: the tables and pictures from the records")
    p.add_argument("wadi_args", nargs="*", help="more wadi.py flags, after --")
    args = p.parse_args(argv)
    args.changed = [f"-{k}{getattr(args, k)}" for k in ("teacher_steps", "teacher_lr", "steps", "samples", "pairs")
                    if getattr(args, k) != p.get_default(k)]  # in the record's name: one record per setting
    for name in ("teacher_steps", "steps", "samples", "pairs"):
        if getattr(args, name) < 1:
            sys.exit(f"bench.py digits: --{name} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.teacher_lr < float("inf"):
        sys.exit(f"bench.py digits: --teacher_lr must be a finite number > 0, got {args.teacher_lr}")
    if args.table:
        return digits_table(args.records, args.assets)
    bench_digits(args)
