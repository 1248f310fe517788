"""
LoRaD: Low-rank Rotation of weight Direction (WaDi, CVPR 2026, arXiv 2603.08258), in one file.

    >>> from lorad import add_lorad, merge_lorad, lorad_state_dict, load_lorad
    >>> names = add_lorad(unet, rank=256, include=("down_blocks", "mid_block", "up_blocks"))
    >>> opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    >>> # ...train as usual: only the angles theta_a / theta_b require grad...
    >>> with reuse_rotations(unet):                      # optional: W' formed once per step, not in every call
    >>>     ...forward, backward, opt.step()...
    >>> torch.save(lorad_state_dict(unet), "lorad.pt")  # adapter only: <module>.theta_a / .theta_b
    >>> merge_lorad(unet)                                # plain nn.Linear again, stock state-dict keys

A frozen Linear has weight W (out, in). LoRaD rotates every output row of W inside the in/2 planes
spanned by the input-column pairs (2j, 2j+1), by angles theta = theta_a @ theta_b (out x in/2, rank r):

    W'[:, 2j]   = cos(theta) W[:, 2j] - sin(theta) W[:, 2j+1]
    W'[:, 2j+1] = sin(theta) W[:, 2j] + cos(theta) W[:, 2j+1]        y = x W'^T + b

Rotations keep each row's norm and change only its direction ("keep the norm, rotate the direction").
The paper writes W as d x k with d = in_features, so its Theta = AB (d/2 x k) is our theta transposed.
Needs torch alone.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

# -----------------------------------------------------------------------------
# the rotation itself


def rotate_reference(weight, theta):
    """Eq. (4)-(5) literally: build each output row's block-diagonal rotation matrix and apply it."""
    out_features, in_features = weight.shape
    j = torch.arange(0, in_features, 2, device=weight.device)
    rows = []
    for i in range(out_features):
        c, s = torch.cos(theta[i]), torch.sin(theta[i])
        R = torch.zeros(in_features, in_features, dtype=weight.dtype, device=weight.device)
        R[j, j], R[j, j + 1] = c, -s  # (cos -sin)
        R[j + 1, j], R[j + 1, j + 1] = s, c  # (sin  cos), one 2x2 block per pair
        rows.append(R @ weight[i])
    return torch.stack(rows)


def rotate(weight, theta):
    """Eq. (8)/(10), vectorized: a pair (w_2j, w_2j+1) is the complex number w_2j + i w_2j+1, and
    rotating it by theta is multiplying by e^{i theta}. One complex multiply does every 2x2 block at
    once, with no strided copies. Computed in fp32 (or fp64 if given): small angles vanish in fp16."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    theta = theta.to(dtype)
    if torch.compiler.is_compiling():  # inductor has no complex code generation; these real ops fuse into one kernel
        w, c, s = weight.to(dtype).unflatten(-1, (-1, 2)), theta.cos(), theta.sin()
        return torch.stack([c * w[..., 0] - s * w[..., 1], s * w[..., 0] + c * w[..., 1]], -1).flatten(-2)
    w = torch.view_as_complex(weight.to(dtype).reshape(*weight.shape[:-1], -1, 2))
    # e^{i theta} = polar(1, theta): one op for cos, sin and the complex number they make
    return torch.view_as_real(torch.polar(torch.ones_like(theta), theta) * w).flatten(-2)


# -----------------------------------------------------------------------------
# the memory-light training path


@contextlib.contextmanager
def reuse_rotations(model):
    """Inside the block, each LoRaD layer of `model` forms W' (and casts its bias) once per value of its angles, not
    in each call and backward (~6 GPU kernel launches): a step of an optimizer that holds them makes it form W' anew.
    Angles changed otherwise (loaded, edited) need the block left. Holds one W' per layer, in the matmul's dtype."""
    layers = [m for _, m in _lorad_modules(model)]
    angles = {id(p): p for m in layers for p in (m.theta_a, m.theta_b)}  # held: their ids are never another's

    def forget(optimizer, *_):  # after every optimizer's step (fused ones do not bump the angles' _version)
        if any(angles.get(id(p)) is p for group in optimizer.param_groups for p in group["params"]):
            for m in layers:
                m._reuse.clear()
    outer = [m._reuse for m in layers]  # an enclosing block's cache: shared, and given back at the end
    for m in layers:
        m._reuse = {} if m._reuse is None else m._reuse  # the matmul's dtype -> (W', bias) in it
    with register_optimizer_step_post_hook(forget):  # removed at the block's end
        try:
            yield
        finally:
            for m, cache in zip(layers, outer):
                m._reuse = cache


def _autocast_dtype(device):
    """The dtype autocast runs matmuls in on this device type, or None where it is off (or absent, as on meta)."""
    on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    return torch.get_autocast_dtype(device) if on else None


def _rotated(reuse, weight, bias, theta_a, theta_b, dtype):
    """W' = rotate(W, theta_a @ theta_b) in fp32 (autocast would round theta) and the bias, cast to the matmul's
    `dtype`; kept in `reuse`, the layer's dict inside reuse_rotations() (else None)."""
    reuse = {} if reuse is None else reuse
    if dtype not in reuse:
        device = weight.device.type
        with torch.autocast(device, enabled=False) if _autocast_dtype(device) else contextlib.nullcontext():
            reuse[dtype] = rotate(weight, theta_a @ theta_b).to(dtype), None if bias is None else bias.to(dtype)
    return reuse[dtype]


