"""Tests for wadi.py: the VSD step against its closed forms, the shared base, and the CLI end to end.

    python -m pytest -q test_vsd.py       # CPU only, no network, about 2.5 minutes on 2 cores

Everything runs on the tiny SD-shaped pipeline that wadi.py builds for `--pretrained_model_name_or_path tiny`,
built once per session into a temporary WADI_CACHE. In-process tests call wadi's functions directly, on one core;
the CLI tests run `python wadi.py` (and torchrun) in a few shared subprocess runs of 2-4 steps, which go with the
README's commands and the benchmarks' on the second core (in_background).
"""
import argparse
import copy
import gc
import glob
import hashlib
import json
import math
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

import tiny as tiny_sd
from tiny import tiny_pipeline
import wadi
from benchmarks import plan, sd, toy, toy_problem, toy_table
from lorad import LoRaDLinear, add_lorad, load_lorad, lorad_state_dict

HERE = os.path.dirname(os.path.abspath(__file__))
WADI = os.path.join(HERE, "wadi.py")
PROMPTS = os.path.join(HERE, "prompts.txt")
TIMEOUT = 300  # seconds per subprocess: a hung run (e.g. a gloo rendezvous) fails instead of blocking


@pytest.fixture(scope="session", autouse=True)
def tiny(tmp_path_factory):
    """Build the tiny pipeline once, into a fresh cache that every test and subprocess shares. One thread: the
    tiny models are far too small to gain from a second one, and on 2 busy cores it only adds stalls."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WADI_CACHE", str(tmp_path_factory.mktemp("wadi-cache")))
        mp.setenv("OMP_NUM_THREADS", "1")  # for the subprocesses
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield tiny_pipeline()
        torch.set_num_threads(threads)


# The slow subprocess runs (the CLI, the README's commands, the benchmarks) go on the second core: each is a
# session fixture made by @in_background, and the session starts, one after another, those the selected tests use,
# while the in-process tests run here on the first core. A test that needs one waits for its result.
BACKGROUND, SECOND_CORE = {}, ThreadPoolExecutor(1)


def in_background(run):
    """run(tmp_dir, env) -> its result, as a session fixture of the same name, started early on the second core."""
    future = []

    def start(tmp_path_factory):  # called here, in the main thread: the folder and the environment are fixed now
        if not future:
            future.append(SECOND_CORE.submit(run, tmp_path_factory.mktemp(run.__name__), dict(os.environ)))
        return future[0]
    BACKGROUND[run.__name__] = start

    @pytest.fixture(scope="session", name=run.__name__)
    def fixture(tiny, tmp_path_factory):
        return start(tmp_path_factory).result()
    return fixture


@pytest.fixture(scope="session", autouse=True)
def start_background(tiny, request, tmp_path_factory):
    used = {name for item in request.session.items for name in item.fixturenames}
    for name, start in BACKGROUND.items():  # in the order they are defined, which is the order tests need them
        if name in used:
            start(tmp_path_factory)
    yield
    SECOND_CORE.shutdown(cancel_futures=True)


def abar_closed_form():
    """SD1.5's training schedule from its definition: scaled_linear betas, 1000 steps, in fp64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def make_run(tmp_path, *extra):
    """An in-process run on the tiny model, at 32 px (4x4 latents) to keep the steps cheap."""
    argv = ["--pretrained_model_name_or_path", "tiny", "--prompts", PROMPTS, "--output_dir", str(tmp_path / "out"),
            "--train_batch_size", "2", "--resolution", "32", *extra]
    return wadi.setup(wadi.parse_args(argv))


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
        args = argparse.Namespace(seed=3, train_batch_size=b, fake_updates=2, fresh_fake_samples=True)
        return argparse.Namespace(args=args, world=world, rank=rank, latent_shape=(4, 2, 2), pairs=dict(z=range(5)),
                                  prompts=[f"p{i}" for i in range(7)], device=torch.device("cpu"))
    for step in range(5):  # global batch 4 over 7 prompts: steps straddle epoch boundaries
        one = wadi.draw(fake_run(1, 0, 4), step)
        ranks = [wadi.draw(fake_run(2, r, 2), step) for r in range(2)]
        for key, v in one.items():
            dim = 1 if key in ("t_fake", "noise_fake", "drop", "z_fake") else 0
            assert torch.equal(torch.cat([r[key] for r in ranks], dim), v), key
        assert not torch.equal(ranks[0]["z"], ranks[1]["z"])
        assert ranks[0]["t"].min() >= 20 and ranks[0]["t"].max() <= 980
        assert one["z_fake"].shape == (2, 4, 4, 2, 2) and 0 <= one["pair"].min() and one["pair"].max() < 5
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
    loss = wadi.vsd_loss(x0, x_t, eps_real, eps_fake, run.abar[t])
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
    wadi.vsd_loss(x0, x0.detach(), eps_real, eps_fake, abar_t).backward()
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
# the remedies for VSD's drift between a prompt's modes (DMD, DMD2), each a flag, off by default


