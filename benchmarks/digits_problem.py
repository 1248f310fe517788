"""Real images on a CPU: the UCI handwritten digits that scikit-learn ships (1,797 grayscale 8x8 images, no download),
a text-conditioned teacher on them saved as a stock diffusers StableDiffusionPipeline, and the paper's Table 1 scores
(FID, CLIP score, precision / recall) in the features of a small classifier. benchmarks/digits.py runs the benchmark."""
import argparse
import contextlib

import numpy as np
import torch
import torch.nn.functional as F

import wadi
from tiny import build_tiny_pipeline

DIGIT_PROMPTS = [f"a handwritten digit {n}" for n in range(10)]
# the teacher's UNet: the tiny pipeline's, with 1 latent channel (the pixels) and cross-attention at both levels
DIGIT_UNET = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
                  norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True,
                  down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)


def digit_split():
    """The digits as pixels in [0, 1] (the data's 17 levels, 0-16, over 16), split once: 80% for the teacher and the
    scorer's classifier, 20% held out for the scores (stratified, fixed). x: (n, 64) float64, y: (n,) digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    return train_test_split(x / 16, y, test_size=0.2, stratify=y, random_state=0)  # x_train, x_test, y_train, y_test


# -----------------------------------------------------------------------------
# the latent layout: pixels. The VAE is the identity, exactly, so the benchmark scores the diffusion model alone


def pixel_vae(scaling_factor, small=1e-7):
    """An AutoencoderKL whose encoder and decoder are the identity between a gray image in [-1, 1] (3 equal channels,
    as SD's) and a 1x8x8 latent, to fp32 rounding. Each coder carries the pixel x as the pair (small x, -small x):
    - residual blocks add zero (their last conv is 0), so the pair passes them unchanged;
    - the pair's mean is 0, and its variance (small^2 x^2) is far below GroupNorm's eps (1e-6), so GroupNorm
      multiplies it by 1/sqrt(eps), a constant;
    - SiLU(y) - SiLU(-y) = y (sigmoid(y) + sigmoid(-y) = 1), so the last conv takes the difference of the pair.
    The latent is the pixel; scaling_factor (1 / the data's std) gives it unit variance, as SD's VAE does."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(2,), layers_per_block=1, latent_channels=1,
                        norm_num_groups=1, sample_size=8, scaling_factor=scaling_factor, use_quant_conv=False,
                        use_post_quant_conv=False, mid_block_add_attention=False)
    gain = 1e-3 / small  # sqrt(eps) / small: undoes GroupNorm's 1/sqrt(eps) and the small scale
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for coder in (vae.encoder, vae.decoder):
            n_in = coder.conv_in.in_channels
            coder.conv_in.weight[0, :, 1, 1], coder.conv_in.weight[1, :, 1, 1] = small / n_in, -small / n_in
            coder.conv_norm_out.weight.fill_(1)
            coder.conv_out.weight[:, 0, 1, 1], coder.conv_out.weight[:, 1, 1, 1] = gain, -gain
        vae.encoder.conv_out.weight[1] = 0  # the encoder's second output is log(variance): exp(-30), a point mass
        vae.encoder.conv_out.bias[1] = -30
    return vae


# -----------------------------------------------------------------------------
# the teacher: a text-to-image model trained from scratch on the digits, by eq. (1), as SD was


def train_digit_teacher(path, x_train, y_train, seed, steps, batch=64, lr=1e-3):
    """Build the tiny pipeline at `path` for its tokenizer, CLIP-shaped text encoder and SD1.5's noise schedule, then
    replace its UNet by DIGIT_UNET trained on the digits (eq. 1: eps-prediction MSE, 10% empty prompts for CFG; AdamW,
    lr decayed linearly to 0) and its VAE by pixel_vae. Deterministic for a seed, on one CPU build and thread count."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    build_tiny_pipeline(path)
    tok, te, _, _, sched = wadi.load_pipeline_parts(path, torch.device("cpu"), torch.float32)
    image = torch.tensor(2 * x_train - 1, dtype=torch.float32).view(-1, 1, 8, 8)  # [-1, 1], as SD's images
    vae = pixel_vae(scaling_factor=round(1 / image.std().item(), 4))
    x0 = image * vae.config.scaling_factor
    run = argparse.Namespace(tokenizer=tok, text_encoder=te, device=torch.device("cpu"), autocast=contextlib.nullcontext())
    cond, null = wadi.encode(run, DIGIT_PROMPTS)[torch.as_tensor(y_train)], wadi.encode(run, [""])
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**DIGIT_UNET).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    g, abar = torch.Generator().manual_seed(seed), sched.alphas_cumprod.float()
    for step in range(steps):
        i = torch.randint(len(x0), (batch,), generator=g)
        noise, t = torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g)
        c = torch.where((torch.rand(batch, generator=g) < 0.1).view(-1, 1, 1), null, cond[i])
        loss = F.mse_loss(unet(wadi.diffuse(x0[i], t, noise, abar), t, c).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"teacher step {step + 1}/{steps} | loss {loss.item():.4f}", flush=True)
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet.eval(), scheduler=sched,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(path)


def digit_noise(n, seed=1000):
    """n fixed starting latents per digit: (10 * n, 1, 8, 8), digit-major."""
    return torch.cat([torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed + d)) for d in range(10)])


@torch.no_grad()
def digit_samples(pipe, steps, guidance, n, seed=1000, batch=480):
    """n images per digit through a stock diffusers pipeline, output_type="np", as any diffusers user samples it,
    rounded to the data's 17 levels (as FID reads 8-bit PNGs): (10 * n, 64) pixels in [0, 1], digit-major."""
    pipe.set_progress_bar_config(disable=True)
    prompts, z = [p for p in DIGIT_PROMPTS for _ in range(n)], digit_noise(n, seed)
    images = np.concatenate([pipe(prompts[i:i + batch], latents=z[i:i + batch], num_inference_steps=steps,
                                  guidance_scale=guidance, output_type="np").images for i in range(0, len(z), batch)])
    return np.round(images.mean(-1).reshape(len(z), 64) * 16) / 16


# -----------------------------------------------------------------------------
# the scores: the paper's Table 1 columns on a real held-out set


class DigitScorer:
    """Features from a small classifier trained on the real training split alone (an MLP, 64 ReLU units; seeded), the
    counterpart of FID's Inception features; its class probabilities score prompt adherence (CLIP score's
    counterpart). space 'pca': the top 16 principal components of the real training pixels, a second feature space
    to check that a result is not the classifier's."""

    def __init__(self, x_train, y_train, x_test, y_test):
        from sklearn.decomposition import PCA
        from sklearn.neural_network import MLPClassifier
        self.clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=1000, random_state=0).fit(x_train, y_train)
        self.pca = PCA(n_components=16, random_state=0).fit(x_train)
        self.accuracy = self.clf.score(x_test, y_test)  # on the held-out digits
        self.ref = (x_test, y_test)

    def features(self, x, space):
        if space == "pca":
            return torch.tensor(self.pca.transform(x))
        return torch.tensor(x @ self.clf.coefs_[0] + self.clf.intercepts_[0]).clamp(min=0)  # the hidden layer

    def scores(self, x, y, space="classifier", k=3):
        """x: (n, 64) pixels whose prompt (or label) is y, against the held-out digits: FD, precision and recall
        (Kynkaanniemi et al. 2019: the share of one set inside the other's k-NN balls), adherence (the classifier's
        accuracy against y), recall per digit (within that digit's samples alone), and the share of blank pixels (no
        ink: the data's background, about half of every real digit; a noisy background lowers it)."""
        from benchmarks.toy_problem import frechet_distance
        x_ref, y_ref = self.ref
        f, f_ref = self.features(x, space), self.features(x_ref, space)
        inside = lambda a, b: (torch.cdist(a, b) <= knn_radius(b, k)).any(1).double()  # a's points in b's balls
        per_digit = [inside(f_ref[y_ref == d], f[y == d]).mean().item() for d in range(10)]
        right = self.clf.predict(x) == y
        return dict(fd=frechet_distance(f, f_ref), precision=inside(f, f_ref).mean().item(),
                    recall=inside(f_ref, f).mean().item(), accuracy=right.mean(), min_recall=min(per_digit),
                    blank=float(np.mean(x == 0)),
                    recall_per_digit=per_digit, accuracy_per_digit=[right[y == d].mean() if (y == d).any() else 0.0
                                                                    for d in range(10)])

    def scores_with_errors(self, x, y, halves=20):
        """scores() in both feature spaces, each figure with its sampling error: the standard deviation of the figure
        over `halves` random halves of x (for a mean, that is its standard error at the full count)."""
        g, out = torch.Generator().manual_seed(0), {}
        for space in ("classifier", "pca"):
            full = self.scores(x, y, space)
            parts = [self.scores(x[i], y[i], space) for i in (torch.randperm(len(x), generator=g)[:len(x) // 2].numpy()
                                                              for _ in range(halves))]
            out[space] = dict(full, err={k: float(np.std([p[k] for p in parts])) for k in full if k[-5:] != "digit"})
        return out


def knn_radius(f, k):
    """Each point's distance to its k-th nearest other point (of fewer than k others: the farthest)."""
    if len(f) < 2:
        return torch.zeros(len(f), dtype=f.dtype)
    return torch.cdist(f, f).kthvalue(min(k, len(f) - 1) + 1, dim=1).values  # the first is the point itself
