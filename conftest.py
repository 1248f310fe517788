"""What every test file shares (pytest loads this before them, benchmarks/ included).

Everything runs on the tiny SD-shaped pipeline that wadi.py builds for `--pretrained_model_name_or_path tiny`, built
once per session into a temporary WADI_CACHE. In-process tests run on one core; the slow subprocess runs (the CLI,
the README's commands, the benchmarks) go on the second (in_background). full_run, one short `python wadi.py` run,
is read by the trainer's tests and the toy's alike.
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from subprocess import run as subprocess_run  # bound now: see run_command

import pytest
import torch

import wadi
from tiny import tiny_pipeline

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


# The slow subprocess runs go on the second core: each is a session fixture made by @in_background, and the session
# starts, one after another, those the selected tests use, while the in-process tests run on the first core. A test
# that needs one waits for its result.
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
    for item in request.session.items:  # in the order the tests need them
        for name in item.fixturenames:
            if name in BACKGROUND:
                BACKGROUND[name](tmp_path_factory)
    yield
    SECOND_CORE.shutdown(cancel_futures=True)


def run_command(cmd, env):
    """A background run's subprocess, its output kept. subprocess.run as it was before the tests: a test may patch it
    while a background run is in flight (benchmarks/test_digits.py does)."""
    return subprocess_run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=HERE, env=env)


def abar_closed_form():
    """SD1.5's training schedule from its definition: scaled_linear betas, 1000 steps, in fp64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def make_run(tmp_path, *extra):
    """An in-process run on the tiny model, at 32 px (4x4 latents) to keep the steps cheap."""
    argv = ["--pretrained_model_name_or_path", "tiny", "--prompts", PROMPTS, "--output_dir", str(tmp_path / "out"),
            "--train_batch_size", "2", "--resolution", "32", *extra]
    return wadi.setup(wadi.parse_args(argv))


def doc_text(doc):
    with open(os.path.join(HERE, doc), encoding="utf-8") as f:
        return f.read()


def readme_blocks(lang, doc="README.md"):
    """The ```lang blocks of README.md (or of a file in docs/), as written."""
    return [b.split("```", 1)[0] for b in doc_text(doc).split(f"```{lang}\n")[1:]]


# the CLI end to end: one short run that the trainer's tests and the toy's read

RUN_ARGS = ["--pretrained_model_name_or_path", "tiny", "--prompts", PROMPTS, "--checkpointing_steps", "1",
            "--checkpoints_total_limit", "2", "--validation_steps", "2", "--student_rank", "16", "--fake_rank", "4",
            "--learning_rate", "1e-2", "--validation_prompts", "a red fox", "a blue car"]  # a big lr: visible change
STUDENT_RANK, STEPS = 16, 4


def cli(out, steps, env, *extra, batch=2, launcher=(sys.executable,), script=WADI):
    cmd = [*launcher, script, *RUN_ARGS, "--output_dir", str(out), "--train_batch_size", str(batch),
           "--max_train_steps", str(steps), *extra]
    r = run_command(cmd, env)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@in_background
def full_run(tmp, env):
    """One process, global batch 2, 4 steps uninterrupted."""
    cli(tmp / "out", STEPS, env)
    return tmp / "out"