def test_dmd_weighting_is_the_x0_space_difference(tmp_path):
    """--vsd_weighting dmd: d loss / d x0 = (x0_fake - x0_real) / mean|x0 - x0_real| per sample / numel, with
    x0_real and x0_fake the teacher's and the fake's predictions of x0 at x_t (DMD's distribution matching gradient),
    against the paper's (1 - abar_t)(eps_real - eps_fake) / numel from the same scores."""
    g = torch.Generator().manual_seed(0)
    x0, noise, eps_real, eps_fake = (torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
    x0.requires_grad_()
    abar = abar_closed_form()
    t = torch.tensor([30, 500, 970])
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0.detach() + (1 - a).sqrt() * noise
    x0_real, x0_fake = ((x_t - (1 - a).sqrt() * e) / a.sqrt() for e in (eps_real, eps_fake))
    expected = (x0_fake - x0_real) / (x0.detach() - x0_real).abs().mean((1, 2, 3), keepdim=True) / x0.numel()
    wadi.vsd_loss(x0, x_t, eps_real, eps_fake, abar[t], "dmd").backward()
    torch.testing.assert_close(x0.grad, expected, rtol=1e-10, atol=0)
    x0.grad = None
    wadi.vsd_loss(x0, x_t, eps_real, eps_fake, abar[t]).backward()
    torch.testing.assert_close(x0.grad, (1 - a) * (eps_real - eps_fake) / x0.numel(), rtol=1e-10, atol=0)


def test_fake_guidance_scale_one_is_the_cond_score(tmp_path, monkeypatch):
    """--fake_guidance_scale 1: the fake's score is its conditional one alone (one UNet call of batch b), the
    teacher's still guided at --guidance_scale; by default the fake takes the teacher's scale (the authors')."""
    run = make_run(tmp_path, "--student_rank", "4", "--fake_rank", "4", "--fake_guidance_scale", "1")
    set_fake_angles(run)
    g = torch.Generator().manual_seed(1)
    x, t, cond = torch.randn(2, *run.latent_shape, generator=g), torch.tensor([100, 800]), wadi.encode(run, ["a", "b"])
    with torch.no_grad():
        torch.testing.assert_close(wadi.guided_eps(run.fake, x, t, cond, run.null_emb.expand_as(cond), 1.0),
                                   run.fake(x, t, cond).sample, rtol=0, atol=0)
    scales, guided_eps = [], wadi.guided_eps
    monkeypatch.setattr(wadi, "guided_eps", lambda unet, *a: scales.append((unet, a[-1])) or guided_eps(unet, *a))
    wadi.train_step(run, 0)
    assert scales == [(run.teacher, 1.5), (run.fake, 1.0)]
    assert wadi.parse_args(["--prompts", PROMPTS, "--guidance_scale", "3"]).fake_guidance_scale == 3


def test_fresh_fake_samples_come_from_the_updated_student(tmp_path, monkeypatch):
    """--fresh_fake_samples: fake update k learns on one_step(student after its update, z_fake[k]), new noise for
    each (DMD2's rule); without it, every fake update takes the step's own x0, made before the student's update."""
    seen, fake_loss = [], wadi.fake_loss
    monkeypatch.setattr(wadi, "fake_loss", lambda fake, x0, *a, **k: seen.append(x0.clone()) or fake_loss(fake, x0, *a, **k))
    for fresh in (True, False):
        run = make_run(tmp_path / str(fresh), "--student_rank", "4", "--fake_rank", "4", "--fake_updates", "2",
                       "--learning_rate", "1e-2", *(["--fresh_fake_samples"] if fresh else []))
        set_fake_angles(run)  # the student moves at its first step
        d = wadi.draw(run, 0)
        cond = wadi.encode(run, [run.prompts[i] for i in d["prompt"].tolist()])
        with torch.no_grad():
            before = wadi.one_step(run.student, d["z"], cond, run.abar)
        seen.clear()
        wadi.train_step(run, 0)
        with torch.no_grad():
            after = [wadi.one_step(run.student, z, cond, run.abar) for z in d["z_fake"]]
        if fresh:
            assert d["z_fake"].shape == (2, 2, *run.latent_shape) and not torch.equal(d["z_fake"][0], d["z_fake"][1])
            for x0, expected in zip(seen, after):
                torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-6)
            assert (after[0] - wadi.one_step(run.student, d["z_fake"][0], cond, run.abar)).abs().max() == 0
        else:
            assert d["z_fake"].numel() == 0
            for x0 in seen:
                torch.testing.assert_close(x0, before, rtol=1e-5, atol=1e-6)


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
# every adapter and the remedies through the whole run: resume is bitwise, the export reproduces the trainer


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


