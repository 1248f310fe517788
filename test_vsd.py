"""Tests for wadi.py: the VSD step against its closed forms, the shared base, resume, the CLI end to end, the export
and its model card, bad input, and the README's commands as written.

    python -m pytest -q test_vsd.py       # CPU only, no network, about 2 minutes on 2 cores

In-process tests call wadi's functions directly, on one core; the CLI tests run `python wadi.py` (and torchrun) in a
few shared subprocess runs of 2-4 steps, on the second core (conftest.py, in_background). The benchmarks' tests are
in benchmarks/.
"""
import argparse
import gc
import hashlib
import json
import math
import os
import re
import runpy
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

import wadi
from conftest import (HERE, PROMPTS, RUN_ARGS, STEPS, STUDENT_RANK, WADI, abar_closed_form, cli, in_background, make_run,
                      readme_blocks, run_command)
from lorad import LoRaDLinear, add_lorad, load_lorad, lorad_state_dict
from tiny import tiny_pipeline


def clone(tensors):
    return {k: v.detach().clone() for k, v in tensors.items()}


def frozen_tensors(run):
    """Every tensor that must never change: the teacher's parameters and buffers, the base weights as the
    student and fake models see them (everything but their angles), the VAE and the text encoder."""
    out = {}
    for prefix, model in [("teacher", run.teacher), ("student", run.student), ("fake", run.fake),
                          ("vae", run.vae), ("text_encoder", run.text_encoder)]:
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not name.endswith((".theta_a", ".theta_b")):
                out[f"{prefix}.{name}"] = t
    return out


def set_fake_angles(run, std=0.05, seed=0):
    """Give the fake model non-zero angles, so that eps_fake != eps_real."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in run.fake.modules():
            if isinstance(m, LoRaDLinear):
                m.theta_a.copy_(torch.randn(m.theta_a.shape, generator=g) * std)


# -----------------------------------------------------------------------------
# the schedule, the generator and the data draw


def test_schedule_is_sd15_closed_form(tmp_path):
    run = make_run(tmp_path)
    torch.testing.assert_close(run.abar.double(), abar_closed_form(), rtol=1e-5, atol=0)  # fp32 cumprod rounding
    assert run.abar[999].item() == pytest.approx(0.00466, abs=5e-6)  # the schedule's own value, not the authors' hard-coded 0.0047
    assert run.scheduler.config.prediction_type == "epsilon"


def test_one_step_inverts_forward_diffusion_at_t999(tmp_path):
    """x0 = (z - sqrt(1-a) eps) / sqrt(a): re-noising x0 with the same eps at t=999 gives z back."""
    run = make_run(tmp_path)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in run.student.modules():  # a student that differs from the teacher
            if isinstance(m, LoRaDLinear):
                m.theta_a.copy_(torch.randn(m.theta_a.shape, generator=g) * 0.05)
        z = torch.randn(2, *run.latent_shape, generator=g)
        emb = wadi.encode(run, ["a red fox", "a blue car"])
        x0 = wadi.one_step(run.student, z, emb, run.abar)
        eps = run.student(z, torch.full((2,), 999), emb).sample
        a = abar_closed_form()[999].float()
        torch.testing.assert_close(x0, (z - (1 - a).sqrt() * eps) / a.sqrt(), rtol=1e-5, atol=1e-5 * x0.abs().max())
        torch.testing.assert_close(a.sqrt() * x0 + (1 - a).sqrt() * eps, z, rtol=0, atol=1e-5)


def test_draw_slices_one_global_batch():
    """N ranks x batch b draw exactly what one process draws with batch N*b, ranks get distinct noise, and every
    epoch visits each prompt once."""
    def fake_run(world, rank, b):
        args = argparse.Namespace(seed=3, train_batch_size=b, fake_updates=2)
        return argparse.Namespace(args=args, world=world, rank=rank, latent_shape=(4, 2, 2), pairs=dict(z=range(5)),
                                  prompts=[f"p{i}" for i in range(7)], device=torch.device("cpu"))
    for step in range(5):  # global batch 4 over 7 prompts: steps straddle epoch boundaries
        one = wadi.draw(fake_run(1, 0, 4), step)
        ranks = [wadi.draw(fake_run(2, r, 2), step) for r in range(2)]
        for key, v in one.items():
            dim = 1 if key in ("t_fake", "noise_fake", "drop") else 0
            assert torch.equal(torch.cat([r[key] for r in ranks], dim), v), key
        assert not torch.equal(ranks[0]["z"], ranks[1]["z"])
        assert ranks[0]["t"].min() >= 20 and ranks[0]["t"].max() <= 980
        assert one["noise_fake"].shape == (2, 4, 4, 2, 2) and 0 <= one["pair"].min() and one["pair"].max() < 5
    seen = torch.cat([wadi.draw(fake_run(1, 0, 7), s)["prompt"] for s in range(3)])  # 3 epochs of 7
    for e in range(3):
        assert sorted(seen[7 * e:7 * (e + 1)].tolist()) == list(range(7))
    assert not torch.equal(seen[:7], seen[7:14])  # a fresh permutation per epoch


def test_adapter_init_depends_on_seed_only(tmp_path):
    """All ranks must start from the same angles (nothing broadcasts them), whatever the process did before."""
    torch.manual_seed(123)
    a = lorad_state_dict(make_run(tmp_path).student)
    torch.rand(1000)  # consume global randomness, as building the tiny pipeline in this process would
    b = lorad_state_dict(make_run(tmp_path).student)
    c = lorad_state_dict(make_run(tmp_path, "--seed", "1").student)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if k.endswith("theta_b"))


# -----------------------------------------------------------------------------
# the VSD step


def test_vsd_gradient_is_weighted_score_difference(tmp_path):
    """d loss_vsd / d x0 = (1 - abar_t)(eps_real - eps_fake) / numel, with both scores guided by CFG (eq. 11)."""
    run = make_run(tmp_path)
    set_fake_angles(run)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, *run.latent_shape, generator=g).requires_grad_()
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([50, 900])
    cond = wadi.encode(run, ["a red fox", "a blue car"])
    uncond = run.null_emb.expand_as(cond)
    # the step's own pieces: the forward process, both guided scores, eq. 11's surrogate
    x_t = wadi.diffuse(x0.detach(), t, noise, run.abar)
    with torch.no_grad():
        eps_real = wadi.guided_eps(run.teacher, x_t, t, cond, uncond, run.args.guidance_scale)
        eps_fake = wadi.guided_eps(run.fake, x_t, t, cond, uncond, run.args.guidance_scale)
    loss = wadi.vsd_loss(x0, eps_real, eps_fake, run.abar[t])
    loss.backward()
    # independently: separate cond/uncond UNet calls, CFG by hand, the closed-form schedule
    a = abar_closed_form()[t].float().view(-1, 1, 1, 1)
    s = run.args.guidance_scale
    assert s == 1.5
    with torch.no_grad():
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise

        def guided(unet):
            eps_c, eps_u = unet(x_t, t, cond).sample, unet(x_t, t, uncond).sample
            return eps_u + s * (eps_c - eps_u)
        diff = guided(run.teacher) - guided(run.fake)
    expected = (1 - a) * diff / x0.numel()
    assert diff.abs().max() > 1e-3  # the fake model really differs from the teacher
    # batched vs separate UNet calls and fp32 vs fp64 abar differ by rounding only (~1e-6 relative)
    torch.testing.assert_close(x0.grad, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # the surrogate's value: 0.5 * mean(grad^2)
    assert loss.item() == pytest.approx(0.5 * ((1 - a) * diff).pow(2).mean().item(), rel=1e-4)


def test_vsd_gradient_of_an_overflowed_score_is_not_finite():
    """A score that overflowed (inf) leaves its entry of the gradient non-finite, so that update skips the step and
    main counts it; not turned into a finite 3.4e38 / numel that the step would clip and take. The other entries
    are eq. 11's (1 - abar_t)(eps_real - eps_fake) / numel."""
    g = torch.Generator().manual_seed(0)
    x0, eps_real, eps_fake = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    eps_real[0, 1, 2, 3], abar_t = math.inf, torch.tensor([0.3, 0.8])
    x0.requires_grad_()
    wadi.vsd_loss(x0, eps_real, eps_fake, abar_t).backward()
    finite = x0.grad.isfinite()
    assert finite.sum() == x0.numel() - 1 and not finite[0, 1, 2, 3]
    expected = (1 - abar_t.view(-1, 1, 1, 1)) * (eps_real - eps_fake) / x0.numel()
    torch.testing.assert_close(x0.grad[finite], expected[finite])


