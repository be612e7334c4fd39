"""DiLoCo's outer optimizer: the Nesterov step by hand, plain averaging, determinism, checkpoints."""

import io

import pytest
import torch

from aggregation.outer import DILOCO_LR, DILOCO_MOMENTUM, OuterConfigError, OuterOptimizer
from aggregation.reduce import weighted_mean

pytestmark = pytest.mark.timeout(60)


def _model(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(dtype)


def _vector(values) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


def test_defaults_are_dilocos():
    outer = OuterOptimizer([_vector([0.0])])
    assert (outer.lr, outer.momentum, outer.nesterov) == (DILOCO_LR, DILOCO_MOMENTUM, True) == (0.7, 0.9, True)


def test_pseudo_gradient_is_base_minus_local():
    param = _vector([1.0, 2.0])
    outer = OuterOptimizer([param])
    with torch.no_grad():
        param.sub_(torch.tensor([0.25, -0.5]))  # "local training"
    assert torch.equal(outer.pseudo_gradient()[0], torch.tensor([0.25, -0.5]))
    assert torch.equal(outer.pseudo_gradient([torch.tensor([0.0, 0.0])])[0], torch.tensor([1.0, 2.0]))


def test_nesterov_two_steps_by_hand():
    # base [1, 2], lr 0.5, momentum 0.5 (all values dyadic, so exact)
    # step 1, g = [.5, -1]: buf = g = [.5, -1]; step = g + .5 buf = [.75, -1.5];
    #         base = [1 - .375, 2 + .75] = [.625, 2.75]
    # step 2, g = [.25, .5]: buf = .5 [.5, -1] + g = [.5, 0]; step = g + .5 buf = [.5, .5]; base = [.375, 2.5]
    param = _vector([1.0, 2.0])
    outer = OuterOptimizer([param], lr=0.5, momentum=0.5)
    assert torch.equal(outer.apply([torch.tensor([0.5, -1.0])])[0], torch.tensor([0.625, 2.75]))
    assert torch.equal(outer.momentum_buffers[0], torch.tensor([0.5, -1.0]))
    assert torch.equal(outer.apply([torch.tensor([0.25, 0.5])])[0], torch.tensor([0.375, 2.5]))
    assert torch.equal(outer.momentum_buffers[0], torch.tensor([0.5, 0.0]))
    assert torch.equal(param.detach(), torch.tensor([0.375, 2.5]))  # written back into the model
    assert outer.steps == 2


def test_plain_momentum_by_hand():
    # without nesterov the step is the buffer: step 1 [.5, -1] -> base [.75, 2.5];
    # step 2 buf [.5, 0] -> base [.5, 2.5]
    outer = OuterOptimizer([_vector([1.0, 2.0])], lr=0.5, momentum=0.5, nesterov=False)
    outer.apply([torch.tensor([0.5, -1.0])])
    assert torch.equal(outer.apply([torch.tensor([0.25, 0.5])])[0], torch.tensor([0.5, 2.5]))


def test_matches_torch_sgd_with_nesterov():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, generator=g) for _ in range(5)]
    outer = OuterOptimizer([_vector([0.0] * 7)])
    reference = torch.zeros(7, requires_grad=True)
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    for grad in grads:
        outer.apply([grad])
        reference.grad = grad.clone()
        sgd.step()
    assert torch.allclose(outer.base[0], reference.detach(), atol=1e-6)


def test_lr_one_without_momentum_is_parameter_averaging():
    # base - mean_w(base - local_i) == mean_w(local_i): DiLoCo with lr 1, momentum 0 is plain averaging
    base_model = _model(0)
    peers = [_model(0) for _ in range(3)]
    outers = [OuterOptimizer.plain_averaging(m.parameters()) for m in peers]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # local training: every peer moves off the base by its own amount
        for m in peers:
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g))
    weights = [1.0, 2.0, 5.0]
    locals_ = [[p.detach().clone() for p in m.parameters()] for m in peers]
    pseudo = [o.pseudo_gradient() for o in outers]
    averaged = [weighted_mean(torch.stack(rows), weights) for rows in zip(*pseudo)]
    for outer in outers:
        outer.apply(averaged)
    for i, params in enumerate(zip(*[m.parameters() for m in peers])):
        expected = weighted_mean(torch.stack([local[i] for local in locals_]), weights)
        assert all(torch.equal(params[0], p) for p in params[1:])  # the group agrees bit for bit
        assert torch.allclose(params[0], expected, atol=1e-6)
        assert not torch.allclose(params[0], list(base_model.parameters())[i])


def test_lr_one_without_momentum_is_exactly_averaging_on_dyadic_values():
    # base [1, 1]; locals [0.5, 2] and [1.5, 0]: pseudo-gradients [.5, -1] and [-.5, 1], mean [0, 0]
    # -> base stays [1, 1] = mean of the locals; with weights 3:1 the mean is [.25, -.5] -> [.75, 1.5]
    local_a, local_b = torch.tensor([0.5, 2.0]), torch.tensor([1.5, 0.0])
    for weights, expected in (([1, 1], [1.0, 1.0]), ([3, 1], [0.75, 1.5])):
        outer = OuterOptimizer.plain_averaging([_vector([1.0, 1.0])])
        pseudo = torch.stack([outer.pseudo_gradient([local_a])[0], outer.pseudo_gradient([local_b])[0]])
        new_base = outer.apply([weighted_mean(pseudo, weights)])[0]
        assert torch.equal(new_base, torch.tensor(expected))
        assert torch.equal(new_base, weighted_mean(torch.stack([local_a, local_b]), weights))


