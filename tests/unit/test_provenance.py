"""The round chain: intact histories pass, and any change to an earlier round breaks what follows."""

from dht.records import ProgressRecord
from peer.provenance import audit_rounds, genesis, round_digest

JOB, DATASET = "0123456789abcdef01234567", "d" * 64
INIT = "0" * 64


def model(r):
    return f"{r:x}" * 64 if r < 16 else None


def history(rounds=3, peers=("a", "b", "c")):
    """What an honest swarm publishes: every round, each peer's merged record."""
    out, base, prev = [], INIT, genesis(JOB, DATASET)
    for r in range(1, rounds + 1):
        records = [ProgressRecord(peer_id=p, job_id=JOB, round=r, phase="merged", samples=640,
                                  shards=[f"{p}{r}"], base_model_id=base, model_id=model(r), update_id=f"u{p}{r}",
                                  prev_round=prev, group=list(peers), train_loss=1.0 / r, val_rows=10,
                                  val_correct=5 + r) for p in peers]
        out.append(records)
        base, prev = model(r), round_digest(r, records)
    return out


def breaks(rounds):
    return {a.round: a.breaks for a in audit_rounds(JOB, DATASET, rounds) if a.breaks}


def test_an_honest_history_is_intact_and_summarised():
    audits = audit_rounds(JOB, DATASET, history())
    assert [a.breaks for a in audits] == [[], [], []]
    assert audits[0].peers == ["a", "b", "c"] and audits[0].samples == 3 * 640 and audits[0].shards == 3
    assert audits[2].val_accuracy == 24 / 30 and audits[2].model_id == model(3)


def test_rewriting_an_earlier_round_breaks_the_next_ones_link():
    rounds = history()
    # claim more work in round 1 after the fact: round 1 still agrees, but round 2 names the old digest
    rounds[0][0] = rounds[0][0].model_copy(update={"samples": 6400})
    assert breaks(rounds) == {2: ["prev_round does not match round 1's digest"]}


def test_a_round_that_does_not_start_from_the_last_model_is_a_break():
    rounds = history()
    rounds[2] = [p.model_copy(update={"base_model_id": "f" * 64}) for p in rounds[2]]
    assert "is not round 2's model" in breaks(rounds)[3][0]


def test_a_round_without_a_majority_is_a_break_and_so_is_an_anonymous_update():
    rounds = history()
    rounds[1] = [rounds[1][0], rounds[1][1].model_copy(update={"model_id": "e" * 64})]
    rounds[2] = [p.model_copy(update={"update_id": None}) for p in rounds[2]]
    found = breaks(rounds)
    assert found[2] == ["no agreed model (no strict majority of merged records)"]
    assert "a contribution names no update hash" in found[3]


def test_a_forged_minority_record_does_not_change_the_agreed_history():
    rounds = history()
    liar = rounds[1][0].model_copy(update={"peer_id": "mallory", "model_id": "9" * 64, "samples": 10**6})
    rounds[1].append(liar)
    assert breaks(rounds) == {}


def test_only_a_result_from_the_agreed_group_at_the_jobs_real_end_ends_the_job():
    """A result record anyone can sign: one peer's forgery must not end the job for the swarm."""
    from dht.records import ResultRecord
    from peer.provenance import result_problem

    last = history(rounds=3)[2]

    def problem(author="a", rounds_completed=3, model_id=model(3), cancelled=False, rounds=3, stop_met=False,
                cancel_signed=False, final_round=last):
        result = ResultRecord(peer_id=author, job_id=JOB, rounds_completed=rounds_completed, model_id=model_id,
                              report_id="e" * 64, cancelled=cancelled)
        return result_problem(result, final_round, rounds=rounds, stop_met=stop_met, cancel_signed=cancel_signed)

    assert problem() is None and problem(rounds=3, rounds_completed=3, author="c") is None
    # a stranger, even with a merged record of its own naming the agreed model (a minority vote)
    stranger = last + [last[0].model_copy(update={"peer_id": "x", "group": ["x"]})]
    assert "not in round 3's agreed group" in problem(author="x", final_round=stranger)
    assert "agreed on" in problem(model_id="f" * 64)
    assert "no agreed model" in problem(final_round=[])  # a round that has not merged (a future one)
    # ending early: only at a round that meets stop_when, or at a cancel the consumer signed
    assert "does not meet the job's stop_when" in problem(rounds=10)
    assert problem(rounds=10, stop_met=True) is None
    assert "signed no cancel" in problem(rounds=10, cancelled=True)
    assert problem(rounds=10, cancelled=True, cancel_signed=True) is None
