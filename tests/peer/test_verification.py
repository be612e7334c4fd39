"""Re-execution: who checks whom, and that honest work passes while shortcuts and noise do not."""

import math

import numpy as np
import pytest
import torch

from dht.records import ProgressRecord, VerdictRecord
from peer.local_training import Batches, loss_fn, make_optimizer, round_generator, train_local
from peer.schedule import assign_shards
from peer.verification import (
    banned,
    can_rerun,
    claim_problems,
    load_optimizer_state,
    optimizer_state_bytes,
    rejected_targets,
    round_rejections,
    update_distance,
    verification_plan,
)
from swarm.spec import VerificationSpec

pytestmark = pytest.mark.timeout(120)
TOLERANCE = VerificationSpec().tolerance
JOB = "0123456789abcdef01234567"


def test_the_plan_is_deterministic_never_self_checking_and_covers_the_fraction():
    peers = [f"peer{i}" for i in range(8)]
    plan = verification_plan("digest|model", peers, 0.25, verifiers=2)
    assert plan == verification_plan("digest|model", list(reversed(peers)), 0.25, verifiers=2)
    assert len(plan) == 2 and all(len(set(vs)) == 2 and t not in vs for t, vs in plan.items())
    assert len(verification_plan("digest|model", peers, 1.0)) == 8
    assert len(verification_plan("digest|model", peers, 0.01)) == 1  # at least one
    assert verification_plan("digest|model", ["alone"], 1.0) == {} and verification_plan("d", peers, 0.0) == {}
    assert [len(vs) for vs in verification_plan("d", ["a", "b"], 1.0, verifiers=3).values()] == [1, 1]
    # the draw depends on the round's outcome: another model, another sample (over many rounds)
    drawn = {tuple(sorted(verification_plan(f"d|{m}", peers, 0.25))) for m in range(20)}
    assert len(drawn) > 5


def _v(author, target, ok, r=1):
    return author, VerdictRecord(peer_id=author, job_id=JOB, round=r, target=target, ok=ok)


def test_a_strict_majority_of_the_drawn_verifiers_must_reject():
    plan = {"cheat": ["x", "y"], "honest": ["y", "z"]}
    # both drawn verifiers reject the cheat; one liar (z) alone cannot get honest work rejected
    verdicts = [_v("x", "cheat", False), _v("y", "cheat", False), _v("y", "honest", True), _v("z", "honest", False)]
    assert rejected_targets(plan, verdicts) == {"cheat"}
    # verdicts from peers not drawn for that target count for nothing
    assert rejected_targets(plan, [_v("mallory", "honest", False), _v("z", "honest", False)]) == set()
    # a missing verdict is not a rejection; with one verifier drawn, its verdict decides
    assert rejected_targets(plan, [_v("x", "cheat", False)]) == set()
    assert rejected_targets({"t": ["x"]}, [_v("x", "t", False)]) == {"t"}


def _digits_like(seed=0, n=512):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 64)).astype(np.float32)
    y = (x[:, :10].argmax(axis=1)).astype(np.int64)
    return Batches.from_arrays([(x, y)], torch.device("cpu"))


def _start():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = make_optimizer("adam", model.parameters(), lr=1e-3, weight_decay=0.0, momentum=0.0)
    # a round in: the optimizer has state, as it would from earlier rounds
    train_local(model, optimizer, _digits_like(1), steps=5, batch_size=32, generator=round_generator(0, 1, ["a"]),
                loss=loss_fn("classification", None, None))
    return model, optimizer


def _round(model, optimizer, steps=20, threads=None):
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        _, samples = train_local(model, optimizer, _digits_like(), steps=steps, batch_size=32,
                                 generator=round_generator(0, 2, ["s1", "s2"]),
                                 loss=loss_fn("classification", None, None))
    finally:
        torch.set_num_threads(before)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, samples


def _replay_setup():
    model, optimizer = _start()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = optimizer_state_bytes(optimizer)
    return model, optimizer, base, state


