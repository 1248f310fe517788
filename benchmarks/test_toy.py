"""Tests for bench.py toy: the scores behind the README's distillation table against closed forms, the teacher, the
regression baseline, the diagnostics on a real checkpoint, and the tables rebuilt from the records in git.

    python -m pytest -q benchmarks/test_toy.py
"""
import argparse
import copy
import glob
import json
import math
import os
import re
import shlex
import shutil
import sys

import pytest
import torch

import tiny as tiny_sd
import wadi
from benchmarks import toy, toy_problem, toy_table
from conftest import HERE, abar_closed_form, doc_text, readme_blocks


def test_toy_scores_closed_form():
    modes = toy_problem.toy_modes(1)
    assert modes.square().mean().item() == pytest.approx(1.0)  # unit variance, as SD latents
    exact = modes.repeat(1, 2, 1, 1, 1)  # every prompt's own modes, twice
    s = toy_problem.toy_scores(exact, modes)
    assert (s["precision"], s["coverage"], s["adherence"]) == (1.0, 1.0, 1.0)
    assert s["dist"] == pytest.approx(0, abs=1e-5) and s["off"] == pytest.approx(0, abs=1e-5)
    wrong = modes.roll(1, dims=0)  # prompt p asks, the modes of prompt p-1 answer
    s = toy_problem.toy_scores(wrong, modes)
    assert (s["precision"], s["coverage"], s["adherence"]) == (1.0, 0.0, 0.0)
    # a step of length 2 orthogonal to every mode: distance 2, all of it off the modes' span, inside tau
    centers = modes.flatten(2).flatten(0, 1)
    v = torch.randn(centers.shape[1], generator=torch.Generator().manual_seed(0))
    basis = torch.linalg.qr(centers.T).Q
    v = v - basis @ (basis.T @ v)
    s = toy_problem.toy_scores(modes + (2 * v / v.norm()).view(1, 1, *modes.shape[2:]), modes)
    assert s["dist"] == pytest.approx(2, rel=1e-4) and s["off"] == pytest.approx(2, rel=1e-4)
    assert toy_problem.toy_tau(modes) > 2 and s["precision"] == 1.0
    # Frechet distance: a set against itself is 0; shifted by mu (same covariance) it is |mu|^2
    a = torch.randn(500, 8, generator=torch.Generator().manual_seed(1))
    mu = torch.arange(8.0) / 4
    assert toy_problem.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert toy_problem.frechet_distance(a, a + mu) == pytest.approx(mu.square().sum().item(), rel=1e-6)


def test_toy_mode_balance_closed_form():
    """Balance: per prompt, the number of modes times the smallest share of a mode among the prompt's precise samples.
    Samples placed exactly on the modes, 6/3/3 on the places toy's three modes of every prompt: 3 x 3/12 = 0.75; an
    imprecise sample, or one answering another prompt, is not counted. `nearest` counts every sample of the asked
    prompt by its nearest mode, precise or not."""
    modes = toy_problem.toy_modes(0)
    picks = torch.tensor([0] * 6 + [1] * 3 + [2] * 3)
    samples = modes[:, picks].clone()
    s = toy_problem.toy_scores(samples, modes)
    assert s["balance"] == pytest.approx([0.75] * 4) and s["counts"] == s["nearest"] == [[6, 3, 3]] * 4
    samples[0, :6] = modes[1, 0]  # prompt 0's six samples of its first mode answer prompt 1's: none of its own left
    samples[1, :3] += 10  # prompt 1's first three samples, far from every mode
    samples[2, :3] *= 1.5  # prompt 2's first three: half a mode's norm (> tau) out from their mode, still nearest to it
    s = toy_problem.toy_scores(samples, modes)
    assert s["counts"][:3] == [[0, 3, 3], [3, 3, 3], [3, 3, 3]] and s["balance"][:3] == pytest.approx([0.0, 1.0, 1.0])
    assert s["nearest"][0] == [0, 3, 3] and s["nearest"][2] == [6, 3, 3]  # imprecise, but near the mode: counted