def test_two_peers_with_the_same_inputs_end_bit_identical():
    g = torch.Generator().manual_seed(2)
    models = [_model(0), _model(0)]
    outers = [OuterOptimizer(m.parameters()) for m in models]
    for _ in range(4):
        averaged = [torch.randn(p.shape, generator=g) * 1e-2 for p in models[0].parameters()]
        for outer in outers:
            outer.apply([a.clone() for a in averaged])
    for a, b in zip(*[o.base + o.momentum_buffers for o in outers]):
        assert torch.equal(a, b)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_half_precision_model_keeps_a_float32_base():
    model = _model(0, dtype=torch.float16)
    outer = OuterOptimizer(model.parameters(), lr=1.0, momentum=0.0)
    assert all(b.dtype == torch.float32 and b.device.type == "cpu" for b in outer.base)
    outer.apply([torch.full(b.shape, 1e-4) for b in outer.base])
    for p, b in zip(model.parameters(), outer.base):
        assert p.dtype == torch.float16 and torch.equal(p.detach(), b.half())


def test_state_dict_round_trip_keeps_the_momentum():
    g = torch.Generator().manual_seed(3)
    steps = [[torch.randn(p.shape, generator=g) for p in _model(0).parameters()] for _ in range(3)]
    first_model = _model(0)
    first = OuterOptimizer(first_model.parameters(), lr=0.5, momentum=0.8)
    for grads in steps[:2]:
        first.apply(grads)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # through a real checkpoint file format
    buffer.seek(0)

    second_model = _model(7)  # a different starting point: the checkpoint must override it
    second = OuterOptimizer(second_model.parameters())  # DiLoCo defaults: the checkpoint's lr/momentum win
    second.load_state_dict(torch.load(buffer))
    second.write_to_model()
    assert (second.lr, second.momentum, second.steps) == (0.5, 0.8, 2)
    assert any(m.abs().sum() > 0 for m in second.momentum_buffers)

    first.apply(steps[2])
    second.apply(steps[2])
    for a, b in zip(first.base + first.momentum_buffers, second.base + second.momentum_buffers):
        assert torch.equal(a, b)
    for a, b in zip(first_model.parameters(), second_model.parameters()):
        assert torch.equal(a, b)


def test_state_dict_is_a_copy():
    outer = OuterOptimizer([_vector([1.0])])
    state = outer.state_dict()
    outer.apply([torch.tensor([0.5])])
    assert state["base"][0].item() == 1.0 and state["steps"] == 0


def test_rebase_takes_the_models_values_and_keeps_momentum():
    param = _vector([1.0, 1.0])
    outer = OuterOptimizer([param], lr=0.5, momentum=0.5)
    outer.apply([torch.tensor([1.0, 1.0])])
    with torch.no_grad():
        param.copy_(torch.tensor([4.0, 4.0]))  # e.g. a joining peer loaded the swarm's model
    outer.rebase()
    assert torch.equal(outer.base[0], torch.tensor([4.0, 4.0]))
    assert torch.equal(outer.momentum_buffers[0], torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("kwargs", [dict(lr=0.0), dict(lr=-1.0), dict(momentum=1.0), dict(momentum=-0.1)])
def test_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(OuterConfigError):
        OuterOptimizer([_vector([0.0])], **kwargs)


def test_rejects_mismatched_shapes():
    outer = OuterOptimizer([_vector([0.0, 0.0])])
    with pytest.raises(ValueError):
        outer.apply([torch.zeros(3)])
    with pytest.raises(ValueError):
        outer.apply([torch.zeros(2), torch.zeros(2)])


def test_a_peer_that_takes_up_the_swarms_momentum_takes_the_same_outer_steps():
    # two peers of a group, then a third that adopts their model mid-job: with their momentum
    # bytes it steps bit-identically from then on; with its own zero momentum it would not
    start = [torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.randn(5)]
    peers = [OuterOptimizer([p.clone() for p in start]) for _ in range(2)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    for peer in peers:
        peer.apply(grads[0])
    late = OuterOptimizer([p.clone() for p in peers[0].params])
    stale = OuterOptimizer([p.clone() for p in peers[0].params])
    late.load_momentum_bytes(peers[0].momentum_bytes())
    for g in grads[1:]:
        for opt in (*peers, late, stale):
            opt.apply(g)
    assert all(torch.equal(a, b) for a, b in zip(late.params, peers[0].params))
    assert not all(torch.equal(a, b) for a, b in zip(stale.params, peers[0].params))
    with pytest.raises(OuterConfigError, match="buffers"):
        OuterOptimizer([torch.zeros(2)]).load_momentum_bytes(peers[0].momentum_bytes())