def _rerun(base, state, threads=None, steps=20):
    model, _ = _start()
    model.load_state_dict(base)
    optimizer = make_optimizer("adam", model.parameters(), lr=1e-3, weight_decay=0.0, momentum=0.0)
    load_optimizer_state(optimizer, state)
    return _round(model, optimizer, steps=steps, threads=threads)


def test_an_honest_update_re_executed_with_other_threads_is_far_inside_the_tolerance():
    model, optimizer, base, state = _replay_setup()
    claimed, samples = _round(model, optimizer, threads=2)
    rerun, rerun_samples = _rerun(base, state, threads=1)
    assert samples == rerun_samples == 20 * 32
    distance = update_distance(rerun, claimed, base)
    assert distance < TOLERANCE / 100  # float reordering only: the margin the tolerance is chosen for


def test_skipped_steps_and_added_noise_are_far_outside_the_tolerance():
    model, optimizer, base, state = _replay_setup()
    lazy, _ = _round(model, optimizer, steps=5)  # did a quarter of the work
    rerun, _ = _rerun(base, state)
    assert update_distance(rerun, lazy, base) > 100 * TOLERANCE
    noisy = {k: v + 1e-3 * torch.randn_like(v) for k, v in rerun.items()}  # a poisoned update
    assert update_distance(rerun, noisy, base) > 10 * TOLERANCE
    assert update_distance(rerun, {**rerun, "extra": torch.zeros(1)}, base) == math.inf


def test_a_peer_is_banned_after_max_faults_rounds():
    rejections = {1: {"lazy"}, 2: {"once"}, 3: {"lazy"}, 4: set()}
    assert banned(rejections, max_faults=2) == {"lazy"}
    assert banned(rejections, max_faults=1) == {"lazy", "once"}


def test_gpu_work_is_drawn_to_peers_of_its_kind_and_cpu_work_to_anyone():
    assert can_rerun("cuda", "cpu") and can_rerun("cpu", None) and can_rerun("cuda", "cuda")
    assert not can_rerun("cpu", "cuda") and not can_rerun("mps", "cuda")
    peers = [f"peer{i}" for i in range(8)]
    devices = {p: ("cuda" if i % 4 == 0 else "cpu") for i, p in enumerate(peers)}  # peer0, peer4: GPUs
    plan = verification_plan("d|m", peers, 1.0, verifiers=2, devices=devices)
    assert plan["peer0"][0] == "peer4" and plan["peer4"][0] == "peer0"  # the only other GPU comes first
    assert all(len(vs) == 2 and t not in vs for t, vs in plan.items())  # then others fill in
    # without device kinds (or all the same kind) the plan is the plain ring
    assert verification_plan("d|m", peers, 1.0, devices={p: "cpu" for p in peers}) == verification_plan(
        "d|m", peers, 1.0)


SHARDS = [f"{i:064x}" for i in range(12)]
ROSTER = ["pa", "pb", "pc"]


def _claims(**overrides):
    deal = assign_shards(SHARDS, ROSTER, seed=0, round_no=3)
    records = {p: ProgressRecord(peer_id=p, job_id=JOB, round=3, phase="merged", samples=640, shards=deal[p],
                                 roster=ROSTER, model_id="m" * 64, prev_round="d") for p in ROSTER}
    for peer, fields in overrides.items():
        records[peer] = records[peer].model_copy(update=fields)
    return list(records.values())


def test_claims_of_shards_dealt_to_another_or_of_impossible_samples_are_false_on_their_face():
    assert claim_problems(_claims(), SHARDS, seed=0, round_no=3, local_steps=10, batch_size=64) == {}
    deal = assign_shards(SHARDS, ROSTER, seed=0, round_no=3)
    # pc lists pa's shards on top of its own (and the samples to match): another peer's units
    thief = _claims(pc={"shards": deal["pc"] + deal["pa"], "samples": 1280})
    problems = claim_problems(thief, SHARDS, seed=0, round_no=3, local_steps=10, batch_size=64)
    assert set(problems) == {"pc"} and "1280 samples" in problems["pc"]
    swapped = _claims(pc={"shards": deal["pa"]})  # same count, someone else's shards
    assert claim_problems(swapped, SHARDS, seed=0, round_no=3, local_steps=10, batch_size=64) == {
        "pc": "claims 4 shards, 4 of them not dealt to it"}
    # rosters that differ (a peer joined at the round boundary) leave only the sample bound
    split = _claims(pc={"roster": ROSTER + ["pd"], "shards": deal["pc"] + deal["pa"]})
    assert claim_problems(split, SHARDS, seed=0, round_no=3, local_steps=10, batch_size=64) == {}
    assert set(claim_problems(_claims(pc={"roster": ["pc"], "samples": 700}), SHARDS, seed=0, round_no=3,
                              local_steps=10, batch_size=64)) == {"pc"}