def test_train_step_changes_only_adapters(tmp_path):
    """Step 1: the fake model equals the teacher (theta_a = 0 is an exact identity rotation), so eps_real ==
    eps_fake bitwise, the VSD gradient is exactly 0 and AdamW (no weight decay) leaves the student unchanged,
    while the fake model learns (its theta_a; theta_b's gradient theta_a^T dL/dtheta is still 0). Step 2: the
    fake model now differs, so the student's theta_a moves. Nothing frozen moves, bitwise, in either step."""
    run = make_run(tmp_path)
    frozen = frozen_tensors(run)
    frozen_before = clone(frozen)
    s0, f0 = clone(lorad_state_dict(run.student)), clone(lorad_state_dict(run.fake))

    logs = wadi.train_step(run, 0)
    assert logs["loss_vsd"] == 0 and logs["grad_norm_student"] == 0
    s1, f1 = clone(lorad_state_dict(run.student)), clone(lorad_state_dict(run.fake))
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    for k in f0:
        assert torch.equal(f0[k], f1[k]) != k.endswith(".theta_a"), k  # every theta_a moved, no theta_b did

    logs = wadi.train_step(run, 1)
    assert logs["loss_vsd"] > 0 and logs["grad_norm_student"] > 0
    s2 = lorad_state_dict(run.student)
    for k in s0:
        assert torch.equal(s1[k], s2[k]) != k.endswith(".theta_a"), k

    for k, t in frozen.items():
        assert torch.equal(t, frozen_before[k]), k
    for model in (run.teacher, run.vae, run.text_encoder):
        assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_compiled_step_equals_eager(tmp_path, monkeypatch):
    """--compile: the three UNets under torch.compile, gradient checkpointing on, against the same run in eager mode
    over 3 steps: losses, gradient norms and every angle. The compiled graphs are built by dynamo and AOTAutograd
    (forward and backward, LoRaD's autograd Function traced) and run with the aot_eager backend: inductor's code
    generation takes minutes on two CPU cores, so the test keeps to the capture, which is where compiling can change
    what the step computes. The rotation runs in its real form there (inductor has no complex kernels)."""
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda m, **kw: compile_(m, **{**kw, "backend": "aot_eager"}))
    torch._dynamo.reset()
    flags = ("--gradient_checkpointing", "--student_rank", "8", "--fake_rank", "4")
    eager, compiled = make_run(tmp_path / "e", *flags), make_run(tmp_path / "c", *flags, "--compile")
    assert compiled.student._compiled_call_impl is not None and eager.student._compiled_call_impl is None
    for step in range(3):
        logs_e, logs_c = wadi.train_step(eager, step), wadi.train_step(compiled, step)
        for k in logs_e:  # vsd is 0 at step 0 (the fake equals the teacher): compare with an absolute floor
            assert logs_c[k] == pytest.approx(logs_e[k], rel=1e-4, abs=1e-7), (step, k, logs_e, logs_c)
    # the angles, to a tenth of one Adam step (lr 1e-4): Adam's normalised step turns the rounding of a gradient
    # entry near 0 into a visible difference of its update
    for a, b in zip(eager.student_params + eager.fake_params, compiled.student_params + compiled.fake_params):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    moved = max((p - p0).abs().max().item() for p, p0 in zip(eager.student_params, make_run(tmp_path / "f", *flags).student_params))
    assert moved > 1e-4  # the angles did train: the equality above is not of two untouched models


def test_ema_follows_the_student_angles(tmp_path):
    """--ema_decay d: after each step ema <- d * ema + (1 - d) * student, on the angles alone (shared base)."""
    run = make_run(tmp_path, "--ema_decay", "0.75", "--learning_rate", "1e-2")
    set_fake_angles(run)  # so the student moves at its first step
    ema = clone(lorad_state_dict(run.ema))
    assert tensors_equal(ema, clone(lorad_state_dict(run.student)))  # starts as the student
    for step in range(2):
        wadi.train_step(run, step)
        student = lorad_state_dict(run.student)
        ema = {k: 0.75 * v + 0.25 * student[k] for k, v in ema.items()}
        for k, v in lorad_state_dict(run.ema).items():
            torch.testing.assert_close(v, ema[k], rtol=1e-6, atol=1e-7)
    assert not tensors_equal(ema, clone(lorad_state_dict(run.student)))
    assert {p.data_ptr() for p in run.ema.parameters() if not p.requires_grad} >= {p.data_ptr() for p in run.teacher.parameters()}


def test_one_copy_of_base_weights(tmp_path):
    run = make_run(tmp_path)
    storages = {}
    for model in (run.teacher, run.student, run.fake):
        for p in model.parameters():
            storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    nbytes = lambda params: sum(p.numel() * p.element_size() for p in params)
    teacher, adapters = nbytes(run.teacher.parameters()), nbytes(run.student_params + run.fake_params)
    assert sum(storages.values()) == teacher + adapters
    # and the adapters are the only trainable tensors: the base weights are the teacher's own Parameters
    teacher_ids = {id(p) for p in run.teacher.parameters()}
    for model in (run.student, run.fake):
        for name, p in model.named_parameters():
            assert (id(p) in teacher_ids) != name.endswith((".theta_a", ".theta_b")), name
    assert {id(p) for p in run.student_params + run.fake_params} == \
           {id(p) for m in (run.student, run.fake) for n, p in m.named_parameters() if "theta" in n}


def test_fake_loss_falls_on_a_fixed_batch(tmp_path):
    run = make_run(tmp_path)
    g = torch.Generator().manual_seed(0)
    cond = wadi.encode(run, ["a red fox", "a blue car"])
    with torch.no_grad():
        x0 = wadi.one_step(run.student, torch.randn(2, *run.latent_shape, generator=g), cond, run.abar)
    t, noise = torch.tensor([100, 400]), torch.randn(x0.shape, generator=g)
    # eq. 12 with the abar_t weighting, by hand, on the untrained fake model (= the teacher)
    a = abar_closed_form()[t].float().view(-1, 1, 1, 1)
    with torch.no_grad():
        eps = run.teacher(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond).sample
    losses = [wadi.fake_loss(run.fake, x0, t, noise, cond, run.abar)]
    assert losses[0].item() == pytest.approx((a * (eps - noise) ** 2).mean().item(), rel=1e-4)
    unweighted = wadi.fake_loss(run.fake, x0, t, noise, cond, run.abar, weighted=False)  # eq. 12 as the paper prints it
    assert unweighted.item() == pytest.approx(((eps - noise) ** 2).mean().item(), rel=1e-4)
    for _ in range(50):  # Adam at the fake lr 1e-2: the loss halves after ~40 steps on this batch
        wadi.update(losses[-1], run.fake_params, run.opt_f, run.scaler_f, 1)
        losses.append(wadi.fake_loss(run.fake, x0, t, noise, cond, run.abar))
    assert losses[-1].item() < 0.5 * losses[0].item(), [round(x.item(), 4) for x in losses]


