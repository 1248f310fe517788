"""Tests for bench.py digits: the pixel VAE, the scores against cases with a known answer, the benchmark end to end at
toy size, and the README's table and picture rebuilt from the records in git.

    python -m pytest -q benchmarks/test_digits.py      # about a minute on 2 CPU cores
"""
import argparse
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks import digits
from benchmarks.digits_problem import DIGIT_PROMPTS, DigitScorer, digit_split, pixel_vae

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def scorer():
    x_train, x_test, y_train, y_test = digit_split()
    return DigitScorer(x_train, y_train, x_test, y_test)


def test_pixel_vae_is_the_identity():
    """The latent is the pixel, both ways, over a range wider than the data's (a sample's latents can leave [-1, 1])."""
    vae = pixel_vae(scaling_factor=1.33)
    x = 3 * torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (vae.decode(x).sample - x.expand(-1, 3, -1, -1)).abs().max() < 1e-5 * x.abs().max()
        assert (vae.encode(x.expand(-1, 3, -1, -1)).latent_dist.sample() - x).abs().max() < 1e-5 * x.abs().max()


def test_split_is_fixed_and_stratified():
    x_train, x_test, y_train, y_test = digit_split()
    again = digit_split()
    assert len(x_train) == 1437 and len(x_test) == 360 and (again[1] == x_test).all()
    assert np.bincount(y_test).min() >= 35 and x_train.min() == 0 and x_train.max() == 1  # ~36 per digit; 0-16 / 16


def test_scores_known_cases(scorer):
    x_ref, y_ref = scorer.ref
    same = scorer.scores(x_ref, y_ref)  # the held-out digits against themselves
    assert abs(same["fd"]) < 1e-6 and same["precision"] == same["recall"] == same["min_recall"] == 1
    assert same["accuracy"] == pytest.approx(scorer.accuracy)
    assert same["blank"] == np.count_nonzero(x_ref == 0) / x_ref.size and 0.4 < same["blank"] < 0.6  # ink on half
    # PCA features are affine in the pixels: a shift d of every image moves them by d's projection, covariances
    # unchanged, so FD is exactly the squared norm of that projection
    d = 0.02 * np.random.default_rng(0).standard_normal(64)
    assert scorer.scores(x_ref + d, y_ref, "pca")["fd"] == pytest.approx(np.square(scorer.pca.components_ @ d).sum(), rel=1e-6)
    # one image per digit, repeated: every sample is a real digit (precision 1), the rest of each digit's styles are lost
    one = np.concatenate([np.repeat(x_ref[y_ref == d][:1], 100, 0) for d in range(10)])
    collapsed = scorer.scores(one, np.repeat(np.arange(10), 100))
    assert collapsed["precision"] == 1 and collapsed["recall"] < 0.05 and collapsed["min_recall"] < 0.05
    # uniform noise: no digit (precision 0), about chance adherence, and an FD far above the real split's
    noise = scorer.scores(np.random.default_rng(1).random((1000, 64)), np.repeat(np.arange(10), 100))
    real = scorer.scores(*scorer_train(scorer))
    assert noise["precision"] < 0.05 and noise["recall"] == 0 and noise["accuracy"] < 0.3 and noise["blank"] == 0
    assert real["precision"] > 0.8 and real["recall"] > 0.8 and real["accuracy"] > 0.95 and noise["fd"] > 20 * real["fd"]


def scorer_train(scorer):
    x_train, _, y_train, _ = digit_split()
    return x_train, y_train


def test_half_sample_error_is_the_standard_error(scorer):
    """For a mean, the spread over random halves equals the standard error at the full count: adherence of labels
    right half of the time is a mean of 0/1 with SE sqrt(p (1 - p) / n)."""
    x, y = scorer_train(scorer)
    wrong = np.random.default_rng(2).random(len(y)) < 0.5
    out = scorer.scores_with_errors(x, np.where(wrong, (y + 1) % 10, y))["classifier"]
    p = out["accuracy"]
    assert out["err"]["accuracy"] == pytest.approx(np.sqrt(p * (1 - p) / len(y)), rel=0.4)


def test_bad_flags_exit_with_one_line(capsys):
    for flags in (["--steps", "0"], ["--teacher_lr", "nan"], ["--samples", "-1"], ["--pairs", "0"]):
        with pytest.raises(SystemExit, match=f"bench.py digits: --{flags[0][2:]} must be"):
            digits.main(flags)


