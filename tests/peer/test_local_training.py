"""One peer's round arithmetic, without a network."""

import numpy as np
import pytest
import torch

from peer.local_training import Batches, evaluate, loss_fn, make_optimizer, round_generator, train_local

pytestmark = pytest.mark.timeout(60)


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return Batches.from_arrays([(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])], torch.device("cpu"))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _train(shards):
    model = _model()
    opt = make_optimizer("adam", model.parameters(), lr=0.01, weight_decay=0.0, momentum=0.0)
    loss, samples = train_local(model, opt, _data(), steps=7, batch_size=16,
                                generator=round_generator(3, 2, shards), loss=loss_fn("classification", None, None))
    return model, loss, samples


def test_same_round_inputs_replay_bit_identically_whatever_the_shard_order():
    a, loss_a, samples = _train(["s1", "s2"])
    b, loss_b, _ = _train(["s2", "s1"])
    assert samples == 7 * 16 and loss_a == loss_b
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_a_run_cut_after_k_steps_is_exactly_the_first_k_steps_of_the_full_run():
    """A straggler cut at the deadline keeps its steps done; a verifier re-runs the claim as
    ``steps=k`` and must land on the same weights, bit for bit."""
    def run(steps, should_cut=lambda steps_done: False):
        model = _model()
        opt = make_optimizer("adam", model.parameters(), lr=0.01, weight_decay=0.0, momentum=0.0)
        _, samples = train_local(model, opt, _data(), steps=steps, batch_size=16, should_cut=should_cut,
                                 generator=round_generator(3, 2, ["s1"]), loss=loss_fn("classification", None, None))
        return model, samples

    asked = []
    cut, samples = run(20, lambda steps_done: asked.append(steps_done) or steps_done == 8)
    assert samples == 8 * 16 and asked == list(range(9))  # asked before every step, none after the cut
    replay, _ = run(8)
    assert all(torch.equal(p, q) for p, q in zip(cut.parameters(), replay.parameters()))
    full, _ = run(20)
    assert not all(torch.equal(p, q) for p, q in zip(cut.parameters(), full.parameters()))


def test_a_take_over_trains_exactly_the_batches_the_straggler_did_not_reach():
    """Rows numbered by their target: the rows each step's loss sees are the batch order. A
    straggler cut after 4 of 10 steps, and two takers resuming its order at steps 4 and 7, train
    between them exactly the batches of its full run."""
    from peer.local_training import handover_generator, resumed_batches

    rows = 40
    data = Batches(torch.randn(rows, 5), torch.arange(rows))

    def rows_seen(steps, generator, **kw):
        seen = []
        model = _model()
        opt = make_optimizer("sgd", model.parameters(), lr=0.01, weight_decay=0.0, momentum=0.0)
        train_local(model, opt, data, steps=steps, batch_size=16, generator=generator,
                    loss=lambda out, y: seen.append(y.tolist()) or out.sum() * 0.0, **kw)
        return seen

    full = rows_seen(10, round_generator(3, 2, ["s1"]))
    assert len(full) == 10 and all(len(b) == 16 for b in full)  # passes of two batches (8 rows left over)
    cut = rows_seen(10, round_generator(3, 2, ["s1"]), should_cut=lambda steps_done: steps_done == 4)
    taken = [rows_seen(n, handover_generator(3, 2, "s1", taker),
                       batches=resumed_batches(round_generator(3, 2, ["s1"]), rows, 16, start, n))
             for taker, start, n in (("ta", 4, 3), ("tb", 7, 3))]
    assert cut + taken[0] + taken[1] == full


def test_more_steps_than_rows_make_several_passes():
    model = _model()
    opt = make_optimizer("sgd", model.parameters(), lr=0.1, weight_decay=0.0, momentum=0.9)
    _, samples = train_local(model, opt, _data(n=20), steps=5, batch_size=8,
                             generator=torch.Generator().manual_seed(0), loss=loss_fn("classification", None, None))
    assert samples == 40


def test_a_peer_without_rows_trains_nothing():
    model = _model()
    before = [p.clone() for p in model.parameters()]
    empty = Batches.from_arrays([], torch.device("cpu"))
    opt = make_optimizer("adam", model.parameters(), lr=0.1, weight_decay=0.0, momentum=0.0)
    assert train_local(model, opt, empty, steps=3, batch_size=4, generator=torch.Generator(),
                       loss=loss_fn("classification", None, None)) == (0.0, 0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_evaluation_returns_sums_that_add_up_across_peers():
    model, data = _model(), _data()
    loss = loss_fn("classification", None, None)
    whole = evaluate(model, data, task="classification", loss=loss, batch_size=1000)
    half = len(data) // 2
    parts = [evaluate(model, Batches(data.features[s], data.targets[s]), task="classification", loss=loss, batch_size=7)
             for s in (slice(0, half), slice(half, None))]
    assert whole["val_rows"] == sum(p["val_rows"] for p in parts) == len(data)
    assert whole["val_correct"] == sum(p["val_correct"] for p in parts)
    assert whole["val_loss_sum"] == pytest.approx(sum(p["val_loss_sum"] for p in parts), rel=1e-5)


def test_regression_loss_is_on_the_standardised_scale():
    loss = loss_fn("regression", target_mean=100.0, target_std=10.0)
    out, y = torch.tensor([[110.0], [90.0]]), torch.tensor([100.0, 100.0])
    assert loss(out, y).item() == pytest.approx(1.0)
    sums = evaluate(torch.nn.Identity(), Batches(out, y), task="regression", loss=loss)
    assert sums["val_sq_error_sum"] == pytest.approx(200.0) and sums["val_abs_error_sum"] == pytest.approx(20.0)


def test_dropout_masks_replay_too_so_a_verifier_can_re_run_the_round():
    def run():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 2))
        opt = make_optimizer("sgd", model.parameters(), lr=0.1, weight_decay=0.0, momentum=0.0)
        torch.manual_seed(12345 + len(calls))  # whatever the process's global RNG happens to be
        calls.append(1)
        train_local(model, opt, _data(), steps=5, batch_size=16, generator=round_generator(3, 2, ["s"]),
                    loss=loss_fn("classification", None, None))
        return [p.detach().clone() for p in model.parameters()]

    calls = []
    assert all(torch.equal(a, b) for a, b in zip(run(), run()))