def test_toy_details_modes_share_a_layout():
    """The details toy: a prompt's four modes share their layout (cosine > 0.5 between any two of them) and
    differ by a detail (the closest two 0.5-0.7 of a mode's norm apart: 9.3 of 16 at the default), with unit
    variance per element like the places toy; a sample of the data is still precise (tau > its noise)."""
    for seed in (0, 1):
        modes = toy_problem.toy_modes(seed, "details")
        assert modes.shape == (4, 4, 4, 8, 8) and modes.square().mean().item() == pytest.approx(1.0)
        c = modes.flatten(2)
        norm = c.norm(dim=2).mean().item()
        cos = torch.stack([torch.nn.functional.cosine_similarity(p[:, None], p[None], dim=2) for p in c])
        assert cos.min().item() > 0.5  # a layout in common: 1 / (1 + 0.55^2) = 0.77 for details apart
        closest = min(torch.pdist(p).min().item() for p in c)
        assert 0.5 * norm < closest < 0.7 * norm
        data = toy_problem.toy_data(modes, torch.arange(4).repeat_interleave(64), torch.Generator().manual_seed(0))
        assert toy_problem.toy_scores(data.view(4, 64, 4, 8, 8), modes)["precision"] == 1.0


def test_toy_exact_eps_is_tweedie():
    """The toy teacher's regression target against Tweedie's formula eps* = -sigma grad log p_t(x_t), with
    p_t the noised mixture's density written out (logsumexp of Gaussians) and differentiated by autograd in
    fp64: a prompt's own modes, and every mode for the empty prompt (-1)."""
    modes = toy_problem.toy_modes(2).double()
    abar = abar_closed_form()
    t = torch.tensor([0, 150, 500, 900, 999, 999, 700])
    prompt = torch.tensor([0, 1, 2, 3, 0, -1, -1])
    x = (3 * torch.randn(len(t), *modes.shape[2:], generator=torch.Generator().manual_seed(0))).double()
    x.requires_grad_(True)
    a, var = abar[t].sqrt().view(-1, 1), 1 - abar[t].view(-1, 1)
    v = a ** 2 * toy_problem.TOY_NOISE ** 2 + var
    centers = modes.flatten(2)
    log_p = 0
    for i, p in enumerate(prompt.tolist()):
        mus = centers.flatten(0, 1) if p < 0 else centers[p]
        sq = (x[i].flatten() - a[i] * mus).square().sum(1)
        log_p = log_p + torch.logsumexp(-sq / (2 * v[i]), 0)  # equal weights; constants drop out of the gradient
    (score,) = torch.autograd.grad(log_p, x)
    tweedie = -var.sqrt().view(-1, 1, 1, 1) * score
    ours = toy_problem.toy_exact_eps(x.detach(), t, prompt, modes, abar)
    assert torch.allclose(ours, tweedie, atol=1e-9, rtol=1e-7)


def test_toy_teacher_lr(tmp_path):
    """bench.py toy's teacher takes the lr asked for: AdamW's first step moves every weight with a gradient by lr
    (m/sqrt(v) = sign(g) after bias correction; weight decay adds 1% of lr * |w|), and it saves a folder that stock
    diffusers loads."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    tiny_sd.build_tiny_pipeline(str(tmp_path / "init"))  # seeded: the teacher's starting point
    toy.train_toy_teacher(str(tmp_path / "t"), toy_problem.toy_modes(0), 1, lr=2e-3)
    before = UNet2DConditionModel.from_pretrained(str(tmp_path / "init"), subfolder="unet")
    after = StableDiffusionPipeline.from_pretrained(str(tmp_path / "t")).unet
    moved = torch.cat([(a - b).abs().flatten() for a, b in zip(after.parameters(), before.parameters())])
    assert moved.max().item() == pytest.approx(2e-3, rel=0.03)
    assert moved.median().item() == pytest.approx(2e-3, rel=0.03)  # most weights: exactly one lr


@pytest.mark.parametrize("flags", [["--teacher_lr", "nan"], ["--steps", "0"], ["--baseline_targets", "0"]])
def test_toy_bad_flags(tmp_path, flags, capsys):
    """bench.py toy stops on a bad flag with sys.exit's one line (exit status 1), before it writes anything."""
    with pytest.raises(SystemExit) as e:
        toy.main([*flags, "--out", str(tmp_path / "o")])
    assert isinstance(e.value.code, str) and len(e.value.code.splitlines()) == 1 and flags[0] in e.value.code
    assert not capsys.readouterr().err and not (tmp_path / "o").exists()


