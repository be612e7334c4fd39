"""The model catalog: build a job's network from its :class:`~swarm.spec.ModelSpec` and data manifest.

Every model is ``Sequential(normalize, body[, denormalize])``:

- ``normalize`` holds the train split's feature mean/std as buffers, so they are part of the
  state dict: the exported model does its own preprocessing and a consumer feeds it raw features;
- ``body`` is the catalog network or the user's custom module, mapping normalised
  ``(B, *feature_shape)`` inputs to ``(B, num_outputs)``. The catalog: ``mlp`` (any features,
  flattened), ``cnn`` (ResNet basic blocks over ``(channels, height, width)``) and ``transformer``
  (an encoder over ``(seq_len, token_features)`` sequences; flat features are one token each).
  ``model.input_shape`` reshapes flat features (a csv row) to what the network wants;
- ``denormalize`` (regression only) maps the body's standardised output back to target units, so
  predictions are in the units of the data. A trainer should compute the regression loss on
  standardised values, ``(output - y) / target_std``, to keep the loss scale-free.

No BatchNorm anywhere in the catalog: its running statistics are not parameters, so averaging
models across peers would not be well defined. The cnn uses GroupNorm instead.

Initial weights are a pure function of ``seed``: every peer that builds the same spec with the
same seed gets bit-identical weights, without touching the process's global RNG state.
"""

from __future__ import annotations

import importlib
import math
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dht.errors import GPUFlexError
from swarm.shards import DatasetManifest
from swarm.spec import ModelSpec

__all__ = [
    "Denormalize",
    "ModelBuildError",
    "Normalize",
    "build_model",
    "count_parameters",
    "flops_per_sample",
]


class ModelBuildError(GPUFlexError):
    """The model section cannot be built for this data; the message names the ``model.<field>``."""


class Normalize(nn.Module):
    """``(x - mean) / std`` with per-feature statistics kept as (state-dict) buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], feature_shape: Sequence[int]):
        super().__init__()
        shape = tuple(feature_shape)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Denormalize(nn.Module):
    """``y * std + mean``: a standardised regression output back in target units."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(float(std), dtype=torch.float32))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.std + self.mean