def test_linear_lr_schedule_anneals_the_student_alone(tmp_path):
    """--lr_schedule linear: step k of n runs the student at lr (1 - k/n), a function of the step alone (so a resume
    anneals alike); the fake's lr stays constant. The lr is the one Adam used: at step 0 the fake is the teacher, so
    the VSD gradient is exactly 0; step 1 then moves each angle by lr_1 * (0.1 / 0.19) / sqrt(0.001 / 0.001999)."""
    run = make_run(tmp_path, "--lr_schedule", "linear", "--max_train_steps", "4", "--learning_rate", "1e-3")
    used, moved = [], []
    for step in range(4):
        before = clone(lorad_state_dict(run.student))
        wadi.train_step(run, step)
        used.append(run.opt_s.param_groups[0]["lr"])
        moved.append(max((v - before[k]).abs().max().item() for k, v in lorad_state_dict(run.student).items()))
        assert run.opt_f.param_groups[0]["lr"] == 1e-2
    assert used == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    assert moved[0] == 0 and moved[1] == pytest.approx(0.75e-3 * (0.1 / 0.19) / math.sqrt(0.001 / 0.001999), rel=2e-2)


# -----------------------------------------------------------------------------
# non-finite losses


def nan_student(monkeypatch, first_bad_step):
    """From `first_bad_step` on, the student's one-step sample is NaN (as a diverged generator's would be)."""
    current, one_step, train_step = {}, wadi.one_step, wadi.train_step

    def patched_train_step(run, step):
        current["step"] = step
        return train_step(run, step)

    def patched_one_step(*args):
        x0 = one_step(*args)
        return x0 * float("nan") if current.get("step", -1) >= first_bad_step else x0
    monkeypatch.setattr(wadi, "train_step", patched_train_step)
    monkeypatch.setattr(wadi, "one_step", patched_one_step)


def test_nan_step_is_skipped(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    wadi.train_step(run, 0)
    wadi.train_step(run, 1)  # now both optimizers hold state
    before = clone({**{f"s.{k}": v for k, v in lorad_state_dict(run.student).items()},
                    **{f"f.{k}": v for k, v in lorad_state_dict(run.fake).items()}})
    opt_before = [clone(st) for o in (run.opt_s, run.opt_f) for st in o.state.values()]
    nan_student(monkeypatch, first_bad_step=2)
    logs = wadi.train_step(run, 2)
    assert not math.isfinite(logs["grad_norm_student"]) and not math.isfinite(logs["grad_norm_fake"])
    after = {**{f"s.{k}": v for k, v in lorad_state_dict(run.student).items()},
             **{f"f.{k}": v for k, v in lorad_state_dict(run.fake).items()}}
    assert all(torch.equal(before[k], after[k]) for k in before)
    opt_after = [st for o in (run.opt_s, run.opt_f) for st in o.state.values()]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(opt_before, opt_after) for k in a)


def test_ten_nan_steps_stop_the_run(tmp_path, monkeypatch):
    out = tmp_path / "out"
    nan_student(monkeypatch, first_bad_step=2)  # steps 1-2 fine, 3-12 NaN
    with pytest.raises(wadi.UserError, match=r"10 steps in a row .*step 12.*checkpoint-10"):
        wadi.main(["--pretrained_model_name_or_path", "tiny", "--prompts", PROMPTS, "--output_dir", str(out),
                   "--train_batch_size", "1", "--resolution", "32", "--max_train_steps", "30",
                   "--checkpointing_steps", "2", "--validation_steps", "1000", "--student_rank", "8"])
    lines = (out / "log.jsonl").read_text().splitlines()

    def no_nan(c):
        raise ValueError(f"{c} in log.jsonl is not JSON")
    logs = [json.loads(line, parse_constant=no_nan) for line in lines]  # strict JSON, as jq would read it
    assert [r["step"] for r in logs] == list(range(1, 12))  # step 12 raised before logging
    assert [r["skipped"] for r in logs] == [0, 0] + list(range(1, 10))
    assert all(r["grad_norm_student"] is None for r in logs[2:])
    # the checkpoints written during the NaN streak hold the last good angles, intact and finite
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-10", "checkpoint-2", "checkpoint-4", "checkpoint-6",
                                                     "checkpoint-8", "log.jsonl", "samples"]
    for name in ("student", "fake"):
        good, last = (load_file(out / f"checkpoint-{s}" / f"{name}_lorad.safetensors") for s in (2, 10))
        assert good.keys() == last.keys() and all(torch.equal(good[k], last[k]) for k in good)
        assert all(torch.isfinite(v).all() for v in last.values())
    state = torch.load(out / "checkpoint-10" / "state.pt", weights_only=True)
    assert state["step"] == 10 and state["skipped"] == 8


@pytest.mark.parametrize("fp16", [False, True])
def test_overflowing_gradient_norm_skips_the_step(fp16):
    """Finite gradients whose norm overflows (1e20 each: their sum of squares is inf in fp32) skip the step, as main
    counts it (a non-finite norm): the parameters and AdamW's state unchanged, without GradScaler or with it (fp16).
    The scaler's own check sees finite gradients; clipped by an infinite norm they are 0, and AdamW's momentum moves
    the parameters all the same."""
    params = [torch.nn.Parameter(torch.randn(100, generator=torch.Generator().manual_seed(0)))]
    opt, scaler = torch.optim.AdamW(params, lr=0.1, fused=True), torch.amp.GradScaler("cpu", enabled=fp16)
    assert math.isfinite(wadi.update(params[0].sum(), params, opt, scaler, 1))  # a first step: AdamW has momentum
    before = clone({"param": params[0], **opt.state[params[0]]})
    assert not math.isfinite(wadi.update(1e20 * params[0].sum(), params, opt, scaler, 1))
    assert tensors_equal(before, clone({"param": params[0], **opt.state[params[0]]}))


# -----------------------------------------------------------------------------
# DMD's regression onto the teacher's multi-step samples (--regression_pairs), off by default


def save_pairs(path, n, shape, prompts, seed=0, **override):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    tensors = dict(z=torch.randn(n, *shape, generator=g), x0=torch.randn(n, *shape, generator=g))
    tensors.update(override)
    save_file(tensors, str(path), {"prompts": json.dumps(prompts)})