def test_toy_diagnostics_vsd_gradient(full_run, tiny, tmp_path):
    """bench.py toy's per-checkpoint diagnostics read a real checkpoint: the VSD gradient (eq. 11) is non-zero
    after training, and exactly zero when the fake's angles are put back to their init (fake == teacher)."""
    from safetensors.torch import load_file, save_file
    modes, ckpt = toy_problem.toy_modes(0), wadi.list_checkpoints(full_run)[-1]
    trained = toy.toy_diagnostics(tiny, ckpt, modes, 1.5)
    assert all(trained[lo]["g"] > 0 and math.isfinite(trained[lo]["cos"]) for lo, _ in toy.TOY_BUCKETS)
    assert trained["err_in"] > 0 and trained["err_off"] > 0
    reset = tmp_path / "ckpt"
    shutil.copytree(ckpt, reset)
    fake = load_file(reset / "fake_lorad.safetensors")
    save_file({k: torch.zeros_like(v) if k.endswith("theta_a") else v for k, v in fake.items()},
              reset / "fake_lorad.safetensors")
    same = toy.toy_diagnostics(tiny, str(reset), modes, 1.5, previous=trained["x0"])
    assert all(same[lo]["g"] == 0 for lo, _ in toy.TOY_BUCKETS)
    assert same["move"] == 0 and same["err_in"] == trained["err_in"]  # the student is the same checkpoint's


def test_toy_scores_a_checkpoint_by_its_ema(full_run, tiny, tmp_path):
    """bench.py toy samples a checkpoint's student as wadi.py exports it: the trained angles through the exported
    pipeline's one step; where the run kept an EMA (here: the angles halved, put beside them), the EMA's."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file
    ckpt, abar = wadi.list_checkpoints(full_run)[-1], abar_closed_form().float()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    pipe = StableDiffusionPipeline.from_pretrained(full_run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    emb = pipe.encode_prompt("a red fox", "cpu", 1, False)[0]
    ema = tmp_path / "ckpt"
    shutil.copytree(ckpt, ema)
    save_file({k: v / 2 for k, v in load_file(ema / "student_lorad.safetensors").items()}, ema / "ema_lorad.safetensors")
    with torch.no_grad():
        exported = pipe(prompt_embeds=emb, latents=z, num_inference_steps=1, guidance_scale=0, output_type="latent").images
        scored, halved = (wadi.one_step(toy.student_from(tiny, str(c)), z, emb, abar) for c in (ckpt, ema))
        pipe.unet = toy.lorad_from(tiny, str(ema / "ema_lorad.safetensors"), wadi.STUDENT_LAYERS)
        expected = wadi.one_step(pipe.unet, z, emb, abar)
    tol = 1e-5 * exported.abs().max().item()
    torch.testing.assert_close(scored, exported, rtol=0, atol=tol)
    torch.testing.assert_close(halved, expected, rtol=0, atol=tol)
    assert (halved - scored).abs().max() > 100 * tol


def test_toy_baseline_fits_the_teachers_samples(tiny, tmp_path):
    """The regression baseline bench.py toy prints beside the VSD student: wadi.py's student, from wadi.setup on a
    command line, starts as the teacher (its MSE to the 25-step targets is the stock pipeline's one-step sample's,
    from the same noise: the pairing of noise and target is right), and fitting lowers that MSE."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny, low_cpu_mem_usage=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(toy_problem.TOY_PROMPTS) + "\n")
    argv = ["--pretrained_model_name_or_path", tiny, "--prompts", str(prompts), "--output_dir", str(tmp_path / "out"),
            "--max_train_steps", "30", "--train_batch_size", "8", "--student_rank", "4", "--learning_rate", "1e-2"]
    student, before, after = toy.toy_baseline(pipe, argv, n=4)
    target = toy_problem.toy_samples(pipe, 25, 1.5, 4, 2000)  # pipe has the DDIM scheduler and the teacher's UNet still
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    teacher_one_step = toy_problem.toy_samples(pipe, 1, 0, 4, 2000)
    assert before == pytest.approx(torch.nn.functional.mse_loss(teacher_one_step, target).item(), rel=1e-4)
    assert after < 0.9 * before
    assert not (tmp_path / "out").exists()  # the baseline writes nothing


