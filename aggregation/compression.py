"""What crosses the network: the job file's ``compression: none | fp16 | int8``, and error feedback.

The codecs are hivemind's (1.1.12): ``NoCompression``, ``Float16Compression`` (IEEE half: ~3
significant digits, values below 6e-5 lose relative precision and below 3e-8 become 0) and
``Uniform8BitQuantization`` (256 buckets over mean +- 3 std of each part, each bucket decoded as
the mean of the values in it; values beyond 3 std land in the edge buckets). ``make_compression``
maps the job file's name onto one; ``compress`` / ``decompress`` are hivemind's
``serialize_torch_tensor`` / ``deserialize_torch_tensor``.

Lossy compression of pseudo-gradients drops the same small components round after round.
``ErrorFeedback`` (Seide et al. 2014, "1-bit SGD"; Karimireddy et al. 2019, "Error Feedback
Fixes SignSGD") keeps what was lost and adds it to the next round's update, so the sum of what
was sent tracks the sum of the true updates up to one round's residual.

numpy >= 2.4 no longer converts a one-element array to ``int``, which hivemind 1.1.12's 8-bit
decoder does; ``Uniform8Bit`` below is hivemind's codec with that one line fixed, and importing
this module installs it as hivemind's decoder for ``UNIFORM_8BIT`` messages. Import it in every
process that receives 8-bit tensors, before the averager process forks.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.compression import serialization as _hivemind_serialization
from hivemind.proto import runtime_pb2

from dht.errors import GPUFlexError


class CompressionConfigError(GPUFlexError, ValueError):
    """The job file names a compression that does not exist."""


class Uniform8Bit(Uniform8BitQuantization):
    """hivemind's ``Uniform8BitQuantization``, decodable under numpy >= 2.4 (same wire format)."""

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        # Upstream's body, except for ``[0]`` (``int()`` of a 1-element array is an error in numpy 2.4)
        # and copying out of the read-only buffer up front (so torch does not warn about it).
        buffer = serialized_tensor.buffer
        codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.from_numpy(quantized.astype(np.int64)).reshape(tuple(serialized_tensor.size))
        codebook = torch.tensor(codebook, dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)


def _install_8bit_decoder() -> None:
    """Make hivemind's deserializer (used by its all-reduce on every received part) use ``Uniform8Bit``."""
    name = runtime_pb2.CompressionType.Name(Uniform8Bit.compression_type)
    _hivemind_serialization._BASE_COMPRESSION_TYPES[name] = Uniform8Bit()


_install_8bit_decoder()

COMPRESSIONS: dict[str, type[CompressionBase]] = {
    "none": NoCompression,
    "fp16": Float16Compression,
    "int8": Uniform8Bit,
}
LOSSLESS = frozenset({"none"})


def make_compression(name: str) -> CompressionBase:
    """The hivemind codec for the job file's ``compression:`` value (for the averager's ``compression=``)."""
    if name not in COMPRESSIONS:
        raise CompressionConfigError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")
    return COMPRESSIONS[name]()


def compress(tensor: torch.Tensor, compression: CompressionBase | str) -> runtime_pb2.Tensor:
    """Encode a tensor as hivemind's all-reduce would put it on the wire."""
    codec = make_compression(compression) if isinstance(compression, str) else compression
    return serialize_torch_tensor(tensor.detach().cpu(), codec.compression_type)


def decompress(message: runtime_pb2.Tensor) -> torch.Tensor:
    """Decode a message from ``compress`` (or from any hivemind peer)."""
    return deserialize_torch_tensor(message)