def test_regression_loss_is_lambda_times_mse_to_the_pairs(tmp_path, monkeypatch):
    """--regression_pairs FILE: the student's loss adds --regression_weight x MSE(one_step(student, z_i, its prompt),
    x0_i) over pairs i drawn per step. At step 1 the VSD loss is exactly 0 (the fake equals the teacher), so the loss
    the student steps on is that term alone, recomputed here from the file."""
    pairs = tmp_path / "pairs.safetensors"
    prompts = ["a red fox", "a blue car", "a green tree", "a yellow moon", "a cat"]
    save_pairs(pairs, 5, (4, 4, 4), prompts)
    run = make_run(tmp_path, "--student_rank", "4", "--fake_rank", "4", "--regression_pairs", str(pairs),
                   "--regression_weight", "0.3")
    losses, update = [], wadi.update
    monkeypatch.setattr(wadi, "update", lambda loss, *a: losses.append(loss.item()) or update(loss, *a))
    d = wadi.draw(run, 0)
    with torch.no_grad():
        z, x0 = load_file(pairs)["z"][d["pair"]], load_file(pairs)["x0"][d["pair"]]
        mine = wadi.one_step(run.student, z, wadi.encode(run, [prompts[i] for i in d["pair"].tolist()]), run.abar)
    logs = wadi.train_step(run, 0)
    assert logs["loss_vsd"] == 0 and d["pair"].max() < 5
    assert losses[0] == pytest.approx(0.3 * torch.nn.functional.mse_loss(mine, x0).item(), rel=1e-5)
    assert logs["grad_norm_student"] > 0  # the regression alone moves the student at step 1


# -----------------------------------------------------------------------------
# every adapter and the regression through the whole run: resume is bitwise, the export reproduces the trainer


def run_main(out, *flags, steps=2):
    wadi.main(["--pretrained_model_name_or_path", "tiny", "--prompts", PROMPTS, "--output_dir", str(out),
               "--train_batch_size", "2", "--resolution", "32", "--max_train_steps", str(steps),
               "--checkpointing_steps", "1", "--validation_steps", "1000", "--validation_prompts", "a red fox",
               "--learning_rate", "1e-2", *flags])