def test_digits_end_to_end(tmp_path, capsys, monkeypatch):
    """bench.py digits as the README gives it, at toy size: the teacher a stock diffusers pipeline that returns
    digit images, wadi.py's command line with the recipe, a record with the four rows in both feature spaces, a
    curve per checkpoint and the picture; a second run reuses every part; --table rebuilds the same table."""
    (command,) = {line.split(" #")[0].strip() for line in readme_lines() if line.startswith("python bench.py digits -- ")}
    assert command.split()[4:] == digits.REAL_IMAGES
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    out, records, assets = (str(tmp_path / name) for name in ("out", "records", "assets"))
    small = ["--teacher_steps", "2", "--steps", "2", "--samples", "4", "--pairs", "1", "--out", out, "--records", records,
             "--assets", assets]
    digits.main(small + command.split()[3:])
    printed = capsys.readouterr().out
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(out, "teacher"))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(DIGIT_PROMPTS[:3], num_inference_steps=2, output_type="np").images
    assert images.shape == (3, 8, 8, 3) and images.min() >= 0 and images.max() <= 1
    assert np.allclose(images[..., 0], images[..., 2])  # gray: the pixel VAE's three equal channels
    record = json.load(open(os.path.join(records, "digits-seed0-teacher_steps2-steps2-samples4-pairs1-adapterfull-learning_rate1e-4-regression_weight1-fake_updates2.json")))
    student = os.path.join(out, "student-steps2-pairs1-adapterfull-learning_rate1e-4-regression_weight1-fake_updates2")
    assert os.path.isdir(os.path.join(student, "pipeline"))
    assert " ".join(digits.DIGIT_RECIPE + digits.REAL_IMAGES) in " ".join(record["student"]["cmd"])
    assert list(record["rows"]) == list(digits.ROWS) and sorted(record["curve"], key=int) == ["0", "1", "2"]
    assert record["pairs"]["per_digit"] == 1 and record["pairs"]["cpu_minutes"] > 0  # their cost, recorded
    assert all(set(row) == {"classifier", "pca"} for row in record["rows"].values())
    assert [len(digit) for digit in record["images"].values()] == [10] * 4
    buckets = [f"{lo}-{hi - 1}" for lo, hi in digits.VSD_BUCKETS]
    assert list(record["background"]) == [*buckets, "noise"] and record["background"]["noise"] > 0
    assert all(-1 <= record["background"][k]["cos"] <= 1 and record["background"][k]["size"] > 0 for k in buckets)
    # a fake model equal to the teacher (theta_a = 0) makes eq. 11's gradient 0 on every pixel
    same = tmp_path / "fake-is-teacher"
    shutil.copytree(os.path.join(student, "checkpoint-2"), same)
    fake = load_file(same / "fake_lorad.safetensors")
    save_file({k: 0 * v if k.endswith("theta_a") else v for k, v in fake.items()}, same / "fake_lorad.safetensors")
    blank = np.ones((10, 64), dtype=bool)
    zero = digits.background_gradient(os.path.join(out, "teacher"), str(same), blank, 1.5)
    assert all(v["size"] == 0 for k, v in zero.items() if k != "noise")
    from PIL import Image
    assert Image.open(os.path.join(assets, "digits.png")).size == (130 + 20 * 42, 4 * 42)
    # cached: a second run trains nothing
    monkeypatch.setattr(digits, "train_digit_teacher", lambda *a, **k: pytest.fail("teacher retrained"))
    monkeypatch.setattr(digits, "subprocess", argparse.Namespace(run=lambda *a, **k: pytest.fail("student retrained")))
    digits.main(small + command.split()[3:])
    assert capsys.readouterr().out in printed  # the tables alone, the same
    digits.main(["--table", "--records", records, "--assets", assets])
    assert capsys.readouterr().out in printed
    # the regression baseline: the recipe's student fitted by DMD's regression alone, a row in the student's place
    digits.main(["--baseline", *small])  # the pairs made above, reused
    record = json.load(open(os.path.join(records, "digits-seed0-baseline-teacher_steps2-steps2-samples4-pairs1.json")))
    assert list(record["rows"]) == [*digits.ROWS[:3], digits.BASELINE] and "--regression_weight" in record["student"]["cmd"]
    fitted = load_file(os.path.join(out, "baseline-steps2-pairs1", "student_lorad.safetensors"))
    assert all(v.abs().max() > 0 for k, v in fitted.items() if k.endswith("theta_a"))  # fitted: theta_a starts at 0
    assert "regression baseline / teacher at 25 steps" in capsys.readouterr().out and "background" not in record
    # another teacher recipe in the same folder: what the old teacher made goes with it
    monkeypatch.undo()  # train_digit_teacher back
    digits.teacher_part(out, argparse.Namespace(seed=0, teacher_steps=1, teacher_lr=2e-3), *digits.digit_split()[::2])
    assert sorted(os.listdir(out)) == ["prompts.txt", "teacher", "teacher.json"]
    # deterministic: trained again from the same seed, the same teacher bit for bit (on one CPU build and thread count)
    again = str(tmp_path / "again")
    digits.teacher_part(again, argparse.Namespace(seed=0, teacher_steps=1, teacher_lr=2e-3), *digits.digit_split()[::2])
    assert digits.weights_sha(os.path.join(again, "teacher")) == json.load(open(os.path.join(out, "teacher.json")))["sha"]


def readme_lines():
    with open(os.path.join(HERE, "README.md")) as f:
        return [line.strip() for line in f]


def test_readme_digits_table_is_the_records(capsys):
    """`python bench.py digits --table`, as the README gives it, on the records in git: it redraws assets/digits.png
    byte for byte, and every figure of the README's digits table is one it prints."""
    (command,) = {line.split(" #")[0].strip() for line in readme_lines() if "bench.py digits --table" in line}
    png = os.path.join(HERE, "assets", "digits.png")
    before = hashlib.sha256(open(png, "rb").read()).hexdigest()
    digits.main(command.split()[3:])
    out = capsys.readouterr().out
    assert hashlib.sha256(open(png, "rb").read()).hexdigest() == before
    lines = readme_lines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| digits"))
    table = lines[start + 2:start + 2 + next(k for k, line in enumerate(lines[start + 2:]) if not line.startswith("|"))]
    assert len(table) >= 4  # the four rows: real, teacher at 25 steps and at 1, student
    with open(os.path.join(HERE, "docs", "digits.md")) as f:  # and every table of docs/digits.md
        docs = [line for line in f if line.startswith("| ") and not line.startswith("| seed")]
    assert len(docs) >= 20
    for number in (n for row in table + docs for n in re.findall(r"\d+\.\d+", row.split("|", 2)[2])):
        assert number in out, f"{number} is not in bench.py digits --table"