def round_trip(
    tensor: torch.Tensor,
    compression: CompressionBase | str,
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,
) -> torch.Tensor:
    """What a receiver decodes when ``tensor`` is sent with ``compression`` (CPU, ``tensor``'s dtype).

    Split into parts exactly as hivemind's ``TensorPartContainer`` splits each tensor (same
    ``part_size_bytes`` as the averager's), because 8-bit quantization is fitted per part: the
    result is then bit-for-bit what the network delivers for parts sent to other peers.
    """
    codec = make_compression(compression) if isinstance(compression, str) else compression
    flat = tensor.detach().cpu().reshape(-1)
    if isinstance(codec, NoCompression) or flat.numel() == 0:
        return flat.clone().reshape(tensor.shape)
    info = CompressionInfo.from_tensor(tensor)
    part_size_values = int(part_size_bytes / (flat.element_size() * codec.estimate_compression_ratio(info)))
    parts = [decompress(compress(part, codec)) for part in flat.split(part_size_values)]
    return torch.cat(parts).to(tensor.dtype).reshape(tensor.shape)


class ErrorFeedback:
    """Carries the part of each update that lossy compression lost into the next round.

    Per round::

        compensated = ef.compensate(updates)         # update + residual: hand these to the averager
        ...the averager sends them with the codec...
        ef.record(compensated, transmitted)          # residual = compensated - what actually went out

    ``record`` without ``transmitted`` assumes everything went out through the codec
    (``round_trip``); a peer that reduced some parts itself sent those uncompressed and may pass
    the exact ``transmitted`` instead. ``step`` does all three for a pure pipeline and returns
    what was transmitted. Telescoping, after ``T`` rounds
    ``sum(transmitted) = sum(updates) - residual_T``: the error does not accumulate.
    Residuals are CPU tensors, float32 at least.
    """

    def __init__(self, compression: CompressionBase | str, part_size_bytes: int = DEFAULT_PART_SIZE_BYTES):
        self.compression = make_compression(compression) if isinstance(compression, str) else compression
        self.part_size_bytes = part_size_bytes
        self.residuals: list[torch.Tensor] | None = None  # created on the first update, like its shapes

    @torch.no_grad()
    def compensate(self, updates: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """``update + residual`` for each tensor (the residual is zero in the first round)."""
        updates = [u.detach().to("cpu", torch.promote_types(u.dtype, torch.float32)) for u in updates]
        if self.residuals is None:
            self.residuals = [torch.zeros_like(u) for u in updates]
        self._check_like_residuals(updates)
        return [torch.add(u, r) for u, r in zip(updates, self.residuals)]

    @torch.no_grad()
    def record(self, compensated: Sequence[torch.Tensor], transmitted: Sequence[torch.Tensor] | None = None) -> None:
        """Keep ``compensated - transmitted`` as the residual for the next round."""
        if transmitted is None:
            transmitted = [round_trip(c, self.compression, self.part_size_bytes) for c in compensated]
        if self.residuals is None:
            self.residuals = [torch.zeros_like(c) for c in compensated]
        self._check_like_residuals(compensated)
        self._check_like_residuals(transmitted)
        for r, c, t in zip(self.residuals, compensated, transmitted):
            torch.sub(c.detach().to("cpu", r.dtype), t.detach().to("cpu", r.dtype), out=r)

    def step(self, updates: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """Compensate, compress and decompress, record the new residual; returns what was transmitted."""
        compensated = self.compensate(updates)
        transmitted = [round_trip(c, self.compression, self.part_size_bytes) for c in compensated]
        self.record(compensated, transmitted)
        return transmitted

    def reset(self) -> None:
        """Forget the residuals (e.g. when the model or its shapes change)."""
        self.residuals = None

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": None if self.residuals is None else [r.clone() for r in self.residuals]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        residuals = state["residuals"]
        self.residuals = None if residuals is None else [r.detach().to("cpu").clone() for r in residuals]

    def _check_like_residuals(self, tensors: Sequence[torch.Tensor]) -> None:
        if len(tensors) != len(self.residuals) or any(t.shape != r.shape for t, r in zip(tensors, self.residuals)):
            raise ValueError("tensors do not match the shapes error feedback was started with")