def test_last_step_is_checkpointed_and_rendered_once(tmp_path, monkeypatch):
    """Every --checkpointing_steps and at the last step, so that a run extended later (latest, a larger
    --max_train_steps) redoes no step; each checkpoint and each validation grid made once, the last step's too; and
    log.jsonl closed (an unclosed file warns when it is collected)."""
    saved, rendered, save, validate = [], [], wadi.save_checkpoint, wadi.validate
    monkeypatch.setattr(wadi, "save_checkpoint", lambda run, step: saved.append(step) or save(run, step))
    monkeypatch.setattr(wadi, "validate", lambda run, step: rendered.append(step) or validate(run, step))
    flags = ["--student_rank", "4", "--fake_rank", "4", "--checkpointing_steps", "2", "--validation_steps", "3"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        run_main(tmp_path / "out", *flags, steps=3)
        run_main(tmp_path / "out", *flags, "--resume_from_checkpoint", "latest", steps=4)  # resumes from the last step
        gc.collect()
    assert saved == [2, 3, 4] and rendered == [3, 4]
    assert not [w for w in caught if "log.jsonl" in str(w.message)]  # the log was closed, by every run


def pairs_from_docs(tmp_path, tiny):
    """The pairs maker of docs/remedies.md, run as written on the tiny model at 32 px (4 prompts)."""
    (code,) = [b for b in readme_blocks("python", "docs/remedies.md") if "save_file" in b]
    line = next(line for line in code.splitlines() if line.startswith("model, prompts_file, n, resolution, out = "))
    out = tmp_path / "pairs.safetensors"
    exec(code.replace(line, f"model, prompts_file, n, resolution, out = {tiny!r}, {PROMPTS!r}, 4, 32, {str(out)!r}"), {})
    return out


@pytest.mark.parametrize("variant", ["lora", "dora", "full", "regression"])
def test_variant_resumes_bitwise_and_exports(variant, tmp_path, tiny):
    """A 2-step run against 1 step then resumed to 2, with an EMA: every checkpoint file equal bitwise. The export
    loads in stock diffusers and its one-step sample equals the trainer's own generator (the EMA, from the
    checkpoint, through wadi.one_step), which differs from the teacher's. 'regression': LoRaD with DMD's regression
    onto the docs' pairs and 2 fake updates a step."""
    from diffusers import StableDiffusionPipeline
    flags = ["--student_rank", "4", "--fake_rank", "4", "--ema_decay", "0.5"]
    flags += (["--fake_updates", "2", "--regression_pairs", str(pairs_from_docs(tmp_path, tiny))]
              if variant == "regression" else ["--adapter", variant])
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_main(full, *flags)
    run_main(resumed, *flags, steps=1)
    run_main(resumed, *flags, "--resume_from_checkpoint", "latest")
    adapter = "lorad" if variant == "regression" else variant
    files = sorted(os.listdir(full / "checkpoint-2"))
    assert files == sorted(["state.pt", "fake_lorad.safetensors", f"student_{adapter}.safetensors",
                            f"ema_{adapter}.safetensors"]) == sorted(os.listdir(resumed / "checkpoint-2"))
    for f in [f for f in files if f.endswith(".safetensors")]:
        assert tensors_equal(load_file(full / "checkpoint-2" / f), load_file(resumed / "checkpoint-2" / f)), f
    run = make_run(tmp_path / "check", *flags, "--resume_from_checkpoint", str(full / "checkpoint-2"))
    wadi.load_checkpoint(run, run.resume)
    pipe = StableDiffusionPipeline.from_pretrained(full / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert not any("lora" in k or "theta" in k for k in pipe.unet.state_dict())  # a stock UNet
    z, emb = torch.randn(1, *run.latent_shape, generator=torch.Generator().manual_seed(3)), wadi.encode(run, ["a red fox"])
    with torch.no_grad():
        ours, teacher = (wadi.one_step(m, z, emb, run.abar) for m in (run.ema, run.teacher))
        theirs = pipe(prompt_embeds=emb, latents=z, height=32, width=32, num_inference_steps=1, guidance_scale=0,
                      output_type="latent").images
    tol = 1e-5 * ours.abs().max().item()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=tol)
    assert (ours - teacher).abs().max() > 100 * tol


# -----------------------------------------------------------------------------
# the CLI end to end, in a few shared subprocess runs (full_run: conftest.py)


@in_background
def resumed_run(tmp, env):
    """The same run, stopped after 2 steps (and exported), then resumed from its latest checkpoint to 4."""
    cli(tmp / "out", STEPS // 2, env)
    r = cli(tmp / "out", STEPS, env, "--resume_from_checkpoint", "latest")
    return tmp / "out", r.stdout


DDP_WRAPPER = """
# Runs wadi.py as __main__ under torchrun, unchanged, and afterwards dumps every rank's own adapters: wadi.py
# saves on rank 0 only. The spy records the two models that wadi.setup gives adapters (student, then fake).
import os, runpy, sys
sys.path.insert(0, {here!r})
import lorad
from safetensors.torch import save_file
models, add_lorad = [], lorad.add_lorad
def spy(model, *args, **kwargs):
    models.append(model)
    return add_lorad(model, *args, **kwargs)
lorad.add_lorad = spy
sys.argv = [{wadi!r}, *sys.argv[1:]]
runpy.run_path({wadi!r}, run_name="__main__")
student, fake = models[:2]  # rank 0's export adds a third
dump = {{**{{"student." + k: v for k, v in lorad.lorad_state_dict(student).items()}},
         **{{"fake." + k: v for k, v in lorad.lorad_state_dict(fake).items()}}}}
save_file(dump, os.path.join(os.environ["DUMP_DIR"], "rank%s.safetensors" % os.environ["RANK"]))
"""


@in_background
def ddp_run(tmp, env):
    """Two CPU processes (gloo), batch 1 each: the same global batch as full_run."""
    script = tmp / "ddp_wrapper.py"
    script.write_text(DDP_WRAPPER.format(here=HERE, wadi=WADI))
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    cli(tmp / "out", STEPS, {**env, "DUMP_DIR": str(tmp)}, batch=1, launcher=launcher, script=str(script))
    return tmp


def tensors_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_writes_its_outputs(full_run):
    out = full_run
    assert sorted(os.listdir(out)) == ["checkpoint-3", "checkpoint-4", "log.jsonl", "pipeline", "samples",
                                       "student_lorad.safetensors"]  # checkpoints 1, 2 pruned; no .tmp left over
    assert sorted(os.listdir(out / "checkpoint-4")) == ["fake_lorad.safetensors", "state.pt",
                                                        "student_lorad.safetensors"]
    # samples: one row of 64 px images, one per validation prompt, at step 2 and at the end
    from PIL import Image
    assert sorted(os.listdir(out / "samples")) == ["step-000002.png", "step-000004.png"]
    with Image.open(out / "samples" / "step-000004.png") as im:
        assert im.size == (2 * 64, 64) and im.mode == "RGB"
    # log.jsonl: one strict-JSON line per step
    logs = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))
            for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    for r in logs:
        assert {"loss_vsd", "loss_fake", "grad_norm_student", "grad_norm_fake", "lr", "fake_lr", "sec_per_step",
                "img_per_sec", "peak_mem_gib", "skipped"} <= r.keys()
        assert r["lr"] == 1e-2 and r["fake_lr"] == 1e-2 and r["skipped"] == 0
        assert all(math.isfinite(v) for v in r.values())
    assert logs[0]["loss_vsd"] == 0 and logs[-1]["loss_vsd"] > 0  # fake == teacher at step 1 only
    # the exported adapter: angles only, the student's rank, the final checkpoint's student
    angles = load_file(out / "student_lorad.safetensors")
    assert angles and all(k.endswith((".theta_a", ".theta_b")) for k in angles)
    assert {k[:-len(".theta_a")] for k in angles if k.endswith("a")} == \
           {k[:-len(".theta_b")] for k in angles if k.endswith("b")}
    assert all(v.shape[-1 if k.endswith("a") else 0] == STUDENT_RANK for k, v in angles.items())
    assert tensors_equal(angles, load_file(out / "checkpoint-4" / "student_lorad.safetensors"))
    assert any(v.abs().max() > 0 for k, v in angles.items() if k.endswith("theta_a"))  # it trained
    # the pipeline: stock keys (merged, no angles), a one-step scheduler that does not clip x0
    unet = load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert not any("theta" in k for k in unet)
    sched = json.loads((out / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["timestep_spacing"] == "trailing" and sched["clip_sample"] is False
    # its model card, as a Hub user loads it: the base model given, the command, the final samples, a snippet that runs
    from huggingface_hub import ModelCard
    card = ModelCard.load(out / "pipeline" / "README.md")
    assert (card.data.base_model, card.data.license) == ("tiny", "creativeml-openrail-m")
    assert {"text-to-image", "one-step", "wadi", "diffusers"} <= set(card.data.tags)
    assert f"--output_dir {out} --train_batch_size 2 --max_train_steps 4`: 4 steps, global batch 2;" in card.text
    assert "](samples.png)" in card.text
    assert (out / "pipeline" / "samples.png").read_bytes() == (out / "samples" / "step-000004.png").read_bytes()
    (snippet,) = re.findall(r"```python\n(.*?)```", card.text, re.S)
    exec(compile(snippet, "pipeline/README.md", "exec"), scope := {})
    assert scope["image"].size == (64, 64)
    assert torch.load(out / "checkpoint-4" / "state.pt", weights_only=True)["step"] == 4


def test_resume_is_bitwise_identical(full_run, resumed_run):
    out, stdout = resumed_run
    assert "resumed" in stdout and "checkpoint-2" in stdout
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-4"]
    for name in ("student", "fake"):
        a = load_file(full_run / "checkpoint-4" / f"{name}_lorad.safetensors")
        b = load_file(out / "checkpoint-4" / f"{name}_lorad.safetensors")
        assert tensors_equal(a, b), name
    assert tensors_equal(*(load_file(d / "student_lorad.safetensors") for d in (full_run, out)))
    full, resumed = ([json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()] for d in (full_run, out))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for r, s in zip(full, resumed):
        assert (r["loss_vsd"], r["loss_fake"], r["grad_norm_student"]) == (s["loss_vsd"], s["loss_fake"],
                                                                           s["grad_norm_student"])


def resume_copy(full_run, out, *flags, cut_log=False):
    """full_run's output as a kill while it wrote step 4 would leave it (no checkpoint-4; cut_log: step 4's line cut
    half-way, else whole), resumed here from checkpoint-3 to step 4. Returns the log and step 4's line as it was."""
    shutil.copytree(full_run, out, ignore=shutil.ignore_patterns("checkpoint-4"))
    lines = (out / "log.jsonl").read_text().splitlines(keepends=True)
    (out / "log.jsonl").write_text("".join(lines[:3]) + (lines[3][:len(lines[3]) // 2] if cut_log else lines[3]))
    wadi.main([*RUN_ARGS, "--output_dir", str(out), "--train_batch_size", "2", "--max_train_steps", str(STEPS),
               "--resume_from_checkpoint", "latest", *flags])
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()], json.loads(lines[3])


def test_resume_drops_a_half_written_log_line(full_run, tmp_path):
    """The cut line goes with the steps the resume redoes; step 4 is logged again, as it ran the first time."""
    logs, first = resume_copy(full_run, tmp_path / "out", cut_log=True)
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    assert (logs[3]["loss_vsd"], logs[3]["grad_norm_student"]) == (first["loss_vsd"], first["grad_norm_student"])


def test_resume_uses_the_learning_rates_given(full_run, tmp_path):
    """Flags given at resume hold, as logged: step 4 at a tenth of full_run's lrs moves the student's angles by a
    tenth of what it moved them in one go (AdamW's step: lr times a function of the same gradients)."""
    out = tmp_path / "out"
    logs, _ = resume_copy(full_run, out, "--learning_rate", "1e-3", "--fake_learning_rate", "1e-3")
    assert [(r["lr"], r["fake_lr"]) for r in logs] == [(1e-2, 1e-2)] * 3 + [(1e-3, 1e-3)]
    state = torch.load(out / "checkpoint-4" / "state.pt", weights_only=True)
    assert [state[k]["param_groups"][0]["lr"] for k in ("opt_s", "opt_f")] == [1e-3, 1e-3]
    before, one_go, resumed = (load_file(d / "student_lorad.safetensors")
                               for d in (full_run / "checkpoint-3", full_run / "checkpoint-4", out / "checkpoint-4"))
    for k in before:
        torch.testing.assert_close(resumed[k] - before[k], 0.1 * (one_go[k] - before[k]), rtol=0, atol=1e-6)
    assert max((one_go[k] - before[k]).abs().max() for k in before) > 1e-3


def test_resume_past_max_train_steps_is_refused(full_run, tmp_path):
    """A checkpoint at step 4 resumed with --max_train_steps 3: one error line, the folder as it was (an export would
    carry step 3's name on step 4's student)."""
    out = tmp_path / "out"
    shutil.copytree(full_run, out)
    before = snapshot(out)
    with pytest.raises(wadi.UserError, match="checkpoint-4 is at step 4, past --max_train_steps 3"):
        wadi.main([*RUN_ARGS, "--output_dir", str(out), "--train_batch_size", "2", "--max_train_steps", "3",
                   "--resume_from_checkpoint", "latest"])
    assert snapshot(out) == before


def test_two_processes_equal_one(full_run, ddp_run):
    """2 processes x batch 1 (gloo all-reduce of the gradients) against 1 process x batch 2, same global batch.

    Both ranks must hold the same angles bitwise (the same averaged gradient, the same optimizer arithmetic).
    Against one process it cannot be bitwise, nor 1e-6 close: the batch means and weight-gradient sums add in
    another order (~1e-7), the cancellation in eps_real - eps_fake right after the fake model's first step makes
    that ~1e-4 of the student's gradient (measured in process, no torch.distributed involved), and AdamW scales
    every element's step to ~lr whatever its size, while half of those gradient elements are below its eps = 1e-8,
    i.e. pure rounding. So the angles agree to a small fraction of one step (measured: max 1.8e-4 = 0.018 lr), and
    the student's trained theta_a (it starts at 0) to 5e-4 of its norm. A real mistake (shared or mis-sliced noise
    or prompts, unaveraged gradients) moves elements by whole steps; a sum instead of a mean, which AdamW would
    hide, doubles the logged gradient norms, which must agree to 1e-3 (measured 8e-5)."""
    ranks = [load_file(ddp_run / f"rank{r}.safetensors") for r in range(2)]
    assert tensors_equal(ranks[0], ranks[1])
    exported = {"student": load_file(ddp_run / "out" / "student_lorad.safetensors"),
                "fake": load_file(ddp_run / "out" / "checkpoint-4" / "fake_lorad.safetensors")}
    for name, angles in exported.items():  # the rank dumps are what rank 0 wrote
        assert tensors_equal(angles, {k[len(name) + 1:]: v for k, v in ranks[0].items() if k.startswith(name + ".")})
    single = {"student": load_file(full_run / "student_lorad.safetensors"),
              "fake": load_file(full_run / "checkpoint-4" / "fake_lorad.safetensors")}
    lr = 1e-2  # both learning rates in RUN_ARGS
    for name in single:
        a, b = exported[name], single[name]
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0.1 * lr, msg=lambda m: f"{name} {k}: {m}")
        trained = [k for k in a if k.endswith(".theta_a")]
        da, db = (torch.cat([t[k].flatten() for k in trained]) for t in (a, b))
        assert db.norm() > 0.5 * lr and (da - db).norm() < 5e-3 * db.norm(), name
    logs = [[json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
            for d in (full_run, ddp_run / "out")]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    for r, s in zip(*logs):
        for key in ("grad_norm_student", "grad_norm_fake"):
            assert s[key] == pytest.approx(r[key], rel=1e-3, abs=1e-12), (r["step"], key)


def test_exported_pipeline_reproduces_the_generator(full_run, tiny):
    """Stock diffusers, one step, no CFG, against wadi.one_step on a fresh LoRaD UNet with the exported angles."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    pipe = StableDiffusionPipeline.from_pretrained(full_run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red fox sitting in a snowy forest"
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        theirs = pipe(prompt, num_inference_steps=1, guidance_scale=0, latents=z.clone(), output_type="latent").images
        tokenizer = CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(tiny, subfolder="text_encoder")
        ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        emb = text_encoder(ids)[0]
        unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
        teacher = wadi.one_step(unet, z, emb, abar_closed_form().float())
        add_lorad(unet, STUDENT_RANK, **wadi.STUDENT_LAYERS)
        load_lorad(unet, load_file(full_run / "student_lorad.safetensors"))
        ours = wadi.one_step(unet, z, emb, abar_closed_form().float())
    assert theirs.dtype == torch.float32
    tol = 1e-5 * ours.abs().max().item()  # fp32 merge vs on-the-fly rotation, fp32 vs fp64 abar: ~1e-6
    torch.testing.assert_close(theirs, ours, rtol=0, atol=tol)
    assert (ours - teacher).abs().max() > 100 * tol  # the adapters matter at this tolerance


def test_readme_controlnet_in_one_step(full_run, tiny, tmp_path):
    """docs/controlnet.md's recipe on the exported pipeline, with a tiny ControlNet made from its UNet (the zero
    convolutions given random weights, as a trained ControlNet's are): one ControlNet and one UNet call, both at
    t = 999, and the latents are the trainer's x0 formula with the ControlNet's residuals in the UNet call. Prints
    the one-step pipeline's time against the multi-step one (the tiny teacher, 25 steps, CFG 7.5)."""
    import time
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(full_run / "pipeline", subfolder="unet"))
    with torch.no_grad():
        for zero_conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            zero_conv.weight.copy_(0.1 * torch.randn(zero_conv.weight.shape, generator=g))
    controlnet.save_pretrained(tmp_path / "controlnet")
    edges = torch.rand(64, 64, generator=g) > 0.9  # sparse white pixels on black, like an edge map
    Image.fromarray(edges.numpy().astype("uint8") * 255).convert("RGB").save(tmp_path / "edges.png")
    snippet = [b for b in readme_blocks("python", "docs/controlnet.md") if "StableDiffusionControlNetPipeline" in b][0]
    for old, new in [('"lllyasviel/sd-controlnet-canny"', tmp_path / "controlnet"),
                     ('"wadi-out/pipeline"', full_run / "pipeline"), ('"edges.png"', tmp_path / "edges.png"),
                     ('"shiba-edges.png"', tmp_path / "shiba-edges.png")]:
        assert old in snippet
        snippet = snippet.replace(old, repr(str(new)))
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert Image.open(tmp_path / "shiba-edges.png").size == (64, 64)

    pipe = scope["pipe"]
    pipe.set_progress_bar_config(disable=True)
    calls = []  # (model, timestep) of every call the pipeline makes
    hooks = [getattr(pipe, name).register_forward_pre_hook(
        lambda m, args, kwargs, name=name: calls.append((name, int(args[1]))), with_kwargs=True)
        for name in ("controlnet", "unet")]
    z = torch.randn(1, 4, 8, 8, generator=g)
    emb = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)  # any: passed through as it is
    with torch.no_grad():
        theirs = pipe(prompt_embeds=emb, image=scope["edges"], latents=z.clone(), num_inference_steps=1,
                      guidance_scale=0, output_type="latent").images
    for hook in hooks:
        hook.remove()
    assert calls == [("controlnet", 999), ("unet", 999)]
    cond = edges.float().expand(1, 3, 64, 64)  # the control image in [0, 1], as ControlNet takes it
    with torch.no_grad():
        down, mid = pipe.controlnet(z, 999, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)

        def controlled_unet(x, t, e):
            return pipe.unet(x, t, e, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        ours = wadi.one_step(controlled_unet, z, emb, abar_closed_form().float())
        uncontrolled = wadi.one_step(pipe.unet, z, emb, abar_closed_form().float())
    tol = 1e-5 * ours.abs().max().item()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=tol)
    assert (ours - uncontrolled).abs().max() > 100 * tol  # the ControlNet's residuals matter at this tolerance

    # the paper's -86% is a time ratio: whole pipeline calls (text encoder, steps, VAE decode), median of 3
    teacher = StableDiffusionControlNetPipeline.from_pretrained(tiny, controlnet=pipe.controlnet)
    teacher.set_progress_bar_config(disable=True)

    def seconds(p, **kwargs):
        times = []
        for _ in range(4):  # the first is a warm-up
            start = time.perf_counter()
            p("a red fox", image=scope["edges"], generator=torch.Generator().manual_seed(0), **kwargs)
            times.append(time.perf_counter() - start)
        return sorted(times[1:])[1]
    one, many = seconds(pipe, num_inference_steps=1, guidance_scale=0), seconds(teacher, num_inference_steps=25)
    print(f"\nControlNet pipeline, tiny model, 64 px, CPU: 1 step {one * 1e3:.1f} ms, 25 steps with CFG 7.5 "
          f"{many * 1e3:.1f} ms: {100 * (one / many - 1):+.0f}% time (paper, SD1.5: -86%)")


# -----------------------------------------------------------------------------
# bad inputs: one line on stderr, non-zero exit, nothing written


def snapshot(path):
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def bad_input(case, tmp, tiny):
    """Arguments for a run that must fail, and the output dir it must leave alone."""
    out = tmp / "out"
    args = ["--pretrained_model_name_or_path", "tiny", "--prompts", PROMPTS, "--output_dir", str(out),
            "--max_train_steps", "1", "--train_batch_size", "1"]  # if it does not fail, at least it is short
    if case == "missing_prompts":
        return args + ["--prompts", str(tmp / "nope.txt")], out
    if case == "empty_prompts":
        (tmp / "empty.txt").write_text("\n   \n\t\n\n")
        return args + ["--prompts", str(tmp / "empty.txt")], out
    if case == "non_utf8_prompts":
        (tmp / "latin1.txt").write_bytes("a caf\u00e9 in paris\n".encode("latin-1"))
        return args + ["--prompts", str(tmp / "latin1.txt")], out
    if case == "model_path_missing":
        return args + ["--pretrained_model_name_or_path", str(tmp / "no" / "such" / "model")], out
    if case == "model_not_diffusers":
        (tmp / "folder").mkdir()
        (tmp / "folder" / "README.md").write_text("not a model\n")
        return args + ["--pretrained_model_name_or_path", str(tmp / "folder")], out
    if case == "v_prediction":
        shutil.copytree(tiny, tmp / "vpred")
        cfg = tmp / "vpred" / "scheduler" / "scheduler_config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "prediction_type": "v_prediction"}))
        return args + ["--pretrained_model_name_or_path", str(tmp / "vpred")], out
    if case == "resolution_not_multiple_of_8":
        return args + ["--resolution", "60"], out
    if case == "student_rank_0":
        return args + ["--student_rank", "0"], out
    if case == "fake_rank_negative":
        return args + ["--fake_rank", "-1"], out
    if case == "resume_missing":
        return args + ["--resume_from_checkpoint", str(tmp / "checkpoint-7")], out
    if case == "output_dir_is_a_file":
        out.write_text("notes\n")
        return args, out
    if case == "output_dir_below_a_file":
        out.write_text("notes\n")
        return args + ["--output_dir", str(out / "run")], out
    flag, value = {"learning_rate_negative": ("--learning_rate", "-1"), "learning_rate_inf": ("--learning_rate", "inf"),
                   "fake_learning_rate_negative": ("--fake_learning_rate", "-1"),
                   "guidance_scale_nan": ("--guidance_scale", "nan"),
                   "guidance_scale_negative": ("--guidance_scale", "-1"),
                   "ema_decay_nan": ("--ema_decay", "nan"), "seed_beyond_64_bits": ("--seed", str(2**64)),
                   "adapter_unknown": ("--adapter", "qlora"),
                   "regression_weight_without_pairs": ("--regression_weight", "1"),
                   "regression_pairs_missing": ("--regression_pairs", str(tmp / "no-pairs.safetensors")),
                   }.get(case, (None, None))
    if flag:
        return args + [flag, value], out
    if case == "regression_weight_negative":  # refused before the pairs are read
        return args + ["--regression_pairs", str(tmp / "pairs.safetensors"), "--regression_weight", "-1"], out
    if case.startswith("regression_pairs_"):  # a file that is not the pairs of this run (64 px: 8x8 latents)
        path, prompts = tmp / "pairs.safetensors", ["a", "b"]
        if case == "regression_pairs_not_safetensors":
            path.write_text("z, x0\n")
        elif case == "regression_pairs_wrong_shape":
            save_pairs(path, 2, (4, 4, 4), prompts)
        elif case == "regression_pairs_nan":
            save_pairs(path, 2, (4, 8, 8), prompts, x0=torch.full((2, 4, 8, 8), math.nan))
        elif case == "regression_pairs_fewer_prompts":
            save_pairs(path, 2, (4, 8, 8), prompts[:1])
        return args + ["--regression_pairs", str(path)], out
    if case == "latest_beside_a_finished_run":  # no checkpoint-* (all removed, or the run was short), its outputs kept
        (out / "pipeline").mkdir(parents=True)
        (out / "log.jsonl").write_text('{"step": 2}\n')
        return args + ["--resume_from_checkpoint", "latest"], out
    if case == "output_dir_has_checkpoints":
        (out / "checkpoint-2").mkdir(parents=True)
        (out / "checkpoint-2" / "state.pt").write_bytes(b"another run")
        (out / "log.jsonl").write_text('{"step": 2}\n')
        return args, out
    raise KeyError(case)


BAD_INPUTS = ["missing_prompts", "empty_prompts", "non_utf8_prompts", "model_path_missing", "model_not_diffusers",
              "v_prediction", "resolution_not_multiple_of_8", "student_rank_0", "fake_rank_negative", "resume_missing",
              "output_dir_has_checkpoints", "output_dir_is_a_file", "output_dir_below_a_file", "learning_rate_negative",
              "learning_rate_inf", "fake_learning_rate_negative", "guidance_scale_nan", "guidance_scale_negative",
              "ema_decay_nan", "seed_beyond_64_bits", "regression_weight_negative",
              "adapter_unknown", "regression_pairs_missing", "regression_pairs_not_safetensors",
              "regression_pairs_wrong_shape", "regression_pairs_nan", "regression_pairs_fewer_prompts",
              "latest_beside_a_finished_run", "regression_weight_without_pairs"]


def assert_one_error_line(code, err):
    assert code not in (0, None)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wadi: error: "), err


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_in_process(case, tmp_path, tiny, monkeypatch, capsys):
    """wadi.py's own __main__ block, run in this process (runpy): the CLI's code path without 5 s of imports."""
    argv, out = bad_input(case, tmp_path, tiny)
    before = snapshot(out)
    monkeypatch.setattr(sys, "argv", [WADI, *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        runpy.run_path(WADI, run_name="__main__")
    assert_one_error_line(e.value.code, capsys.readouterr().err)
    assert snapshot(out) == before


def test_trainable_tensors_per_adapter(tmp_path):
    """What each --adapter trains, counted in closed form over the student's 48 Linear layers (out x in each):
    LoRaD r (out + in/2), LoRA r (in + out), DoRA that plus out (its magnitudes), full: every UNet parameter. The
    base is shared with the teacher but for full fine-tuning, which trains a copy of its own in fp32."""
    run = make_run(tmp_path, "--student_rank", "4", "--fake_rank", "4")
    linears = [m for n, m in run.teacher.named_modules() if type(m) is torch.nn.Linear
               and any(s in n for s in wadi.STUDENT_LAYERS["include"])]
    assert len(linears) == 48
    expected = dict(lorad=sum(4 * (m.out_features + m.in_features // 2) for m in linears),
                    lora=sum(4 * (m.in_features + m.out_features) for m in linears),
                    dora=sum(4 * (m.in_features + m.out_features) + m.out_features for m in linears),
                    full=sum(p.numel() for p in run.teacher.parameters()))
    for adapter, n in expected.items():
        student = wadi.share_base(run.teacher, 4, wadi.STUDENT_LAYERS, adapter)
        own = wadi.own_tensors(student, run.teacher)
        assert sum(t.numel() for t in own.values()) == n, adapter
        assert sum(p.numel() for p in student.parameters() if p.requires_grad) == n, adapter  # and they alone train
        shared = {p.data_ptr() for p in run.teacher.parameters()} & {p.data_ptr() for p in student.parameters()}
        assert bool(shared) == (adapter != "full"), adapter


@pytest.mark.parametrize("mixed_precision", ["bf16", "fp16"])
def test_every_adapter_trains_in_mixed_precision(mixed_precision, tmp_path):
    """Every trained tensor, and the EMA's, in fp32 whatever the base's dtype (peft makes LoRA's and DoRA's in the
    base's: bf16 rounds Adam's steps of ~lr = 1e-4 away, and GradScaler cannot unscale fp16 gradients), and one step
    moves nearly every entry of each. The student starts from non-zero tensors (at init LoRA's B and LoRaD's theta_a
    are 0, which makes the other factor's gradient 0), the EMA equal to it; the fake differs from the teacher."""
    g = torch.Generator().manual_seed(0)
    for adapter in ("lorad", "lora", "dora", "full"):
        run = make_run(tmp_path / adapter, "--adapter", adapter, "--mixed_precision", mixed_precision, "--ema_decay",
                       "0.5", "--student_rank", "4", "--fake_rank", "4")
        set_fake_angles(run)
        with torch.no_grad():
            for p in run.student_params:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        wadi.load_own(run.ema, run.teacher, wadi.own_tensors(run.student, run.teacher))
        trained = run.student_params + run.fake_params + run.ema_params
        assert {t.dtype for t in trained} == {torch.float32}, adapter
        before = clone(dict(enumerate(trained)))
        wadi.train_step(run, 0)
        moved = [(t != before[i]).float().mean().item() for i, t in enumerate(trained)]
        assert min(moved) > 0.9, (adapter, sorted(moved)[:3])


BAD_CLI = ["missing_prompts", "v_prediction"]  # failing before the model loads, and while it loads


@in_background
def bad_cli_runs(tmp, env):
    runs = {}
    for case in BAD_CLI:
        (tmp / case).mkdir()
        argv, out = bad_input(case, tmp / case, tiny_pipeline())
        runs[case] = run_command([sys.executable, WADI, *argv], env), out
    return runs


@pytest.mark.parametrize("case", BAD_CLI)
def test_bad_input_cli(case, bad_cli_runs):
    """The real CLI in a subprocess: nothing else (library warnings, progress bars) reaches stderr."""
    r, out = bad_cli_runs[case]
    assert_one_error_line(r.returncode, r.stderr)
    assert "Traceback" not in r.stdout
    assert not out.exists()


# -----------------------------------------------------------------------------
# the README's commands, run as written (paths moved to a temporary folder), so they cannot rot


def readme_quick_start():
    commands = [line for b in readme_blocks("bash") for line in b.splitlines() if line.startswith("python wadi.py")]
    return [c for c in commands if "tiny" in c][0].split()


@in_background
def quick_start_run(tmp, env):
    quick = readme_quick_start()
    assert quick[quick.index("--output_dir") + 1] == "wadi-tiny"
    quick[quick.index("--output_dir") + 1] = str(tmp / "wadi-tiny")
    return run_command([sys.executable, *quick[1:]], env), tmp


def test_readme_quick_start_and_sampling_snippet(quick_start_run):
    """The quick start's training command end to end, then the README's diffusers snippet on what it wrote."""
    (r, tmp_path), quick = quick_start_run, readme_quick_start()
    assert r.returncode == 0, r.stderr[-3000:]
    # the start line the README shows, but for where the tiny model is cached; the others, but for their numbers
    shown = [b for b in readme_blocks("") if b.startswith("wadi: ~/.cache/wadi/tiny-sd |")][0].splitlines()
    first, *lines = r.stdout.splitlines()
    assert first.startswith("wadi: ") and first.split(" | ", 1)[1] == shown[0].split(" | ", 1)[1], r.stdout[-3000:]
    form = lambda line: re.sub(r"\d[\d.e+-]*", "#", line.rsplit(" | ", 1)[1] if line.startswith("wadi: done") else line)
    assert {form(line) for line in lines} == {form(line) for line in shown[1:]}, r.stdout[-3000:]
    steps = int(quick[quick.index("--max_train_steps") + 1])
    assert (tmp_path / "wadi-tiny" / "samples" / f"step-{steps:06d}.png").exists()  # where the README says
    assert os.listdir(tmp_path / "wadi-tiny" / f"checkpoint-{steps}")  # the last step's, whatever --checkpointing_steps
    snippet = [b for b in readme_blocks("python") if "StableDiffusionPipeline.from_pretrained" in b][0]
    snippet = snippet.replace('"wadi-out/pipeline"', repr(str(tmp_path / "wadi-tiny" / "pipeline")))
    snippet = snippet.replace('"shiba.png"', repr(str(tmp_path / "shiba.png")))
    exec(compile(snippet, "README.md", "exec"), {})
    from PIL import Image
    assert Image.open(tmp_path / "shiba.png").size == (64, 64)


def test_readme_journeydb_command(tmp_path):
    """JourneyDB annotations (one JSON object per image, with a prompt) -> one unique prompt per line."""
    command = [line for b in readme_blocks("bash") for line in b.splitlines() if "journeydb_prompts.txt" in line
               and line.startswith("python -c")][0]
    rows = [{"img_path": "a.jpg", "prompt": "a cat,  in  the rain\n"}, {"img_path": "b.jpg", "prompt": "a cat, in the rain"},
            {"img_path": "c.jpg", "prompt": "Ünïcode castle --ar 16:9"}]
    (tmp_path / "train_anno_realease_repath.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    subprocess.run(command, shell=True, check=True, cwd=tmp_path, timeout=60)
    assert wadi.read_prompts(str(tmp_path / "journeydb_prompts.txt")) == ["a cat, in the rain", "Ünïcode castle --ar 16:9"]


def test_train_sh_flags_parse():
    """train.sh's wadi.py flags are all ones wadi.py accepts, with the paper's values."""
    with open(os.path.join(HERE, "train.sh")) as f:
        body = f.read().split("--nproc_per_node 8 wadi.py", 1)[1].split('"$@"')[0]  # the command's flags
    argv = body.replace("\\\n", " ").replace('"$prompts"', "p.txt").split()
    args = wadi.parse_args(argv)
    assert (args.resolution, args.train_batch_size, args.learning_rate, args.fake_learning_rate) == (512, 16, 1e-4, 1e-2)
    assert (args.guidance_scale, args.student_rank, args.fake_rank, args.mixed_precision) == (1.5, 256, 32, "bf16")
    assert args.gradient_checkpointing and args.max_train_steps is None  # 2 epochs
