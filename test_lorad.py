"""Tests for lorad.py: the fast path against the paper's equations, plain autograd and the paper's tables, and
lorad.py used alone in transformers and diffusers models (the examples of README.md and docs/lorad.md, as written).

    python -m pytest -q test_lorad.py      # the tests
    python test_lorad.py                   # prints the README's parameter-count table
"""
import contextlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from benchmarks.sd import SD15, SD21  # the UNet architectures of SD1.5 and SD2.1 (configs only)
from conftest import readme_blocks
from lorad import LoRaDLinear, add_lorad, load_lorad, lorad_state_dict, merge_lorad, rotate, rotate_reference

SHAPES = [(1, 2), (3, 4), (7, 10), (16, 32), (33, 64)]  # (out, in)
STUDENT = dict(include=("down_blocks", "mid_block", "up_blocks"))  # the student's layers (paper Table 3's counts)
FAKE = dict(include=STUDENT["include"], exclude=("proj_in", "proj_out", "time_emb_proj"))


def rotate_one_block_at_a_time(weight, theta):
    """Eq. (3) applied pair by pair, with Python floats: the slowest, most literal reading."""
    out = weight.clone()
    for i in range(weight.shape[0]):
        for j in range(weight.shape[1] // 2):
            a, b, t = weight[i, 2 * j].item(), weight[i, 2 * j + 1].item(), theta[i, j].item()
            out[i, 2 * j], out[i, 2 * j + 1] = math.cos(t) * a - math.sin(t) * b, math.sin(t) * a + math.cos(t) * b
    return out


def lorad_layer(out_f, in_f, rank, dtype=torch.float32, seed=0, scale=0.3):
    """A LoRaD layer with non-zero angles (at init theta_a = 0 and every gradient but theta_a's is 0)."""
    torch.manual_seed(seed)
    m = LoRaDLinear(nn.Linear(in_f, out_f, dtype=dtype), rank)
    nn.init.normal_(m.theta_a, std=scale)
    return m


def plain_autograd(m, x):
    """The same layer through plain autograd (keeps theta, cos, sin, W' alive): the reference."""
    w = rotate(m.weight, m.theta_a @ m.theta_b).to(x.dtype)
    return F.linear(x, w, m.bias)


def grads(m, x, fn):
    x = x.detach().requires_grad_(True)
    for p in m.parameters():
        p.grad = None
    y = fn(m, x)
    torch.manual_seed(1)
    y.backward(torch.randn_like(y))
    return y.detach(), m.theta_a.grad, m.theta_b.grad, x.grad


def sd_unet(config):
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):  # architecture only, no weights, no memory
        return UNet2DConditionModel(**config)


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -----------------------------------------------------------------------------
# the rotation