def test_a_cut_and_its_take_overs_must_add_up_to_the_deal_and_the_handover():
    """pc was cut after 4 of its 10 steps and handed 6 to pa (steps 4-6) and pb (7-9), who trained
    them on top of their own 10 steps: honest, each claim passes. A taker claiming other steps
    than its share, a share of a cut that never happened, or a cut whose steps do not add up, is
    false on its face."""
    def check(claims):
        return claim_problems(claims, SHARDS, seed=0, round_no=3, local_steps=10, batch_size=64)

    handed = {"steps_done": 4, "steps_handed": 6, "handed_to": ["pa", "pb"], "samples": 4 * 64}
    pa, pb = {"took_from": {"pc": (4, 3)}, "samples": 13 * 64}, {"took_from": {"pc": (7, 3)}, "samples": 13 * 64}
    assert check(_claims(pc=handed, pa=pa, pb=pb)) == {}
    greedy = {"took_from": {"pc": (4, 6)}, "samples": 16 * 64}
    assert check(_claims(pc=handed, pa=greedy, pb=pb)) == {
        "pa": "claims to have taken over steps 4-9 of pc's, its cut gave it 4-6"}
    assert "its cut gave it none" in check(_claims(pa=pa))["pa"]  # pc was never cut
    # a take-over's samples count only for the steps the cut gave
    assert "at most 832" in check(_claims(pc=handed, pa={**pa, "samples": 16 * 64}, pb=pb))["pa"]
    # a cut claims the samples of the steps it did, and hands away the rest of its deal, no more
    uneven = {**handed, "steps_handed": 8}
    assert "its deal was 10 steps" in check(_claims(pc=uneven, pa=pa, pb=pb))["pc"]
    assert "at most 256" in check(_claims(pc={**handed, "samples": 10 * 64}, pa=pa, pb=pb))["pc"]
    # cut before its first step: no samples, no contribution, but its handover still counts
    nothing_done = {**handed, "steps_done": 0, "steps_handed": 10, "samples": 0}
    assert check(_claims(pc=nothing_done, pa={"took_from": {"pc": (0, 5)}, "samples": 15 * 64},
                         pb={"took_from": {"pc": (5, 5)}, "samples": 15 * 64})) == {}
    # the straggler's record is gone (it died after its cut): its deal bounds what a taker claims
    gone = [c for c in _claims(pa=pa, pb=pb) if c.peer_id != "pc"]
    assert check(gone) == {}
    assert "of pc's 10" in check([gone[0].model_copy(update={"took_from": {"pc": (4, 9)}, "samples": 19 * 64}),
                                  gone[1]])["pa"]


def test_round_rejections_joins_false_claims_and_the_verifiers_majority():
    deal = assign_shards(SHARDS, ROSTER, seed=0, round_no=3)
    claims = _claims(pc={"shards": deal["pc"] + deal["pa"]})
    plan = verification_plan("d|" + "m" * 64, ROSTER, 1.0, 2)
    against_pb = [_v(v, "pb", False, r=3) for v in plan["pb"]]
    rejected = round_rejections(claims, against_pb, fraction=1.0, verifiers=2, train_ids=SHARDS, seed=0,
                                round_no=3, local_steps=10, batch_size=64)
    assert rejected == {"pb", "pc"}
    assert round_rejections([], against_pb, fraction=1.0, verifiers=2, train_ids=SHARDS, seed=0, round_no=3,
                            local_steps=10, batch_size=64) == set()