class _LoRaDFunction(torch.autograd.Function):
    """y = x rotate(W, theta_a @ theta_b)^T + b, saving only x and the parameters for backward.

    Plain autograd would keep theta, cos, sin and W' alive (about 8 bytes per weight element); all of
    them are cheap to recompute from the parameters, so backward forms W' again (or reuses it: reuse_rotations)."""

    @staticmethod
    def forward(ctx, x, weight, bias, theta_a, theta_b, reuse):
        x = x.to(_autocast_dtype(x.device.type) or x.dtype)  # under autocast, the matmul in its dtype, as nn.Linear
        ctx.save_for_backward(x, weight, bias, theta_a, theta_b)
        ctx.reuse = reuse
        return F.linear(x, *_rotated(reuse, weight, bias, theta_a, theta_b, x.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, theta_a, theta_b = ctx.saved_tensors
        w_rot, _ = _rotated(ctx.reuse, weight, bias, theta_a, theta_b, x.dtype)  # forward's W', in the matmul's dtype
        dy = dy.to(x.dtype)
        dx = dy @ w_rot if ctx.needs_input_grad[0] else None
        # G = dL/dW' is the weight-gradient GEMM a frozen Linear would skip: LoRaD's one real cost.
        G = (dy.flatten(0, -2).mT @ x.flatten(0, -2)).to(torch.promote_types(x.dtype, torch.float32))
        # d/dtheta of the pair w' = w e^{i theta} is i w', so dL/dtheta = Re(conj(g) i w') = Im(g conj(w'))
        # = G_odd W'_even - G_even W'_odd, in reals: the complex form would copy conj(w') and a strided .imag.
        g, w = G.unflatten(-1, (-1, 2)), w_rot.unflatten(-1, (-1, 2))
        dtheta = (g[..., 1] * w[..., 0]).addcmul_(g[..., 0], w[..., 1], value=-1)
        dw = rotate(G, -(theta_a @ theta_b)).to(weight.dtype) if ctx.needs_input_grad[1] else None  # W' = R W
        db = dy.flatten(0, -2).sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, dtheta @ theta_b.T, theta_a.T @ dtheta, None


class LoRaDLinear(nn.Linear):
    """A frozen nn.Linear plus trainable rotation angles theta_a (out x r) and theta_b (r x in/2).

    It holds the base Linear's own weight and bias Parameters (no copy): models that share a base keep
    sharing it. Angles are fp32 whatever the base dtype. theta_a = 0, so at init it is the base layer."""

    def __init__(self, base: nn.Linear, rank: int):
        if base.in_features % 2:
            raise ValueError(f"LoRaD rotates pairs of input features: in_features={base.in_features} is odd")
        if rank < 1:
            raise ValueError(f"LoRaD rank must be >= 1, got {rank}")
        nn.Module.__init__(self)  # skip nn.Linear.__init__: it would allocate and init a new weight
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.weight, self.bias = base.requires_grad_(False).weight, base.bias
        device = base.weight.device
        self.theta_a = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))
        self.theta_b = nn.Parameter(torch.empty(rank, self.in_features // 2, device=device, dtype=torch.float32))
        nn.init.xavier_uniform_(self.theta_b)
        self._reuse = None  # W' by dtype, inside reuse_rotations()

    def __getstate__(self):  # a copy (deepcopy, pickle) made inside reuse_rotations() forms its own W'
        return {**super().__getstate__(), "_reuse": None}

    def forward(self, x):
        return _LoRaDFunction.apply(x, self.weight, self.bias, self.theta_a, self.theta_b, self._reuse)

    def merged_weight(self):
        """The rotated weight, computed in fp32 and cast to the base dtype only at the end."""
        return rotate(self.weight, self.theta_a @ self.theta_b).to(self.weight.dtype)

    def extra_repr(self):
        return super().extra_repr() + f", rank={self.rank}"


# -----------------------------------------------------------------------------
# whole-model helpers


def _lorad_modules(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRaDLinear)]


def _set_submodule(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _no_match_message(model, include, exclude):
    """Loud: a model with nothing to train would train without an error. Layers are told by a 2-D weight that is not an
    embedding table (duck-typed, torch alone: transformers' Conv1D, nn.Linear subclasses such as quantized layers)."""
    found = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            found.setdefault(type(m).__name__, []).append(name)
    return (f"add_lorad matched no nn.Linear with include={include!r}, exclude={exclude!r}, so nothing would train; the "
            "model's layers with a 2-D weight: " + (", ".join(f"{k} x{len(v)} (e.g. {v[0]!r})" for k, v in found.items())
                                                     or "none") + ", of which LoRaD adapts exact nn.Linear only"
            + (" (transformers' Conv1D, as in GPT-2, stores its weight transposed: not supported)" if "Conv1D" in found else ""))


def add_lorad(model, rank, include=("",), exclude=()):
    """Turn, in place, every nn.Linear whose qualified name contains an `include` substring and no
    `exclude` substring into a LoRaDLinear; freeze everything else. Returns the converted names; if
    there are none, raises ValueError rather than leaving a model with nothing to train.
    Works on a model built under torch.device("meta") (for counting parameters without weights)."""
    if _lorad_modules(model):
        raise ValueError("model already has LoRaD adapters: merge_lorad() it first, or build a fresh copy")
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and any(s in name for s in include) and not any(s in name for s in exclude)]
    if not names:
        raise ValueError(_no_match_message(model, include, exclude))
    for name in names:  # check every layer before changing any: no half-converted model on error
        if model.get_submodule(name).in_features % 2:
            raise ValueError(f"LoRaD needs an even in_features: {name} has {model.get_submodule(name).in_features}")
    model.requires_grad_(False)
    for name in names:
        _set_submodule(model, name, LoRaDLinear(model.get_submodule(name), rank))
    return names


@torch.no_grad()
def merge_lorad(model):
    """Turn every LoRaDLinear back into a plain nn.Linear holding its rotated weight (merged in fp32).
    The merged model's state-dict keys are exactly the stock model's. Returns the merged names."""
    merged = _lorad_modules(model)
    for name, m in merged:
        with torch.device("meta"):  # shell only; its weight and bias are replaced below
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        linear.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
        linear.bias = m.bias
        _set_submodule(model, name, linear)
    return [name for name, _ in merged]


def lorad_state_dict(model):
    """Adapter tensors only, keyed <module>.theta_a / <module>.theta_b (as the authors' checkpoints)."""
    return {f"{name}.{k}": getattr(m, k).detach() for name, m in _lorad_modules(model) for k in ("theta_a", "theta_b")}


@torch.no_grad()
def load_lorad(model, state_dict):
    """Load adapter tensors into a model that add_lorad() prepared; strict about keys and shapes."""
    own = lorad_state_dict(model)
    missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
    if missing or unexpected:
        few = lambda keys: f"{keys[:3]}{'...' * (len(keys) > 3)} ({len(keys)})"
        raise ValueError(f"LoRaD keys do not match: missing {few(missing)}, unexpected {few(unexpected)};"
                         " same include/exclude and model as the checkpoint?")
    for k, t in own.items():
        if state_dict[k].shape != t.shape:
            raise ValueError(f"LoRaD shape mismatch for {k}: checkpoint {tuple(state_dict[k].shape)}, "
                             f"model {tuple(t.shape)} (different rank?)")
    for k, t in own.items():
        t.copy_(state_dict[k])