@pytest.mark.parametrize("variant", ["lora", "dora", "full", "remedies"])
def test_variant_resumes_bitwise_and_exports(variant, tmp_path, tiny):
    """A 2-step run against 1 step then resumed to 2, with an EMA: every checkpoint file equal bitwise. The export
    loads in stock diffusers and its one-step sample equals the trainer's own generator (the EMA, from the
    checkpoint, through wadi.one_step, and as bench.py toy reads it off the checkpoint), which differs from the
    teacher's. 'remedies': LoRaD with all four remedies on at once (fresh fake samples, no CFG on the fake, DMD's
    weighting, DMD's regression onto the docs' pairs)."""
    from diffusers import StableDiffusionPipeline
    flags = ["--student_rank", "4", "--fake_rank", "4", "--ema_decay", "0.5"]
    flags += (["--fresh_fake_samples", "--fake_updates", "2", "--fake_guidance_scale", "1", "--vsd_weighting", "dmd",
               "--regression_pairs", str(pairs_from_docs(tmp_path, tiny))] if variant == "remedies" else ["--adapter", variant])
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_main(full, *flags)
    run_main(resumed, *flags, steps=1)
    run_main(resumed, *flags, "--resume_from_checkpoint", "latest")
    adapter = "lorad" if variant == "remedies" else variant
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
        scored = wadi.one_step(toy.student_from(tiny, str(full / "checkpoint-2")), z, emb, run.abar)  # bench.py toy's
    tol = 1e-5 * ours.abs().max().item()
    torch.testing.assert_close(theirs, ours, rtol=0, atol=tol)
    torch.testing.assert_close(scored, ours, rtol=0, atol=tol)  # a checkpoint is scored by its EMA, as exported
    assert (ours - teacher).abs().max() > 100 * tol


# -----------------------------------------------------------------------------
# the CLI end to end, in a few shared subprocess runs