def test_toy_baseline_anneals_only_when_asked(tiny, tmp_path, monkeypatch):
    """The regression baseline runs at the student's lr held constant (as its records were made), whatever the
    student's --lr_schedule; with anneal=True (bench.py toy --baseline_anneal) it follows --lr_schedule linear as
    wadi.train_step sets it for the student: lr (1 - step / steps) at each update."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny, low_cpu_mem_usage=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(toy_problem.TOY_PROMPTS) + "\n")
    argv = ["--pretrained_model_name_or_path", tiny, "--prompts", str(prompts), "--output_dir", str(tmp_path / "out"),
            "--max_train_steps", "4", "--train_batch_size", "2", "--student_rank", "4", "--learning_rate", "1e-2",
            "--lr_schedule", "linear"]
    seen, update = [], wadi.update
    monkeypatch.setattr(wadi, "update", lambda loss, params, opt, *a: seen.append(opt.param_groups[0]["lr"]) or update(loss, params, opt, *a))
    for anneal, lrs in ((False, [1e-2] * 4), (True, [1e-2, 7.5e-3, 5e-3, 2.5e-3])):
        seen.clear()
        toy.toy_baseline(pipe, argv, n=1, anneal=anneal)
        assert seen == pytest.approx(lrs)


def test_weight_change_closed_form():
    """Row 0 scaled by 2 (norm +100%, direction unchanged); row 1 turned by 60 degrees (1 - cos = 0.5)."""
    w0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    w1 = torch.tensor([[2.0, 0.0], [0.5, math.sqrt(3) / 2]])
    norm, direction = toy_table.weight_change(w0, w1)
    assert norm == pytest.approx(0.5) and direction == pytest.approx(0.25)


def test_direction_vs_norm_closed_form():
    """bench.py toy's Fig. 1 measurement: rows turned by an angle a keep their norm (NM 0) and change direction by
    1 - cos a (DM, in percent); rows doubled change norm by 100% and no direction. All rows turned alike make a
    rank-1 direction residual: its top 30% singular values hold all its energy. Conv weights count apart."""
    a = 0.3
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Conv2d(4, 6, 1))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        teacher[0].weight.copy_(torch.tensor([1.0, 0, 0, 0]).expand(6, 4))
        student[0].weight.copy_(torch.tensor([math.cos(a), math.sin(a), 0, 0]).expand(6, 4))
        student[1].weight.mul_(2)
    change = toy_table.direction_vs_norm(teacher, student)
    assert change["Linear"]["nm"] == pytest.approx(0, abs=1e-4)  # fp32 weights: cos^2 + sin^2 = 1 to ~1e-7
    assert change["Linear"]["dm"] == pytest.approx(100 * (1 - math.cos(a)), rel=1e-5)
    assert change["Linear"]["top30"] == pytest.approx(1, rel=1e-6) and change["Linear"]["layers"] == 1
    assert change["Linear"]["angle"] == pytest.approx(100 * a, rel=1e-4)  # first order in the turn, as NM is in a stretch
    assert change["Conv2d"]["nm"] == pytest.approx(100, rel=1e-6) and change["Conv2d"]["dm"] == pytest.approx(0, abs=1e-6)


def test_toy_table_rebuilds_from_the_records(tmp_path, capsys):
    """bench.py toy --table: one row per cached, scored run, read from its record alone, and one plot."""
    scores = lambda p: dict(precision=p, coverage=1.0, adherence=1.0, fd=2.5, balance=[0.5, 0.8])
    change = dict(Linear=dict(layers=3, nm=0.1, dm=2.0, ratio=20.0, angle=20.0, top30=0.9),
                  Conv2d=dict(layers=2, nm=0.0, dm=0.0, ratio=math.nan, angle=0.0, top30=math.nan))
    teacher = dict(scores(1.0), balance=[1.0, 0.4])
    for name, p in (("exact-attention-1000", 0.19), ("exact-attention-1000-adapterlora", 0.12)):
        fit = scores(0.25 if name == "exact-attention-1000" else math.nan)  # --no_baseline: not fitted
        record = dict(cmd=[], minutes=20.0, scores=scores(p), baseline=fit, teacher=teacher, steps=1000,
                      curve={"0": dict(precision=0.0, balance=0.0), "1000": dict(precision=p, balance=0.5)},
                      change=change, params=74000, teacher_sha="0123abcd")
        (tmp_path / f"wadi-{name}.json").write_text(json.dumps(record))
    (tmp_path / "wadi-unscored.json").write_text(json.dumps(dict(cmd=[], minutes=1.0)))  # a run not scored yet
    toy_table.toy_table(str(tmp_path), [], str(tmp_path / "plot" / "table.png"))
    printed = capsys.readouterr().out
    assert "one teacher; sha256 0123abcd: 25-step (CFG 1.5) precision 1.000, balance 0.400" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| exact")]
    assert [r.split(" | ")[5] for r in rows] == ["0.12", "0.19"] and [r.split(" | ")[12] for r in rows] == ["-", "0.76x"]
    assert [r.split(" | ")[9] for r in rows] == ["1.25x"] * 2  # the smallest balance over the teacher's: 0.5 / 0.4
    toy_table.toy_table(str(tmp_path), [".*-adapterlora"], str(tmp_path / "plot" / "table.png"))
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("| exact")] == rows[:1]
    assert (tmp_path / "plot" / "table.png").stat().st_size > 0
    # a run on a retrained teacher (other last bits), and a baseline fitted on the first one, are told apart
    record = json.loads((tmp_path / "wadi-exact-attention-1000.json").read_text())
    record.update(teacher_sha="4567ef01", teacher=scores(0.99), baseline=dict(scores(0.25), teacher_sha="0123abcd"))
    (tmp_path / "wadi-exact-attention-1000-seed1.json").write_text(json.dumps(record))
    toy_table.toy_table(str(tmp_path), ["exact-attention-1000.*"], str(tmp_path / "plot" / "table.png"))
    printed = capsys.readouterr().out
    assert "the runs' teachers differ" in printed and "sha256 4567ef01: 25-step (CFG 1.5) precision 0.990" in printed
    row = next(line for line in printed.splitlines() if line.startswith("| exact-attention-1000-seed1 "))
    assert row.split(" | ")[1] == "4567" and row.split(" | ")[11] == "0.25*"
    assert "* the regression baseline was fitted on the teacher with sha256 0123abcd, not the run's" in printed


def test_toy_scored_record_is_not_rerun(tmp_path, monkeypatch, capsys):
    """A run whose scored record is in --records (kept in git) is not made again, on a clone without its outputs:
    bench.py toy prints its row from the record and trains no teacher; without the record it would run wadi.py."""
    seen = []
    monkeypatch.setattr(toy, "train_toy_teacher", lambda path, *a, **k: os.makedirs(path))
    monkeypatch.setattr(toy, "subprocess", argparse.Namespace(DEVNULL=None, run=lambda cmd, **k: seen.append(cmd) or sys.exit("ran wadi.py")))
    flags = ["--toy_modes", "details", "--steps", "10", "--out", str(tmp_path / "o"), "--records", str(tmp_path / "r"),
             "--", "--adapter", "lora"]
    with pytest.raises(SystemExit, match="ran wadi.py"):
        toy.main(flags)
    record = tmp_path / "r" / "toy-details0.55-seed0" / "wadi-exact-attention-10-adapterlora.json"
    assert not record.exists()  # a run that did not finish leaves no record
    s = dict(precision=0.3, coverage=1.0, adherence=1.0, fd=2.0, balance=[0.5])
    change = dict(nm=0.1, dm=0.2, angle=1.0, top30=0.9)
    record.write_text(json.dumps(dict(cmd=["wadi.py", *seen[0][2:]], minutes=1.0, scores=s, baseline=s, teacher=s,
                                      steps=10, curve={"10": dict(precision=0.3)}, change=dict(Linear=change, Conv2d=change), params=1)))
    shutil.rmtree(tmp_path / "o")
    monkeypatch.setattr(toy, "train_toy_teacher", lambda *a, **k: pytest.fail("trained a teacher"))
    toy.main(flags)
    assert "| exact-attention-10-adapterlora | - | 0k | 10 | 1 | 0.30 |" in capsys.readouterr().out


def test_toy_runs_end_to_end(tmp_path, capsys, monkeypatch):
    """bench.py toy as a user runs it, at toy size, with the details recipe as the README gives it: a teacher trained,
    DMD's regression pairs made, wadi.py's command line run, every sample drawn through stock pipelines, and a record
    whose curve has, per checkpoint, the student's and the fake's samples per mode (the fake's own 25-step samples);
    then --table rebuilds the run's row from that record alone."""
    (recipe,) = set(re.findall(r"`-- (--learning_rate [^`]*)`", " ".join(doc_text("README.md").split())))
    flags = ["--toy_modes", "details", "--toy_unet", "tiny", "--teacher_steps", "2", "--steps", "2", "--samples", "3",
             "--no_baseline", "--out", str(tmp_path / "o"), "--records", str(tmp_path / "r")]
    make_pairs = toy.make_pairs  # one pair per prompt of its 1024, for time
    monkeypatch.setattr(toy, "make_pairs", lambda teacher, prompts, z, path: make_pairs(teacher, prompts[::256], z[::256], path))
    toy.main([*flags, "--", *recipe.split()])
    (name,) = os.listdir(tmp_path / "r" / "toy-details0.55-seed0")
    record = json.loads((tmp_path / "r" / "toy-details0.55-seed0" / name).read_text())
    assert f" {recipe} " in f" {' '.join(record['cmd'])} "  # wadi.py ran the README's flags, as written
    pairs = str(tmp_path / "o" / "toy-details0.55-seed0" / "regression-pairs-1024.safetensors")
    assert record["cmd"][record["cmd"].index("--regression_pairs") + 1] == pairs and os.path.exists(pairs)
    assert record["steps"] == 2 and sorted(record["curve"]) == ["0", "1", "2"]
    for step in ("1", "2"):  # 4 prompts x 4 modes; a count is of precise samples, at most the samples drawn
        student, fake = record["curve"][step]["counts"], record["curve"][step]["fake_counts"]
        assert [len(c) for c in student] == [len(c) for c in fake] == [4] * 4
        assert all(sum(c) <= 3 for c in student) and all(sum(c) <= 3 for c in fake)
    capsys.readouterr()
    toy.main([*flags[:2], *flags[-4:], "--table"])
    assert f"| {name[len('wadi-'):-len('.json')]} | " in capsys.readouterr().out


def test_docs_toy_tables_rebuild_from_the_records(tmp_path, capsys):
    """Every `bench.py toy ... --table` command of docs/ runs as written on the records in git (no run, no teacher)
    and prints rows. docs/adapters.md's Table 2 is the records' own, row by row (adapter, seed, teacher build):
    precision with its binomial standard error, balance with its, FD, NM and DM; and so is the README's toy table:
    teacher, VSD alone and the details recipe (precision / balance), and the regression baselines."""
    commands = [shlex.split(line.split(" # ")[0])[2:] for doc in ("docs/adapters.md", "docs/details.md")
                for b in readme_blocks("bash", doc) for line in b.splitlines() if "bench.py toy" in line and "--table" in line]
    assert len(commands) >= 3
    for argv in commands:
        toy.main(["--out", str(tmp_path), *argv])
        assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("| exact-")], argv
    records = os.path.join(HERE, "benchmarks", "records")
    read = lambda path: json.loads(doc_text(os.path.relpath(path, HERE)))
    by_build = {}  # (run, seed, teacher build) -> record, over every records folder
    for path in glob.glob(os.path.join(records, "**", "toy-details0.55-seed*", "wadi-exact-attention-2000-*.json"), recursive=True):
        r = read(path)
        seed = path.split("toy-details0.55-seed")[1].split(os.sep)[0]
        by_build[(os.path.basename(path)[len("wadi-exact-attention-2000-"):-len(".json")], seed, r.get("teacher_sha", "")[:4])] = r
    runs = {"LoRaD, 3e-3": "learning_rate3e-3", "LoRA, 1e-3": "adapterlora-learning_rate1e-3",
            "DoRA, 1e-3": "adapterdora-learning_rate1e-3", "full fine-tuning, 1e-4": "adapterfull-learning_rate1e-4"}
    table = doc_text("docs/adapters.md").split("## Table 2 on the toy")[1].split("\n## ")[0]
    header = next(line for line in table.splitlines() if line.startswith("| adapter, lr"))[2:-2].split(" | ")
    seen = set()
    for line in table.splitlines():
        cells = dict(zip(header, (c.replace("*", "") for c in line[2:-2].split(" | "))))
        if cells["adapter, lr"] in runs:
            seed, build = re.fullmatch(r"(\d) \(`(\w{4})`\)", cells["seed (teacher)"]).groups()
            r = by_build[(runs[cells["adapter, lr"]], seed, build)]
            (se_p, se_b), s, lin = toy_table.standard_errors(r), r["scores"], r["change"]["Linear"]
            assert cells["precision (SE)"] == f"{s['precision']:.2f} ({se_p:.3f})"
            assert cells["balance (min) (SE)"] == f"{min(s['balance']):.2f}" + (f" ({se_b:.2f})" if se_b > 0 else "")
            assert cells["FD"] == f"{s['fd']:.1f}" and cells["coverage"] == f"{s['coverage']:.2f}"
            assert cells["NM %"] == f"{lin['nm']:.3f}" and cells["DM % (1 - cos)"] == f"{lin['dm']:.3f}"
            seen.add((cells["adapter, lr"], seed))
    assert seen == {(adapter, seed) for adapter in runs for seed in "01"}  # every adapter on both seeds
    # LoRaD's lr above the sweep's edge: each row is its record's
    sweep = doc_text("docs/adapters.md").split("| LoRaD, 1000 steps, seed 0 (`4b72`)")[1].split("\n\n")[0]
    rows = [[c.replace("*", "") for c in line[2:-2].split(" | ")] for line in sweep.splitlines()[2:]]
    assert [row[0] for row in rows] == ["3e-3", "1e-2", "3e-2"]
    for lr, precision, coverage, balance, fd, dm, angle in rows:
        r = read(os.path.join(records, "toy-details0.55-seed0", f"wadi-exact-attention-1000-learning_rate{lr}.json"))
        s, lin = r["scores"], r["change"]["Linear"]
        assert r["teacher_sha"].startswith("4b72") and precision == f"{s['precision']:.2f} ({toy_table.standard_errors(r)[0]:.3f})"
        assert [coverage, balance, fd] == [f"{s['coverage']:.2f}", f"{min(s['balance']):.2f}", f"{s['fd']:.1f}"]
        assert [dm, angle] == [f"{lin['dm']:.3f}", f"{lin['angle']:.2f}"]
    # the README's toy table
    pb = lambda s: f"{s['precision']:.2f} / {min(s['balance']):.2f}"
    record = lambda name: read(os.path.join(records, f"{name}.json"))
    places = [record(f"toy-seed0/wadi-exact-attention-2000{flags}")
              for flags in ("", "-student_rank64-regression_weight1-fake_updates3")]
    recipe = [record(f"samples1024/toy-details0.55-seed{seed}/wadi-exact-attention-2000-learning_rate3e-3-student_rank64"
                     "-regression_weight1-fake_updates3") for seed in (0, 1)]
    alone = [record(f"{folder}/wadi-exact-attention-2000-learning_rate3e-3")
             for folder in ("teacher-rebuilt/toy-details0.55-seed0", "toy-details0.55-seed1")]
    assert places[0]["teacher_sha"] == places[1]["teacher_sha"]
    assert [r["teacher_sha"] for r in alone] == [r["teacher_sha"] for r in recipe]  # each seed on one teacher build
    section = doc_text("README.md").split("## Does it distill?")[1].split("\n## ")[0]
    rows = {cells[0]: cells[1:] for cells in ([c.replace("*", "") for c in line[2:-2].split(" | ")]
                                             for line in section.splitlines() if line.startswith(("| places", "| details")))}
    assert rows["places, seed 0"][:3] == [pb(places[0]["teacher"]), pb(places[0]["scores"]), pb(places[1]["scores"])]
    fits = {}  # the regression baselines on the details toy's rebuilt teachers, by lr schedule and adapter
    for path in (glob.glob(os.path.join(records, "toy-details0.55-seed*", "baseline-*.json"))
                 + glob.glob(os.path.join(records, "samples1024", "toy-details0.55-seed*", "baseline-*.json"))):
        key = (path.endswith("-annealed.json"), re.search(r"-adapter([a-z]+)-", path).group(1))
        fits.setdefault(key, []).append(read(path)["scores"]["precision"])
    span = lambda v: f"{min(v):.2f}" + ("" if f"{min(v):.2f}" == f"{max(v):.2f}" else f"-{max(v):.2f}")
    adapters = (("lorad", "LoRaD"), ("lora", "LoRA"), ("dora", "DoRA"), ("full", "full"))
    baselines = "; annealed: ".join(", ".join(f"{name} {span(fits[(annealed, a)])}" for a, name in adapters)
                                    for annealed in (False, True))
    assert rows["details, seed 0; seed 1"] == ["; ".join(pb(r["teacher"]) for r in recipe), "; ".join(pb(r["scores"]) for r in alone),
                                               "; ".join(pb(r["scores"]) for r in recipe), baselines]


