"""The toy's problem, known exactly: prompts, modes (two kinds), data, the ideal teacher's score, and the scores
of a set of samples against the modes. benchmarks/toy.py trains, distills and reports on it."""
import json
import math
import os

import torch

TOY_PROMPTS = ["a red circle", "a green square", "a blue star", "a yellow moon"]
TOY_MODES, TOY_NOISE = 3, 0.15  # modes per prompt (the places toy; details: 4); std of the data around each mode
LATTICE = torch.tensor([(y, x) for y in (1, 3, 5, 7) for x in (1, 3, 5, 7)], dtype=torch.float32)  # in 8x8


def bumps(pos, width):
    """Gaussian bumps of the given width at positions (..., 2) in an 8x8 latent: (..., 8, 8)."""
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    return torch.exp(-((yy - pos[..., 0, None, None]) ** 2 + (xx - pos[..., 1, None, None]) ** 2) / (2 * width ** 2))


def toy_modes(seed, kind="places", detail=0.55):
    """(prompts, modes, 4, 8, 8) latents, scaled so the modes have unit variance per element, as SD's latents have
    (the VAE's scaling_factor): the noise schedule's signal-to-noise ratios are meant for that scale.
    places: each mode a Gaussian bump at its own place on a 4x4 lattice, with a +-1 channel signature per prompt.
    Modes are >= 18 apart; a sample of the data lies ~2.4 from its mode.
    details: a prompt's 4 modes share one layout (a wide bump at the prompt's place, its channel signature) and differ
    by a detail (a narrow bump at one of the other lattice places, a signature of its own) whose norm is `detail`
    times the layout's: as the images of one prompt, which share their layout and differ in details."""
    g = torch.Generator().manual_seed(seed)
    P = len(TOY_PROMPTS)
    if kind == "places":
        pos = LATTICE[torch.randperm(16, generator=g)[:P * TOY_MODES]].view(P, TOY_MODES, 2)
        modes = (torch.randint(0, 2, (P, 1, 4, 1, 1), generator=g) * 2.0 - 1) * bumps(pos, 0.8)[:, :, None]
        return modes / modes.square().mean().sqrt()
    places = torch.stack([torch.randperm(16, generator=g)[:5] for _ in range(P)])  # the layout's, then 4 details'
    layout = (torch.randint(0, 2, (P, 1, 4, 1, 1), generator=g) * 2.0 - 1) * bumps(LATTICE[places[:, :1]], 1.6)[:, :, None]
    details = (torch.randint(0, 2, (P, 4, 4, 1, 1), generator=g) * 2.0 - 1) * bumps(LATTICE[places[:, 1:]], 0.7)[:, :, None]
    details *= detail * layout.flatten(2).norm(dim=2)[..., None, None, None] / details.flatten(2).norm(dim=2)[..., None, None, None]
    modes = layout + details
    return modes / modes.square().mean().sqrt()


def toy_data(modes, prompt, generator):
    """Samples of the data for the given prompt indices."""
    m = torch.randint(modes.shape[1], prompt.shape, generator=generator)
    return modes[prompt, m] + TOY_NOISE * torch.randn(len(prompt), *modes.shape[2:], generator=generator)