RUN_ARGS = ["--pretrained_model_name_or_path", "tiny", "--prompts", PROMPTS, "--checkpointing_steps", "1",
            "--checkpoints_total_limit", "2", "--validation_steps", "2", "--student_rank", "16", "--fake_rank", "4",
            "--learning_rate", "1e-2", "--validation_prompts", "a red fox", "a blue car"]  # a big lr: visible change
STUDENT_RANK, STEPS = 16, 4


def cli(out, steps, env, *extra, batch=2, launcher=(sys.executable,), script=WADI):
    cmd = [*launcher, script, *RUN_ARGS, "--output_dir", str(out), "--train_batch_size", str(batch),
           "--max_train_steps", str(steps), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=HERE, env=env)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@in_background
def full_run(tmp, env):
    """One process, global batch 2, 4 steps uninterrupted."""
    cli(tmp / "out", STEPS, env)
    return tmp / "out"


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
    """The README's ControlNet recipe on the exported pipeline, with a tiny ControlNet made from its UNet (the zero
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
    snippet = [b for b in readme_blocks("python") if "StableDiffusionControlNetPipeline" in b][0]
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
                   "fake_guidance_scale_nan": ("--fake_guidance_scale", "nan"),
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
              "ema_decay_nan", "seed_beyond_64_bits", "fake_guidance_scale_nan", "regression_weight_negative",
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
        runs[case] = subprocess.run([sys.executable, WADI, *argv], capture_output=True, text=True, timeout=TIMEOUT,
                                    cwd=HERE, env=env), out
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


def doc_text(doc):
    with open(os.path.join(HERE, doc), encoding="utf-8") as f:
        return f.read()


def readme_blocks(lang, doc="README.md"):
    """The ```lang blocks of README.md (or of a file in docs/), as written."""
    return [b.split("```", 1)[0] for b in doc_text(doc).split(f"```{lang}\n")[1:]]


def readme_quick_start():
    commands = [line for b in readme_blocks("bash") for line in b.splitlines() if line.startswith("python wadi.py")]
    return [c for c in commands if "tiny" in c][0].split()


@in_background
def quick_start_run(tmp, env):
    quick = readme_quick_start()
    assert quick[quick.index("--output_dir") + 1] == "wadi-tiny"
    quick[quick.index("--output_dir") + 1] = str(tmp / "wadi-tiny")
    return subprocess.run([sys.executable, *quick[1:]], capture_output=True, text=True, timeout=TIMEOUT, cwd=HERE,
                          env=env), tmp


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


GPU_DOC = "docs/gpu.md"


@in_background
def plan_line_run(tmp, env):
    command = [line for b in readme_blocks("bash", GPU_DOC) for line in b.splitlines() if line.startswith("python bench.py plan")]
    assert len(command) == 1 and "--batch 16 --mixed_precision bf16 --gradient_checkpointing" in command[0]
    return subprocess.run([sys.executable, *command[0].split()[1:]], capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=HERE, env=env)


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


def test_train_sh_flags_parse():
    """train.sh's wadi.py flags are all ones wadi.py accepts, with the paper's values."""
    with open(os.path.join(HERE, "train.sh")) as f:
        body = f.read().split("--nproc_per_node 8 wadi.py", 1)[1].split('"$@"')[0]  # the command's flags
    argv = body.replace("\\\n", " ").replace('"$prompts"', "p.txt").split()
    args = wadi.parse_args(argv)
    assert (args.resolution, args.train_batch_size, args.learning_rate, args.fake_learning_rate) == (512, 16, 1e-4, 1e-2)
    assert (args.guidance_scale, args.student_rank, args.fake_rank, args.mixed_precision) == (1.5, 256, 32, "bf16")
    assert args.gradient_checkpointing and args.max_train_steps is None  # 2 epochs


# -----------------------------------------------------------------------------
# bench.py plan: GPU memory counted on fake tensors, held against the same step on real ones (CPU)

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


# -----------------------------------------------------------------------------
# bench.py toy: the scores behind the README's distillation table, against closed forms

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


@pytest.mark.parametrize("flags", [["--teacher_lr", "nan"], ["--steps", "0"], ["--ceiling_targets", "0"]])
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


def test_toy_ceiling_fits_the_teachers_samples(tiny, tmp_path):
    """The regression ceiling bench.py toy prints beside the VSD student: wadi.py's student, from wadi.setup on a
    command line, starts as the teacher (its MSE to the 25-step targets is the stock pipeline's one-step sample's,
    from the same noise: the pairing of noise and target is right), and fitting lowers that MSE."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny, low_cpu_mem_usage=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(toy_problem.TOY_PROMPTS) + "\n")
    argv = ["--pretrained_model_name_or_path", tiny, "--prompts", str(prompts), "--output_dir", str(tmp_path / "out"),
            "--max_train_steps", "30", "--train_batch_size", "8", "--student_rank", "4", "--learning_rate", "1e-2"]
    student, before, after = toy.toy_ceiling(pipe, argv, n=4)
    target = toy_problem.toy_samples(pipe, 25, 1.5, 4, 2000)  # pipe has the DDIM scheduler and the teacher's UNet still
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    teacher_one_step = toy_problem.toy_samples(pipe, 1, 0, 4, 2000)
    assert before == pytest.approx(torch.nn.functional.mse_loss(teacher_one_step, target).item(), rel=1e-4)
    assert after < 0.9 * before
    assert not (tmp_path / "out").exists()  # the ceiling writes nothing


def test_toy_ceiling_anneals_only_when_asked(tiny, tmp_path, monkeypatch):
    """The regression baseline runs at the student's lr held constant (as its records were made), whatever the
    student's --lr_schedule; with anneal=True (bench.py toy --ceiling_anneal) it follows --lr_schedule linear as
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
        toy.toy_ceiling(pipe, argv, n=1, anneal=anneal)
        assert seen == pytest.approx(lrs)


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
        ceiling = scores(0.25 if name == "exact-attention-1000" else math.nan)  # --no_ceiling: not fitted
        record = dict(cmd=[], minutes=20.0, scores=scores(p), ceiling=ceiling, teacher=teacher, steps=1000,
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
    # a run on a retrained teacher (other last bits), and a ceiling fitted on the first one, are told apart
    record = json.loads((tmp_path / "wadi-exact-attention-1000.json").read_text())
    record.update(teacher_sha="4567ef01", teacher=scores(0.99), ceiling=dict(scores(0.25), teacher_sha="0123abcd"))
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
    record.write_text(json.dumps(dict(cmd=["wadi.py", *seen[0][2:]], minutes=1.0, scores=s, ceiling=s, teacher=s,
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
             "--no_ceiling", "--out", str(tmp_path / "o"), "--records", str(tmp_path / "r")]
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
    # the README's toy table
    pb = lambda s: f"{s['precision']:.2f} / {min(s['balance']):.2f}"
    record = lambda name: read(os.path.join(records, f"{name}.json"))
    places = [record(f"toy-seed0/wadi-exact-attention-2000{flags}")
              for flags in ("", "-student_rank64-regression_weight1-fake_updates3")]
    recipe = [record(f"samples1024/toy-details0.55-seed{seed}/wadi-exact-attention-2000-learning_rate3e-3-student_rank64"
                     "-regression_weight1-fake_updates3") for seed in (0, 1)]
    alone = [record(f"teacher-rebuilt/toy-details0.55-seed{seed}/wadi-exact-attention-2000-learning_rate3e-3") for seed in (0, 1)]
    assert places[0]["teacher_sha"] == places[1]["teacher_sha"]
    assert [r["teacher_sha"] for r in alone] == [r["teacher_sha"] for r in recipe]  # each seed on one teacher build
    section = doc_text("README.md").split("## Does it distill?")[1].split("\n## ")[0]
    rows = {cells[0]: cells[1:] for cells in ([c.replace("*", "") for c in line[2:-2].split(" | ")]
                                             for line in section.splitlines() if line.startswith(("| places", "| details")))}
    assert rows["places, seed 0"][:3] == [pb(places[0]["teacher"]), pb(places[0]["scores"]), pb(places[1]["scores"])]
    fits = {}  # the regression baselines on the details toy's rebuilt teachers, by adapter
    for path in (glob.glob(os.path.join(records, "toy-details0.55-seed*", "ceiling-*.json"))
                 + glob.glob(os.path.join(records, "samples1024", "toy-details0.55-seed*", "ceiling-*.json"))):
        fits.setdefault(re.search(r"-adapter([a-z]+)-", path).group(1), []).append(read(path)["scores"]["precision"])
    lorad = fits.pop("lorad")
    assert rows["details, seed 0; seed 1"] == ["; ".join(pb(r["teacher"]) for r in recipe), "; ".join(pb(r["scores"]) for r in alone),
                                               "; ".join(pb(r["scores"]) for r in recipe),
                                               f"LoRaD {min(lorad):.2f}-{max(lorad):.2f}, " + ", ".join(
                                                   f"{name} {fits[a][0]:.2f}" for a, name in (("lora", "LoRA"), ("dora", "DoRA"), ("full", "full")))]


def test_toy_ceiling_goes_to_the_runs_that_share_it(tmp_path):
    """bench.py toy --ceiling_only fits a ceiling after the runs (made with --no_ceiling): it goes into the records
    of the runs on the same teacher whose student flags are its own, whatever their fake or loss flags, and no other."""
    argv = lambda teacher, *flags: ["wadi.py", "--pretrained_model_name_or_path", teacher, "--prompts", "p.txt",
                                    "--max_train_steps", "1000", "--learning_rate", "1e-3", *flags]
    runs = {"same": argv("t"), "fake-only": argv("t", "--fake_rank", "8"), "other-lr": argv("t", "--learning_rate", "3e-3"),
            "other-teacher": argv("u"), "other-rank": argv("t", "--student_rank", "8")}
    for name, cmd in runs.items():
        (tmp_path / f"wadi-{name}.json").write_text(json.dumps(dict(cmd=cmd, scores={}, ceiling=dict(precision=math.nan))))
    (tmp_path / "wadi-unscored.json").write_text(json.dumps(dict(cmd=argv("t"), minutes=1.0)))
    toy.share_ceiling(str(tmp_path), "t", toy.ceiling_key(argv("t")[1:]), dict(precision=0.4))
    got = {p.name[5:-5]: json.loads(p.read_text()).get("ceiling") for p in tmp_path.glob("wadi-*.json")}
    assert {k for k, v in got.items() if v == dict(precision=0.4)} == {"same", "fake-only"}
    assert got["unscored"] is None and math.isnan(got["other-lr"]["precision"])


@in_background
def bench_step_run(tmp, env):
    return subprocess.run([sys.executable, "bench.py", "step", "--sizes", "tiny", "--rounds", "1", "--steps", "1",
                           "--warmup", "0", "--", "--gradient_checkpointing"], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=HERE, env=env)


def test_bench_step_runs_both_designs(bench_step_run):
    """`bench.py step` (the README's step table; on a GPU with `--sizes sd15 -- --gradient_checkpointing`): one
    round on the tiny UNet with wadi flags passed through. The authors' design holds three UNet copies (the
    parameter bytes), ours one base plus the angles."""
    r = bench_step_run
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("|")[3].strip(): line.split("|") for line in r.stdout.splitlines() if line.startswith("| tiny")}
    assert set(rows) == {"ours", "authors"} and "--gradient_checkpointing" in r.stdout
    assert float(rows["authors"][8].split("(")[1].rstrip("x) ")) > 2.5  # unique parameter bytes, authors / ours