def test_toy_baseline_goes_to_the_runs_that_share_it(tmp_path):
    """bench.py toy --baseline_only fits a baseline after the runs (made with --no_baseline): it goes into the records
    of the runs on the same teacher whose student flags are its own, whatever their fake or loss flags, and no other;
    a record whose command has a flag wadi.py no longer takes (history) shares none, and stops nothing."""
    argv = lambda teacher, *flags: ["wadi.py", "--pretrained_model_name_or_path", teacher, "--prompts", "p.txt",
                                    "--max_train_steps", "1000", "--learning_rate", "1e-3", *flags]
    runs = {"same": argv("t"), "fake-only": argv("t", "--fake_rank", "8"), "other-lr": argv("t", "--learning_rate", "3e-3"),
            "other-teacher": argv("u"), "other-rank": argv("t", "--student_rank", "8"),
            "removed-flag": argv("t", "--fresh_fake_samples")}  # a record of a flag wadi.py no longer has
    for name, cmd in runs.items():
        (tmp_path / f"wadi-{name}.json").write_text(json.dumps(dict(cmd=cmd, scores={}, baseline=dict(precision=math.nan))))
    (tmp_path / "wadi-unscored.json").write_text(json.dumps(dict(cmd=argv("t"), minutes=1.0)))
    toy.share_baseline(str(tmp_path), "t", toy.baseline_key(argv("t")[1:]), dict(precision=0.4))
    got = {p.name[5:-5]: json.loads(p.read_text()).get("baseline") for p in tmp_path.glob("wadi-*.json")}
    assert {k for k, v in got.items() if v == dict(precision=0.4)} == {"same", "fake-only"}
    assert got["unscored"] is None and math.isnan(got["other-lr"]["precision"]) and math.isnan(got["removed-flag"]["precision"])