def toy_exact_eps(x_t, t, prompt, modes, abar):
    """E[eps | x_t, c]: what an infinitely trained teacher predicts. For data N(mu_k, s^2 I) with equal
    weights, x_t | k ~ N(a mu_k, v I) with a = sqrt(abar_t), v = a^2 s^2 + 1 - abar_t, so the posterior over modes is
    a softmax and eps* = sqrt(1 - abar_t) (x_t - a sum_k w_k mu_k) / v. prompt -1 is the empty prompt: every mode."""
    P, M = modes.shape[:2]
    centers = modes.flatten(2).flatten(0, 1)  # (P*M, D)
    a, var = abar[t].sqrt().view(-1, 1), 1 - abar[t].view(-1, 1)
    v = a ** 2 * TOY_NOISE ** 2 + var
    x = x_t.flatten(1)
    logits = (2 * a * x @ centers.T - a ** 2 * centers.square().sum(1)) / (2 * v)  # -|x - a mu|^2 / 2v, up to a const
    own = (torch.arange(P * M) // M == prompt[:, None]) | (prompt[:, None] < 0)
    w = logits.masked_fill(~own, -math.inf).softmax(1)
    return (var.sqrt() * (x - a * w @ centers) / v).view_as(x_t)


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + Tr(Ca + Cb - 2 (Ca^1/2 Cb Ca^1/2)^1/2), in fp64."""
    a, b = a.double(), b.double()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    e, v = torch.linalg.eigh(ca)
    root = v @ torch.diag(e.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root @ cb @ root).clamp(min=0).sqrt().sum()
    return ((a.mean(0) - b.mean(0)).square().sum() + ca.trace() + cb.trace() - 2 * cross).item()


def toy_noise(n, seed):
    """n fixed starting latents per prompt: (prompts, n, 4, 8, 8)."""
    return torch.stack([torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed + p))
                        for p in range(len(TOY_PROMPTS))])


@torch.no_grad()
def toy_samples(pipe, steps, guidance, n, seed=1000):
    """n latents per prompt from a stock diffusers pipeline, from toy_noise(n, seed): (prompts, n, 4, 8, 8)."""
    pipe.set_progress_bar_config(disable=True)
    return torch.stack([pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                             latents=z).images for prompt, z in zip(TOY_PROMPTS, toy_noise(n, seed))])


def toy_tau(modes):
    """A third of the distance between the two closest modes: a sample nearer than this is on a mode."""
    centers = modes.flatten(2).flatten(0, 1)
    gaps = torch.cdist(centers, centers)
    return (gaps[gaps > 0].min() / 3).item()


def toy_scores(samples, modes):
    """precision: share of samples within tau of some mode (tau = a third of the closest two modes' distance);
    coverage: share of each prompt's modes that a precise sample of that prompt hits; adherence: share of
    samples whose nearest mode is one of the asked prompt's; dist: mean distance to the nearest mode, and `off`, the
    part of it orthogonal to the span of all modes (noise in directions where the data has none); FD to data;
    balance, per prompt: the number of modes times the smallest share of a mode among the prompt's precise samples
    (1.0 = even; counts: those samples per mode); nearest: every sample of the asked prompt by its nearest mode,
    precise or not, which tells a mode the student leaves (few samples near it) from one it reaches imprecisely."""
    P, n = samples.shape[:2]
    M = modes.shape[1]
    x, centers = samples.flatten(2).flatten(0, 1), modes.flatten(2).flatten(0, 1)
    tau = toy_tau(modes)
    dist, nearest = torch.cdist(x, centers).min(1)
    asked = torch.arange(P).repeat_interleave(n)
    right_prompt = nearest // M == asked
    good = (dist < tau) & right_prompt
    hit = torch.zeros(len(centers), dtype=torch.bool)
    hit[nearest[good]] = True
    # mode balance: per prompt, the shares of its precise samples at each of its modes; M x the smallest is 1 when even
    per_mode = lambda keep: torch.bincount(nearest[keep], minlength=P * M).view(P, M)  # of these samples, per mode
    counts = per_mode(good).float()
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
    err, basis = x - centers[nearest], torch.linalg.qr(centers.T).Q
    data = toy_data(modes, asked, torch.Generator().manual_seed(7)).flatten(1)
    return dict(precision=(dist < tau).float().mean().item(), coverage=hit.float().mean().item(),
                adherence=right_prompt.float().mean().item(), dist=dist.mean().item(),
                off=(err - err @ basis @ basis.T).norm(dim=1).mean().item(), fd=frechet_distance(x, data),
                balance=(M * shares.min(1).values).tolist(), counts=counts.int().tolist(),
                nearest=per_mode(right_prompt).tolist())


@torch.no_grad()
def make_pairs(teacher, prompts, z, path, batch=64):
    """DMD's regression pairs for wadi.py --regression_pairs, as docs/remedies.md makes them: the teacher's 25-step
    DDIM samples with CFG 1.5 (the recipe's) from the noise z, one per prompt."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file
    pipe = StableDiffusionPipeline.from_pretrained(teacher, low_cpu_mem_usage=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    x0 = torch.cat([pipe(prompts[i:i + batch], num_inference_steps=25, guidance_scale=1.5, latents=z[i:i + batch],
                         output_type="latent").images for i in range(0, len(prompts), batch)])
    save_file({"z": z.contiguous(), "x0": x0}, path + ".tmp", {"prompts": json.dumps(prompts)})
    os.replace(path + ".tmp", path)