@pytest.mark.parametrize("out_f,in_f", SHAPES)
def test_reference_equals_fast_path_float64(out_f, in_f):
    torch.manual_seed(out_f)
    w, theta = torch.randn(out_f, in_f, dtype=torch.float64), 3 * torch.randn(out_f, in_f // 2, dtype=torch.float64)
    expected = rotate_one_block_at_a_time(w, theta)
    assert (rotate_reference(w, theta) - expected).abs().max() <= 1e-12
    assert (rotate(w, theta) - expected).abs().max() <= 1e-12


def test_worked_example():
    # one row, one pair: (1, 0) rotated by 90 degrees is (0, 1); (3, 4) by 180 degrees is (-3, -4)
    w = torch.tensor([[1.0, 0.0, 3.0, 4.0]], dtype=torch.float64)
    theta = torch.tensor([[math.pi / 2, math.pi]], dtype=torch.float64)
    assert torch.allclose(rotate(w, theta), torch.tensor([[0.0, 1.0, -3.0, -4.0]], dtype=torch.float64), atol=1e-15)


@pytest.mark.parametrize("out_f,in_f", SHAPES)
def test_row_norms_kept_and_inverse_rotation_restores(out_f, in_f):
    torch.manual_seed(0)
    w, theta = torch.randn(out_f, in_f, dtype=torch.float64), torch.randn(out_f, in_f // 2, dtype=torch.float64)
    w_rot = rotate(w, theta)
    assert torch.allclose(w_rot.norm(dim=1), w.norm(dim=1), rtol=1e-13)
    assert torch.allclose(rotate(w_rot, -theta), w, atol=1e-13)
    assert (1 - F.cosine_similarity(w, w_rot, dim=1)).mean() > 1e-3  # the paper's NM = 0, DM > 0 for LoRaD


# -----------------------------------------------------------------------------
# the layer


def test_identity_at_init_and_fp32_angles():
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    m = LoRaDLinear(base, rank=8)
    x = torch.randn(5, 64)
    assert torch.equal(m(x), base(x))
    assert m.theta_a.shape == (48, 8) and m.theta_b.shape == (8, 32)
    assert not m.theta_a.any() and m.theta_b.abs().max() > 0
    assert m.weight is base.weight  # the base Parameter itself, not a copy
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["theta_a", "theta_b"]


@pytest.mark.parametrize("out_f,in_f,rank,bias", [(6, 8, 3, True), (32, 64, 16, False), (40, 20, 64, True)])
def test_custom_function_equals_plain_autograd(out_f, in_f, rank, bias):
    m = lorad_layer(out_f, in_f, rank)
    if not bias:
        m.bias = None
    x = torch.randn(2, 7, in_f)
    for a, b in zip(grads(m, x, lambda m, x: m(x)), grads(m, x, plain_autograd)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_float64_gradcheck():
    m = lorad_layer(4, 6, 2).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    from lorad import _LoRaDFunction
    w = m.weight.detach().requires_grad_(True)  # also checks dL/dW (rotation by -theta) and dL/db
    b = m.bias.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(_LoRaDFunction.apply, (x, w, b, m.theta_a, m.theta_b, None))  # None: no reuse


def test_saves_only_input_and_parameters():
    m = lorad_layer(64, 128, 8)
    x = torch.randn(10, 128, requires_grad=True)
    params = {p.data_ptr() for p in m.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        m(x)
    extra = [t for t in saved if t.data_ptr() not in params]
    assert len(extra) == 1 and extra[0].data_ptr() == x.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_base_dtypes(dtype):
    m = lorad_layer(32, 64, 8, dtype=dtype, scale=1e-2)
    assert m.theta_a.dtype == m.theta_b.dtype == torch.float32
    x = torch.randn(4, 64, dtype=dtype)
    y = m(x)
    assert y.dtype == dtype
    # the rotation is done in fp32 and rounded once: W' is the fp32 rotation cast to the base dtype
    w32 = rotate(m.weight.float(), m.theta_a @ m.theta_b)
    torch.testing.assert_close(m.merged_weight(), w32.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(y.float(), F.linear(x.float(), w32, m.bias.float()), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert m.theta_a.grad.dtype == torch.float32 and m.theta_a.grad.abs().max() > 0
    assert m.weight.grad is None


def test_autocast_bf16_matches_plain_autograd():
    m = lorad_layer(32, 64, 8)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, ref = grads(m, x, lambda m, x: m(x)), grads(m, x, plain_autograd)
    assert fast[0].dtype == torch.bfloat16
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_autocast_keeps_angles_fp32():
    """theta, cos, sin and W' in fp32, cast to the autocast dtype only at the matmul. bf16 keeps 8 bits
    of theta = theta_a @ theta_b; rounded there, small rotations move, so the output would not be bitwise this."""
    m = lorad_layer(64, 128, 16)
    with torch.no_grad():
        m.theta_a.normal_(std=1e-2)
    x = torch.randn(8, 128)
    expected = F.linear(x.bfloat16(), rotate(m.weight, m.theta_a @ m.theta_b).bfloat16(), m.bias.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(m(x), expected)


def small_lorad_mlp():
    """Two LoRaD layers with non-zero angles, and an input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    add_lorad(model, rank=4)
    for m in model.modules():
        if isinstance(m, LoRaDLinear):
            nn.init.normal_(m.theta_a, std=0.3)
    return model, torch.randn(5, 16)


def test_gradient_checkpointing_same_gradients():
    model, x = small_lorad_mlp()
    model(x).square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    checkpoint(model, x, use_reentrant=False).square().sum().backward()
    for a, b in zip(expected, [p.grad for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_reuse_rotations_forms_w_once_and_changes_nothing(autocast):
    """Inside reuse_rotations(model) each layer forms W' once for its forward, a checkpointed recompute and its
    backward (counted: one theta_a @ theta_b product per layer instead of three), and the gradients are bitwise
    those of forming it every time; after the block nothing is held."""
    import lorad
    model, x = small_lorad_mlp()
    products = []
    rotate_ = lorad.rotate

    def run(reuse):
        model.zero_grad()
        products.clear()
        with lorad.reuse_rotations(model) if reuse else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = checkpoint(model, x, use_reentrant=False)
            y.float().square().sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]
    lorad.rotate = lambda w, theta: products.append(1) or rotate_(w, theta)
    try:
        every_time, n_every = run(False), len(products)
        once, n_once = run(True), len(products)
    finally:
        lorad.rotate = rotate_
    assert (n_every, n_once) == (6, 2)  # 2 layers x (forward, recompute, backward), then 2 layers x 1
    for a, b in zip(every_time, once):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(m._reuse is None for m in model.modules() if isinstance(m, LoRaDLinear))  # nothing held


@pytest.mark.parametrize("fused", [False, True])
def test_reuse_rotations_follows_the_optimizer(fused):
    """Forward, backward and opt.step() all inside the block, as one trains: the losses of 5 steps at lr 0.1 are
    those of forming W' in every call, with W' formed once per layer and step (its value of the angles). Fused AdamW
    changes the angles without bumping their version counters."""
    import lorad
    formed, rotate_ = [], lorad.rotate

    def train(reuse):
        model, x = small_lorad_mlp()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=fused)
        formed.clear()
        losses = []
        with lorad.reuse_rotations(model) if reuse else contextlib.nullcontext():
            for _ in range(5):
                loss = model(x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        return losses, len(formed)
    lorad.rotate = lambda w, theta: formed.append(1) or rotate_(w, theta)
    try:
        (every_time, n_every), (once, n_once) = train(False), train(True)
    finally:
        lorad.rotate = rotate_
    assert once == pytest.approx(every_time, rel=1e-6) and every_time[-1] < 0.9 * every_time[0]
    assert (n_every, n_once) == (20, 10)  # 2 layers x 5 steps x (forward, backward), then x forward alone


@pytest.mark.parametrize("case", ["theta_b alone", "nested", "copied inside"])
def test_reuse_rotations_is_safe_for_any_use(case):
    """An optimizer of theta_b alone, a block inside another, a copy of the model made inside the block: each trains
    as without the block (5 steps at lr 0.1)."""
    import copy
    import lorad

    def train(reuse):
        model, x = small_lorad_mlp()
        with lorad.reuse_rotations(model) if reuse else contextlib.nullcontext():
            if case == "copied inside":
                model(x)
                model = copy.deepcopy(model)
            params = [m.theta_b for m in model.modules() if isinstance(m, LoRaDLinear)] if case == "theta_b alone" else \
                [p for p in model.parameters() if p.requires_grad]
            opt, losses = torch.optim.AdamW(params, lr=0.1), []
            for _ in range(5):
                with lorad.reuse_rotations(model) if reuse and case == "nested" else contextlib.nullcontext():
                    loss = model(x).square().mean()
                    loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        if case == "copied inside":  # and after the block, the copy still follows its angles
            opt.step(), losses.append(model(x).square().mean().item())
        return losses
    every_time = train(False)
    assert train(True) == pytest.approx(every_time, rel=1e-6) and len(set(every_time)) == len(every_time)


def test_odd_input_dim_is_a_clear_error():
    with pytest.raises(ValueError, match="odd"):
        LoRaDLinear(nn.Linear(7, 4), 2)
    model = nn.Sequential(nn.Linear(8, 5), nn.Linear(5, 4))
    with pytest.raises(ValueError, match=r"^LoRaD needs an even in_features: 1 has 5"):
        add_lorad(model, 2)
    assert all(type(m) is nn.Linear for m in model)  # nothing half-converted


# -----------------------------------------------------------------------------
# whole models


def tiny_model():
    torch.manual_seed(0)
    return nn.ModuleDict(dict(
        down_blocks=nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)),
        proj_in=nn.Linear(8, 8),
        conv=nn.Conv1d(8, 8, 1),
        up_blocks=nn.ModuleDict(dict(proj_out=nn.Linear(8, 8, bias=False))),
    ))


def test_add_lorad_selects_freezes_and_refuses_to_stack():
    model = tiny_model()
    names = add_lorad(model, 2, include=("down_blocks", "up_blocks"), exclude=("proj_out",))
    assert names == ["down_blocks.0", "down_blocks.2"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "down_blocks.0.theta_a", "down_blocks.0.theta_b", "down_blocks.2.theta_a", "down_blocks.2.theta_b"}
    assert trainable(model) == 2 * (16 + 4) + 2 * (8 + 8)  # r * (out + in/2) per layer
    with pytest.raises(ValueError, match="already has LoRaD"):
        add_lorad(model, 2)


def test_no_match_is_a_clear_error():
    """A selection that adapts nothing raises (training would silently learn nothing) in one sentence that names the
    filters and the model's layers with a 2-D weight by type, and changes nothing. GPT-2's projections are
    transformers' Conv1D, which is named as not supported."""
    from transformers import GPT2Config, GPT2Model
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=8, bos_token_id=0, eos_token_id=0)
    cases = [  # (model, filters, what the message must say, what it must not)
        (GPT2Model(config), {}, ["include=('',), exclude=()", "2-D weight: Conv1D x4 (e.g. 'h.0.attn.c_attn'), of",
                                 "Conv1D, as in GPT-2, stores its weight transposed: not supported"], ["Embedding"]),
        (tiny_model(), dict(include=("q_proj",), exclude=("v_proj",)),
         ["include=('q_proj',), exclude=('v_proj',)", "2-D weight: Linear x4 (e.g. 'down_blocks.0'), of"],
         ["Conv", "not supported"]),  # the Conv1d (3-D weight) is not among them
        (nn.Sequential(nn.Embedding(4, 8), nn.MultiheadAttention(8, 2)), {},
         ["2-D weight: NonDynamicallyQuantizableLinear x1 (e.g. '1.out_proj'), of"], ["Embedding", "Conv1D"]),
        (nn.Sequential(nn.Embedding(4, 8), nn.Conv2d(2, 2, 1)), {}, ["2-D weight: none, of"], ["Embedding", "Conv"]),
    ]
    for model, filters, says, not_says in cases:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="^add_lorad matched no nn.Linear with include=") as e:
            add_lorad(model, 2, **filters)
        assert all(s in str(e.value) for s in says) and not any(s in str(e.value) for s in not_says), str(e.value)
        assert str(e.value).replace("e.g. ", "").count(". ") == 0  # one sentence
        assert all(p.requires_grad for p in model.parameters())  # not frozen: nothing happened
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_merge_gives_stock_linear_with_same_outputs():
    model = tiny_model()
    stock_keys = list(model.state_dict().keys())
    add_lorad(model, 3)
    for m in model.modules():
        if isinstance(m, LoRaDLinear):
            nn.init.normal_(m.theta_a, std=0.5)
    x = torch.randn(4, 8)
    before = model["up_blocks"]["proj_out"](model["proj_in"](model["down_blocks"](x)))
    assert len(merge_lorad(model)) == 4
    assert list(model.state_dict().keys()) == stock_keys
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    after = model["up_blocks"]["proj_out"](model["proj_in"](model["down_blocks"](x)))
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_merge_bf16_is_done_in_fp32():
    m = lorad_layer(64, 128, 8, dtype=torch.bfloat16, scale=1e-3)
    model = nn.Sequential(m)
    w32 = rotate(m.weight.float(), m.theta_a @ m.theta_b)
    merge_lorad(model)
    assert model[0].weight.dtype == torch.bfloat16
    assert torch.equal(model[0].weight, w32.to(torch.bfloat16))


def test_state_dict_round_trip_and_strict_load():
    model = tiny_model()
    add_lorad(model, 2)
    for m in model.modules():
        if isinstance(m, LoRaDLinear):
            nn.init.normal_(m.theta_a)
    sd = lorad_state_dict(model)
    assert sorted(sd) == sorted(f"{n}.{k}" for n in ["down_blocks.0", "down_blocks.2", "proj_in", "up_blocks.proj_out"]
                                for k in ("theta_a", "theta_b"))
    assert set(sd) <= set(model.state_dict())  # same names as the model's own state dict
    other = tiny_model()
    add_lorad(other, 2)
    load_lorad(other, {k: v.clone() for k, v in sd.items()})
    x = torch.randn(3, 8)
    assert torch.equal(other["down_blocks"](x), model["down_blocks"](x))
    with pytest.raises(ValueError, match="missing"):
        load_lorad(other, {k: v for k, v in sd.items() if "proj_in" not in k})
    with pytest.raises(ValueError, match="unexpected"):
        load_lorad(other, {**sd, "extra.theta_a": torch.zeros(1)})
    third = tiny_model()
    add_lorad(third, 4)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_lorad(third, sd)


# -----------------------------------------------------------------------------
# the paper's parameter counts (Table 1, Table 3), on the real architectures, without weights

COUNTS = [  # (architecture, adapter, rank, layers, trainable, as printed in the paper's Table 1 / 3)
    ("SD1.5", "student", 64, 182, 20_948_992, "20.95M"),
    ("SD1.5", "student", 128, 182, 41_897_984, "41.90M"),
    ("SD1.5", "student", 256, 182, 83_795_968, "83.80M"),
    ("SD1.5", "student", 512, 182, 167_591_936, "167.59M"),
    ("SD1.5", "fake", 16, 160, 4_689_408, "4.69M"),
    ("SD1.5", "fake", 32, 160, 9_378_816, "9.38M"),
    ("SD1.5", "fake", 64, 160, 18_757_632, "18.76M"),
    ("SD2.1", "student", 256, 214, 94_429_184, "94.43M"),
]


@pytest.mark.parametrize("arch,adapter,rank,layers,expected,paper", COUNTS)
def test_paper_parameter_counts(arch, adapter, rank, layers, expected, paper):
    unet = sd_unet(SD15 if arch == "SD1.5" else SD21)
    names = add_lorad(unet, rank, **(STUDENT if adapter == "student" else FAKE))
    assert len(names) == layers
    assert trainable(unet) == expected
    assert f"{expected / 1e6:.2f}M" == paper


def test_readme_usage_example(tmp_path, monkeypatch):
    """The README's LoRaD example runs as written and does what its comments say."""
    example = [b for b in readme_blocks("python") if "add_lorad" in b][0]
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["names"] == ["0", "2"]
    assert list(torch.load("adapter.pt")) == ["0.theta_a", "0.theta_b", "2.theta_a", "2.theta_b"]
    assert list(scope["model"].state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_readme_transformers_llama(tmp_path, monkeypatch):
    """docs/lorad.md's LLaMA example as written: LoRaD on every attention and MLP projection (by include=), the loss
    falls, merge, save_pretrained, and stock from_pretrained loads a checkpoint without LoRaD keys that gives the
    same logits; against the same random init, the adapted layers' rows are rotated (norms kept) and nothing else
    changed."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM
    example = [b for b in readme_blocks("python", "docs/lorad.md") if "LlamaForCausalLM" in b][0]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)  # the example's model is its first use of the global RNG: rebuilt below, same init
    scope = {}
    exec(compile(example, "docs/lorad.md", "exec"), scope)
    config, ids, losses, names = scope["config"], scope["ids"], scope["losses"], scope["names"]
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert names == [f"model.layers.{i}.{p}" for i in range(config.num_hidden_layers) for p in projections]
    assert losses[-1] < 0.75 * losses[0], losses

    reloaded, info = LlamaForCausalLM.from_pretrained(tmp_path / "tiny-llama-lorad", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    saved = load_file(tmp_path / "tiny-llama-lorad" / "model.safetensors")
    assert sorted(saved) == sorted(base.state_dict())  # the stock keys, no theta_a / theta_b
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, scope["logits"], rtol=1e-5, atol=1e-5)
        assert reloaded(input_ids=ids, labels=ids).loss < 0.75 * losses[0]  # the training is in the checkpoint
    adapted = {f"{n}.weight" for n in names}
    for key, w0 in base.state_dict().items():
        w1 = saved[key]
        if key in adapted:
            torch.testing.assert_close(w1.norm(dim=1), w0.norm(dim=1), rtol=1e-5, atol=0)
            assert (1 - F.cosine_similarity(w0, w1, dim=1)).mean() > 1e-3, key  # direction changed
        else:
            assert torch.equal(w1, w0), key


def test_readme_dreambooth_finetuning(tmp_path, monkeypatch):
    """docs/lorad.md's DreamBooth-style recipe, lorad.py alone in a plain diffusers loop, on the tiny SD-shaped pipeline
    (64 px, 30 steps, a larger lr for a random UNet): the denoising loss (eq. 1) on a fixed draw of noise and
    timesteps falls, and the saved folder is a stock pipeline whose UNet differs from the base only by rotated rows."""
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from safetensors.torch import load_file
    from tiny import build_tiny_pipeline  # a tiny SD-shaped pipeline folder, offline; the recipe knows nothing of wadi
    recipe = [b for b in readme_blocks("python", "docs/lorad.md") if "sks dog" in b][0]
    knobs = "resolution, steps, lr, rank = 512, 400, 1e-4, 64"
    assert knobs in recipe and '"my-dog/*.jpg"' in recipe
    recipe = recipe.replace(knobs, "resolution, steps, lr, rank = 64, 30, 1e-2, 8")
    recipe = recipe.replace('"stable-diffusion-v1-5/stable-diffusion-v1-5"', repr(str(tmp_path / "sd")))
    build_tiny_pipeline(str(tmp_path / "sd"))
    # the subject: a red disk at four places on a noisy grey background
    (tmp_path / "my-dog").mkdir()
    yy, xx = np.mgrid[:64, :64]
    for i in range(4):
        photo = np.random.default_rng(i).integers(110, 150, (64, 64, 3), dtype=np.uint8)
        photo[(yy - 20 - 6 * i) ** 2 + (xx - 40 + 5 * i) ** 2 < 100] = (200, 60, 40)
        Image.fromarray(photo).save(tmp_path / "my-dog" / f"{i}.jpg")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope = {}
    exec(compile(recipe, "docs/lorad.md", "exec"), scope)
    latents, emb, scheduler, names = scope["latents"], scope["emb"], scope["scheduler"], scope["names"]

    base = StableDiffusionPipeline.from_pretrained(tmp_path / "sd").unet
    tuned = StableDiffusionPipeline.from_pretrained(tmp_path / "sks-dog")  # stock diffusers, no lorad.py
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(latents.shape, generator=g), torch.linspace(50, 950, len(latents)).long()

    def denoising_loss(unet):  # eq. 1 on one fixed draw: the training loop's own losses are too noisy to compare
        with torch.no_grad():
            return F.mse_loss(unet(scheduler.add_noise(latents, noise, t), t, emb).sample, noise).item()
    before, after = denoising_loss(base), denoising_loss(tuned.unet)
    print(f"\nDreamBooth-style, eq. 1 on a fixed draw: {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, (before, after)

    saved = load_file(tmp_path / "sks-dog" / "unet" / "diffusion_pytorch_model.safetensors")
    assert sorted(saved) == sorted(base.state_dict())  # stock keys, no theta_a / theta_b
    adapted = {f"{n}.weight" for n in names}
    assert adapted == {f"{n}.weight" for n, m in base.named_modules()
                       if type(m) is nn.Linear and n.startswith(("down_blocks", "mid_block", "up_blocks"))}
    for key, w0 in base.state_dict().items():
        if key in adapted:
            torch.testing.assert_close(saved[key].norm(dim=1), w0.norm(dim=1), rtol=1e-5, atol=0)
        else:
            assert torch.equal(saved[key], w0), key
    image = tuned("a photo of sks dog", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


if __name__ == "__main__":
    print("| model | adapter | targets | rank | layers | trainable |")
    print("|---|---|---|---|---|---|")
    for arch, adapter, rank, *_ in COUNTS:
        unet = sd_unet(SD15 if arch == "SD1.5" else SD21)
        spec = STUDENT if adapter == "student" else FAKE
        names = add_lorad(unet, rank, **spec)
        targets = "/".join(spec["include"]) + ("" if adapter == "student" else " minus " + "/".join(spec["exclude"]))
        print(f"| {arch} | {adapter} | {targets} | {rank} | {len(names)} | {trainable(unet) / 1e6:.2f}M |")