def test_a_make_up_round_claim_is_held_to_the_owed_shards_and_their_steps():
    owed = SHARDS[:4]  # a make-up round (11 of 10) deals only these, 5 steps a shard (10 steps, 4 shards a peer)
    extra = assign_shards(owed, ROSTER, seed=1, round_no=11)
    steps = {p: max(1, -(-10 * len(extra[p]) * 3 // 12)) if extra[p] else 0 for p in ROSTER}

    def claims(**overrides):
        records = {p: ProgressRecord(peer_id=p, job_id=JOB, round=11, phase="merged", samples=64 * steps[p],
                                     shards=extra[p], carried=owed, roster=ROSTER, model_id="m" * 64, prev_round="d")
                   for p in ROSTER}
        for peer, fields in overrides.items():
            records[peer] = records[peer].model_copy(update=fields)
        return list(records.values())

    assert claim_problems(claims(), SHARDS, seed=0, round_no=11, local_steps=10, batch_size=64, rounds=10) == {}
    # a full round's samples in a make-up round: more than its owed shards hold
    problems = claim_problems(claims(pa={"samples": 640}), SHARDS, seed=0, round_no=11, local_steps=10,
                              batch_size=64, rounds=10)
    assert set(problems) == {"pa"} and "640 samples" in problems["pa"]
    # fresh shards in a make-up round were dealt to nobody
    fresh = assign_shards(SHARDS, ROSTER, seed=0, round_no=11)["pb"]
    assert set(claim_problems(claims(pb={"shards": extra["pb"] + fresh}), SHARDS, seed=0, round_no=11,
                              local_steps=10, batch_size=64, rounds=10)) == {"pb"}


def test_a_deal_that_follows_speed_bounds_each_claim_by_its_own_steps():
    speeds = {"pa": 200.0, "pb": 100.0, "pc": 100.0}
    deal = assign_shards(SHARDS, ROSTER, seed=0, round_no=3, speeds=speeds)
    assert [len(deal[p]) for p in ROSTER] == [6, 3, 3]
    # pa: twice the shards, twice the steps (15 of the swarm's 30, pb and pc 7 each): 960 samples, 448
    honest = _claims(**{p: {"shards": deal[p], "speeds": speeds, "samples": n}
                        for p, n in (("pa", 960), ("pb", 448), ("pc", 448))})
    assert claim_problems(honest, SHARDS, seed=0, round_no=3, local_steps=10, batch_size=64) == {}
    greedy = _claims(**{p: {"shards": deal[p], "speeds": speeds, "samples": 960} for p in ROSTER})
    problems = claim_problems(greedy, SHARDS, seed=0, round_no=3, local_steps=10, batch_size=64)
    assert set(problems) == {"pb", "pc"} and "at most 448" in problems["pb"]
    # one member claiming other speeds than the group's: no agreed deal, only the loose bound
    mixed = _claims(pa={"shards": deal["pa"], "speeds": speeds, "samples": 960})
    assert claim_problems(mixed, SHARDS, seed=0, round_no=3, local_steps=10, batch_size=64) == {}


def test_a_federated_owner_is_held_to_the_most_any_owner_trains():
    """Owners train steps that follow their rows (up to 2x local_steps), on no shards: a big owner's
    honest claim passes, one beyond what any owner is given does not."""
    big = _claims(pa={"samples": 2 * 10 * 64, "shards": []}, pb={"samples": 640, "shards": []},
                  pc={"samples": 320, "shards": []})
    assert claim_problems(big, [], seed=0, round_no=3, local_steps=10, batch_size=64, owner_steps=True) == {}
    assert claim_problems(big, [], seed=0, round_no=3, local_steps=10, batch_size=64) != {}  # open-job bound
    greedy = _claims(pa={"samples": 2 * 10 * 64 + 64, "shards": []}, pb={"shards": []}, pc={"shards": []})
    assert claim_problems(greedy, [], seed=0, round_no=3, local_steps=10, batch_size=64, owner_steps=True) == {
        "pa": "claims 1344 samples, a round holds at most 1280"}