class Reshape(nn.Module):
    """``(B, ...) -> (B, *shape)``."""

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class ResidualBlock(nn.Module):
    """A ResNet basic block: ``relu(x' + conv-norm-relu-conv-norm(x))``.

    ``x'`` is ``x`` itself when the channel count stays, else a 1x1 convolution (the ResNet
    projection shortcut). GroupNorm, not BatchNorm (see the module docstring). The skip path lets
    gradients reach early layers directly, which is what makes deeper stacks train.
    """

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(channels_out), channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(channels_out), channels_out)
        self.shortcut = (
            nn.Identity() if channels_in == channels_out else nn.Conv2d(channels_in, channels_out, kernel_size=1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SequenceTransformer(nn.Module):
    """A small transformer encoder over a sequence of ``seq_len`` tokens of ``token_features`` values.

    Each token's values go through a shared ``Linear(token_features, d_model)`` embedding plus a
    learned per-position embedding (which gives the encoder the order); a learned CLS token is
    prepended and the prediction is read from it after a pre-norm encoder. Plain tabular features
    are the special case ``token_features = 1``: each feature is one token.
    """

    def __init__(self, seq_len: int, token_features: int, num_outputs: int, d_model: int, layers: int, heads: int,
                 dropout: float):
        super().__init__()
        self.seq_len, self.token_features = seq_len, token_features
        self.value_embedding = nn.Linear(token_features, d_model)
        self.position_embedding = nn.Parameter(torch.empty(1, seq_len, d_model))
        self.cls_token = nn.Parameter(torch.empty(1, 1, d_model))
        nn.init.normal_(self.position_embedding, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            dim_feedforward=2 * d_model,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        # Nested tensors only help with padding masks (we have none) and warn with norm_first.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence = x.reshape(x.shape[0], self.seq_len, self.token_features)
        tokens = self.value_embedding(sequence) + self.position_embedding
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.head(self.norm(self.encoder(tokens)[:, 0]))


def build_model(model: ModelSpec, manifest: DatasetManifest, seed: int = 0) -> nn.Module:
    """The job's network, with weights initialised deterministically from ``seed``.

    Peers pass the job's ``training.seed`` so that they all start from the same weights.
    """
    feature_shape = tuple(manifest.feature_shape)
    # fork_rng restores the global RNG afterwards: building a model must not change the random
    # stream of whatever the caller does next, and must not depend on what it did before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model.custom is not None:
            body = _build_custom(model, feature_shape, manifest.num_outputs)
        elif model.catalog == "mlp":
            body = _mlp(model, feature_shape, manifest.num_outputs)
        elif model.catalog == "cnn":
            body = _cnn(model, feature_shape, manifest.num_outputs)
        elif model.catalog == "transformer":
            body = _transformer(model, feature_shape, manifest.num_outputs)
        else:  # pragma: no cover - ModelSpec's validator rules this out
            raise ModelBuildError(f"model.catalog: unknown architecture {model.catalog!r}")
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            normalize=Normalize(manifest.feature_mean, manifest.feature_std, feature_shape),
            body=body,
        )
        if manifest.task == "regression":
            assert manifest.target_mean is not None and manifest.target_std is not None
            layers["denormalize"] = Denormalize(manifest.target_mean, manifest.target_std)
        net = nn.Sequential(layers)
        if model.custom is not None:
            _check_output_shape(net, feature_shape, manifest.num_outputs, model.custom)
    return net


def _mlp(model: ModelSpec, feature_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    width = math.prod(_input_shape(model, feature_shape))
    layers: list[nn.Module] = [nn.Flatten()]
    for hidden in model.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if model.dropout > 0:
            layers.append(nn.Dropout(model.dropout))
        width = hidden
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def _cnn(model: ModelSpec, feature_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    shape = _input_shape(model, feature_shape)
    if len(shape) != 3:
        raise ModelBuildError(
            f"model.input_shape: cnn needs (channels, height, width) inputs but features have shape "
            f"{list(feature_shape)}; set input_shape, e.g. [1, H, W] with H*W = {math.prod(feature_shape)}"
        )
    channels_in, height, width = shape
    layers: list[nn.Module] = [Reshape(shape)]
    for channels in model.channels:
        layers.append(ResidualBlock(channels_in, channels))
        # Pool only while there is something left to pool: tiny inputs (8x8 digits) would
        # otherwise shrink to nothing after a few blocks.
        if height >= 2 and width >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        channels_in = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if model.dropout > 0:
        layers.append(nn.Dropout(model.dropout))
    layers.append(nn.Linear(channels_in, num_outputs))
    return nn.Sequential(*layers)


def _groups(channels: int, most: int = 8) -> int:
    """The largest divisor of ``channels`` that is at most ``most``: GroupNorm's group count."""
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


def _transformer(model: ModelSpec, feature_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    shape = _input_shape(model, feature_shape)
    if len(shape) == 1:  # flat features: each one is a token of one value
        shape = (shape[0], 1)
    if len(shape) != 2:
        raise ModelBuildError(
            f"model.input_shape: transformer needs (seq_len, token_features) inputs but features have shape "
            f"{list(shape)}; set input_shape, e.g. [{math.prod(shape)}, 1]"
        )
    seq_len, token_features = shape
    return SequenceTransformer(seq_len, token_features, num_outputs, model.d_model, model.layers, model.heads,
                               model.dropout)


def _input_shape(model: ModelSpec, feature_shape: tuple[int, ...]) -> tuple[int, ...]:
    if model.input_shape is None:
        return feature_shape
    if math.prod(model.input_shape) != math.prod(feature_shape):
        raise ModelBuildError(
            f"model.input_shape: {model.input_shape} holds {math.prod(model.input_shape)} values but each "
            f"sample has {math.prod(feature_shape)} features (shape {list(feature_shape)})"
        )
    return tuple(model.input_shape)


def _build_custom(model: ModelSpec, feature_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    target = model.custom
    assert target is not None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure in user code is the user's to fix
        raise ModelBuildError(f"model.custom: cannot import module '{module_name}' ({type(e).__name__}: {e})") from None
    fn: Any = getattr(module, attr, None)
    if fn is None:
        raise ModelBuildError(f"model.custom: module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise ModelBuildError(f"model.custom: '{target}' is not callable (it is a {type(fn).__name__})")
    try:
        body = fn(feature_shape=feature_shape, num_outputs=num_outputs, **model.options)
    except Exception as e:
        raise ModelBuildError(f"model.custom: '{target}' failed ({type(e).__name__}: {e})") from None
    if not isinstance(body, nn.Module):
        raise ModelBuildError(f"model.custom: '{target}' returned {type(body).__name__}, expected a torch.nn.Module")
    return body


def _check_output_shape(net: nn.Module, feature_shape: tuple[int, ...], num_outputs: int, target: str) -> None:
    """Run a custom model once so a wrong output shape fails at submit time, not on every peer."""
    was_training = net.training
    net.eval()  # eval: no dropout randomness, no running-statistics updates
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, *feature_shape))
    except Exception as e:
        raise ModelBuildError(
            f"model.custom: '{target}' failed on a (2, {', '.join(map(str, feature_shape))}) input "
            f"({type(e).__name__}: {e})"
        ) from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_outputs):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelBuildError(f"model.custom: '{target}' returns {got} for a batch of 2, expected (2, {num_outputs})")


def count_parameters(module: nn.Module) -> int:
    """Number of parameter values (buffers such as the normalisation statistics not included)."""
    return sum(p.numel() for p in module.parameters())


def flops_per_sample(module: nn.Module, manifest: DatasetManifest) -> int:
    """Rough forward FLOPs for one sample, counting a multiply-add as 2 FLOPs.

    Measured by running one zero sample through the model with forward hooks: Linear and Conv
    layers and attention are counted exactly (attention: the q/k/v/out projections plus the
    score and weighted-sum matmuls); any other layer with parameters counts 2 FLOPs per
    parameter; parameter-free elementwise ops are ignored. A training step costs about 3x this
    (forward + backward). Good enough for a cost quote, which only needs the right magnitude.
    """
    total = 0

    def count(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += 2 * mod.in_features * mod.out_features * (out.numel() // mod.out_features)
        elif isinstance(mod, nn.modules.conv._ConvNd):
            kernel = math.prod(mod.kernel_size) * (mod.in_channels // mod.groups)
            total += 2 * kernel * out.numel()
        elif isinstance(mod, nn.MultiheadAttention):
            query = args[0] if args else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs.get("key", query)
            seq_dim = 1 if mod.batch_first else 0
            lq, lk, d = query.shape[seq_dim], key.shape[seq_dim], mod.embed_dim
            total += 2 * lq * d * d * 2 + 2 * lk * d * d * 2  # q and out projections; k and v
            total += 2 * 2 * lq * lk * d  # scores q @ k^T and weights @ v
        elif not any(True for _ in mod.children()):
            total += 2 * sum(p.numel() for p in mod.parameters(recurse=False))

    handles = [m.register_forward_hook(count, with_kwargs=True) for m in module.modules()]
    was_training = module.training
    # Eval mode (no dropout draws, no running-statistics updates) but with autograd on: under
    # no_grad, eval-mode transformer layers take a fused fast path that skips the attention
    # module's forward, and so its hook.
    module.eval()
    try:
        with torch.enable_grad():
            module(torch.zeros(1, *manifest.feature_shape))
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return int(total)
