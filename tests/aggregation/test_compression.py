"""Compression on hivemind's codecs: error bounds, hivemind's own partitioning, error feedback."""

import asyncio
import math

import pytest
import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import (
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)

from aggregation.compression import (
    COMPRESSIONS,
    CompressionConfigError,
    ErrorFeedback,
    compress,
    decompress,
    make_compression,
    round_trip,
)
from dht.errors import GPUFlexError

pytestmark = pytest.mark.timeout(60)

FP16_UNIT_ROUNDOFF = 2.0**-11  # half of fp16's machine epsilon: the relative error of rounding to fp16
FP16_SMALLEST_SUBNORMAL = 2.0**-24


def _randn(*shape, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale + shift


def test_job_file_names_map_to_hivemind_codecs():
    assert set(COMPRESSIONS) == {"none", "fp16", "int8"}
    assert isinstance(make_compression("none"), NoCompression)
    assert isinstance(make_compression("fp16"), Float16Compression)
    assert isinstance(make_compression("int8"), Uniform8BitQuantization)
    with pytest.raises(CompressionConfigError) as error:
        make_compression("int4")
    assert isinstance(error.value, GPUFlexError)


def test_none_is_exact():
    x = _randn(3, 5)
    y = decompress(compress(x, "none"))
    assert torch.equal(x, y) and y.dtype == x.dtype
    assert torch.equal(round_trip(x, "none"), x)


def test_fp16_relative_error_bound():
    x = _randn(10_000, scale=10.0)
    message = compress(x, make_compression("fp16"))
    assert len(message.buffer) == 2 * x.numel()  # half the bytes of float32
    y = decompress(message)
    assert y.dtype == torch.float32 and y.shape == x.shape
    # rounding to nearest: |y - x| <= 2^-11 |x| in the normal range, <= half a subnormal step below it
    assert bool(((y - x).abs() <= FP16_UNIT_ROUNDOFF * x.abs() + FP16_SMALLEST_SUBNORMAL / 2).all())


def test_fp16_flushes_tiny_values():
    # why error feedback matters for fp16 pseudo-gradients: 1e-8 is below half fp16's smallest step
    assert round_trip(torch.full((4,), 1e-8), "fp16").abs().max().item() == 0.0


def test_int8_error_bound():
    x = _randn(10_000, scale=0.01, shift=0.003)
    message = compress(x, "int8")
    assert len(message.buffer) < 0.3 * 4 * x.numel()  # one byte per value plus a 256-entry codebook
    y = decompress(message)  # through hivemind's own deserializer (with the numpy-2.4 decoder installed)
    int8_type = make_compression("int8").compression_type
    assert torch.equal(y, deserialize_torch_tensor(serialize_torch_tensor(x, int8_type)))
    # Uniform8BitQuantization: 256 buckets of width 6 sigma / 256 over mean +- 3 sigma; a value inside that
    # range is decoded as the mean of its bucket, so it is off by less than one bucket width
    sigma = ((x - x.mean()).norm() / math.sqrt(x.numel() - 1)).item()
    width = 6 * sigma / 256
    inside = (x - x.mean()).abs() < 3 * sigma - width
    assert bool(((y - x)[inside].abs() <= width).all())
    assert (y - x).pow(2).mean().sqrt().item() < 0.05 * sigma  # the tails beyond 3 sigma included


def test_int8_keeps_constant_tensors_exact():
    for x in (torch.zeros(5), torch.full((4,), 3.0), torch.tensor([0.0, 0.0, 0.0, 1000.0])):
        assert torch.equal(round_trip(x, "int8"), x)


@pytest.mark.parametrize("name", ["fp16", "int8"])
def test_round_trip_is_what_hiveminds_all_reduce_sends(name):
    # hivemind cuts each tensor into parts of part_size_bytes (after compression) and compresses each part
    # on its own; 8-bit quantization is fitted per part, so round_trip must cut the same way
    tensors = [_randn(3000, seed=1, scale=0.1), _randn(40, 50, seed=2, scale=5.0, shift=1.0)]
    codec, part_size_bytes = make_compression(name), 1024

    async def sent_by_hivemind():
        container = TensorPartContainer(
            tensors, peer_fractions=[1.0], compression=codec, part_size_bytes=part_size_bytes
        )
        parts = [deserialize_torch_tensor(m) async for m in container.iterate_input_parts_for(0)]
        container.finalize()
        return torch.cat(parts)

    expected = asyncio.run(sent_by_hivemind())
    ours = torch.cat([round_trip(x, codec, part_size_bytes).reshape(-1) for x in tensors])
    assert torch.equal(ours, expected)
    if name == "int8":  # and per-part fitting is not the same as fitting the whole tensor
        assert not torch.equal(ours, torch.cat([round_trip(x, codec).reshape(-1) for x in tensors]))


def test_error_feedback_recovers_what_fp16_flushes():
    # 100 rounds of 1e-8 per coordinate: fp16 sends 0 every time without feedback; with it, the residual
    # builds up until a representable value goes out, and the total sent stays within one fp16 step
    update, rounds = torch.full((8,), 1e-8), 100
    feedback = ErrorFeedback("fp16")
    sent_total = torch.zeros(8, dtype=torch.float64)
    for _ in range(rounds):
        sent_total += feedback.step([update])[0].double()
    true_total = rounds * 1e-8
    assert round_trip(update, "fp16").abs().sum() == 0  # no feedback: nothing ever arrives
    assert bool(((sent_total - true_total).abs() <= FP16_SMALLEST_SUBNORMAL).all())
    assert feedback.residuals[0].abs().max().item() <= FP16_SMALLEST_SUBNORMAL


@pytest.mark.parametrize("name", ["fp16", "int8"])
def test_error_feedback_tracks_the_true_sum(name):
    rounds, feedback = 50, ErrorFeedback(name)
    updates = [
        [_randn(1000, seed=t, scale=1e-3, shift=1e-4), _randn(4, 4, seed=1000 + t, scale=1e-2)] for t in range(rounds)
    ]
    true_total = [torch.zeros(1000, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)]
    sent_total = [torch.zeros_like(x) for x in true_total]
    plain_total = [torch.zeros_like(x) for x in true_total]
    one_round_error, largest_residual = 0.0, 0.0
    for update in updates:
        sent = feedback.step(update)
        for i, (u, s) in enumerate(zip(update, sent)):
            true_total[i] += u.double()
            sent_total[i] += s.double()
            plain = round_trip(u, name)
            plain_total[i] += plain.double()
            one_round_error = max(one_round_error, (plain - u).abs().max().item())
        largest_residual = max(largest_residual, max(r.abs().max().item() for r in feedback.residuals))
    for true, sent, plain, residual in zip(true_total, sent_total, plain_total, feedback.residuals):
        # telescoping: what was sent in total is the true total minus the last residual
        assert torch.allclose(true - sent, residual.double(), atol=1e-6)
        # so the total error is one residual, not a random walk over 50 rounds of codec error
        assert (true - sent).norm() < 0.5 * (true - plain).norm()
    assert largest_residual <= 2 * one_round_error  # the residual stays bounded


def test_error_feedback_with_an_explicit_transmission():
    # a peer that reduced some parts itself sent those uncompressed: it records the exact transmission
    feedback = ErrorFeedback("int8")
    update = [torch.tensor([1.0, 2.0, 3.0, 4.0])]
    compensated = feedback.compensate(update)
    transmitted = [torch.tensor([1.0, 2.0, 3.5, 4.0])]
    feedback.record(compensated, transmitted)
    assert torch.equal(feedback.residuals[0], torch.tensor([0.0, 0.0, -0.5, 0.0]))
    assert torch.equal(feedback.compensate(update)[0], torch.tensor([1.0, 2.0, 2.5, 4.0]))


def test_error_feedback_state_round_trip_and_shape_check():
    feedback = ErrorFeedback("fp16")
    feedback.step([torch.full((3,), 1e-8)])
    restored = ErrorFeedback("fp16")
    restored.load_state_dict(feedback.state_dict())
    assert torch.equal(restored.residuals[0], feedback.residuals[0])
    with pytest.raises(ValueError):
        restored.step([torch.zeros(4)])
    restored.reset()
    assert restored.residuals is None
