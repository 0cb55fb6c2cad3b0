"""LocalAgreement-2 commit policy on scripted hypotheses (no model).

Token ids: below 1000 continue a word, 1000..49999 start a word, 50000 and up are timestamps
(`TB + step`, 20 ms steps), as in the Whisper vocabulary where timestamps come last.
"""

from __future__ import annotations

import random

import pytest

from edgestream.runtime.families.whisper.agreement import LocalAgreement, Segment, common_prefix

TB = 50000


def word_start(token: int) -> bool:
    return token >= 1000


def ts(step: int) -> int:
    return TB + step


def policy() -> LocalAgreement:
    return LocalAgreement(word_start, TB)


def ends_on_word_boundary(committed: list[int], hyp: list[int]) -> bool:
    """The committed prefix stops where `hyp` starts a word or a timestamp (or is all of it)."""
    k = len(committed)
    return k == 0 or k >= len(hyp) or hyp[k] >= TB or word_start(hyp[k])


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [6]) == 0


def test_first_hypothesis_commits_nothing() -> None:
    la = policy()
    assert la.update([ts(0), 1001, 1002, 1003]) == []
    assert la.committed == []


def test_agreed_words_are_committed_up_to_the_last_agreed_word_start() -> None:
    la = policy()
    la.update([ts(0), 1001, 1002, 1003])
    # agree on ts, 1001, 1002; disagree at the third word: the agreed words are complete
    # because both hypotheses start a new word right after them
    assert la.update([ts(0), 1001, 1002, 1004, 1005]) == [ts(0), 1001, 1002]
    assert la.committed == [ts(0), 1001, 1002]
    # the next agreement extends it
    assert la.update([ts(0), 1001, 1002, 1004, 1006]) == [1004]
    assert la.committed == [ts(0), 1001, 1002, 1004]


def test_a_word_split_across_tokens_is_never_half_committed() -> None:
    la = policy()
    # word 1001+5+6 ("con"+"tin"+"ue") then a word that changes
    la.update([ts(0), 1001, 5, 6, 1010])
    # agreed up to "con tin" only: the word may still grow differently ("con tin ent")
    assert la.update([ts(0), 1001, 5, 7, 1010]) == [ts(0)]
    assert la.committed == [ts(0)]
    la2 = policy()
    la2.update([ts(0), 1001, 5, 6, 1010])
    # whole word agreed, but the next token continues it in one hypothesis and starts a word in
    # the other: the word is not known to be finished, so nothing of it is committed
    assert la2.update([ts(0), 1001, 5, 6, 8]) == [ts(0)]
    la3 = policy()
    la3.update([ts(0), 1001, 5, 6, 1010])
    # the hypothesis ends inside the agreed prefix's last word: not known to be complete
    assert la3.update([ts(0), 1001, 5, 6]) == [ts(0)]
    assert la3.update([ts(0), 1001, 5, 6, 1011]) == [1001, 5, 6]


def test_words_before_a_timestamp_are_committed_timestamp_is_a_boundary() -> None:
    la = policy()
    la.update([ts(0), 1001, 2, ts(40), ts(40), 1005])
    # the end timestamp is agreed, the next start and word are not yet
    assert la.update([ts(0), 1001, 2, ts(40), ts(44), 1006]) == [ts(0), 1001, 2, ts(40)]
    la = policy()
    la.update([ts(0), 1001, 2, 3])
    # a timestamp after the agreed word in one hypothesis, more word in the other: not complete
    assert la.update([ts(0), 1001, 2, ts(40)]) == [ts(0)]


def test_shorter_or_equal_hypothesis_commits_only_complete_words() -> None:
    la = policy()
    la.update([ts(0), 1001, 1002, 1003])
    # identical hypothesis: the last word might still grow, so it stays tentative
    assert la.update([ts(0), 1001, 1002, 1003]) == [ts(0), 1001, 1002]


def test_hypothesis_not_starting_with_committed_raises() -> None:
    la = policy()
    la.update([ts(0), 1001, 1002, 1003])
    la.update([ts(0), 1001, 1002, 1003])
    assert la.committed == [ts(0), 1001, 1002]
    with pytest.raises(ValueError, match="committed"):
        la.update([ts(0), 1001, 1009, 1003])
    with pytest.raises(ValueError):
        la.update([ts(0), 1001])  # shorter than the committed prefix
    assert la.committed == [ts(0), 1001, 1002]  # a rejected hypothesis changes nothing


def test_complete_commits_everything() -> None:
    la = policy()
    assert la.update([ts(0), 1001, 5], complete=True) == [ts(0), 1001, 5]
    assert la.update([ts(0), 1001, 5, 6, ts(30)], complete=True) == [6, ts(30)]
    assert la.committed == [ts(0), 1001, 5, 6, ts(30)]
    la.reset()
    assert la.committed == [] and la.previous is None
    assert la.update([ts(0), 1001, 1002]) == []


def commit_closed(la: LocalAgreement, hyp: list[int]) -> None:
    la.update(hyp)
    la.update(hyp + [1099])  # agree on everything in `hyp`, then a new word
    assert la.committed == hyp


def test_closed_segment_reports_text_and_steps() -> None:
    la = policy()
    assert la.closed_segment() is None
    hyp = [ts(0), 1001, 5, 1002, ts(75), ts(75), 1003]
    commit_closed(la, hyp)
    assert la.closed_segment() == Segment((1001, 5, 1002), 0, 75)


def test_open_segment_is_not_closed() -> None:
    la = policy()
    # end timestamp committed, but no next start yet: the segment may still be extended
    la.update([ts(3), 1001, 1002, ts(50), 1099], complete=True)
    assert la.closed_segment() is None
    la = policy()
    la.update([ts(3), 1001, 1002], complete=True)
    assert la.closed_segment() is None


def test_closed_segment_not_starting_at_zero() -> None:
    la = policy()
    la.update([ts(12), 1001, 1002, ts(60), ts(60), 1003], complete=True)
    assert la.closed_segment() == Segment((1001, 1002), 12, 60)


def test_trim_drops_the_segment_and_rebases_later_timestamps() -> None:
    la = policy()
    la.update([ts(0), 1001, 1002, ts(75), ts(75), 1003, 7, ts(120), ts(120), 1004],
              complete=True)
    first = la.closed_segment()
    assert first == Segment((1001, 1002), 0, 75)
    la.trim(first)
    # timestamps now count from the cut: 75 -> 0, 120 -> 45; text untouched
    assert la.committed == [ts(0), 1003, 7, ts(45), ts(45), 1004]
    assert la.previous is None  # agreement restarts on the trimmed buffer
    second = la.closed_segment()
    assert second == Segment((1003, 7), 0, 45)
    la.trim(second)
    assert la.committed == [ts(0), 1004]
    assert la.closed_segment() is None
    # streaming goes on against the rebased prefix
    assert la.update([ts(0), 1004, 1005, 1006]) == []
    assert la.update([ts(0), 1004, 1005, 1007]) == [1005]


def test_trim_after_streaming_commit() -> None:
    la = policy()
    la.update([ts(0), 1001, ts(40), ts(40), 1002, 3])
    assert la.update([ts(0), 1001, ts(40), ts(40), 1002, 3, 1004]) == \
        [ts(0), 1001, ts(40), ts(40), 1002, 3]
    seg = la.closed_segment()
    assert seg == Segment((1001,), 0, 40)
    la.trim(seg)
    assert la.committed == [ts(0), 1002, 3]


def _perturb(rng: random.Random, committed: list[int], previous: list[int] | None) -> list[int]:
    """A new hypothesis in Whisper's grammar: the committed prefix, then mostly the previous tail
    (kept, grown or changed from a random point), word pieces and closed-segment timestamp pairs
    mixed in."""
    base = list(previous) if previous is not None and rng.random() < 0.8 else list(committed)
    keep = rng.randint(len(committed), max(len(committed), len(base)))
    hyp = base[:keep]
    if not hyp:
        hyp = [ts(0)]
    if len(hyp) >= 2 and hyp[-1] >= TB and hyp[-2] < TB:
        hyp.append(hyp[-1])  # an end timestamp is always followed by the next start
    last_ts = max(t - TB for t in hyp if t >= TB)
    for _ in range(rng.randint(0, 6)):
        r = rng.random()
        if r < 0.45 or hyp[-1] >= TB:
            hyp.append(rng.randint(1000, 1015))  # a word start (text always follows a start)
        elif r < 0.85:
            hyp.append(rng.randint(1, 6))  # a word continuation
        else:
            last_ts += rng.randint(1, 20)
            hyp += [ts(last_ts), ts(last_ts)]
    return hyp


def test_committed_only_grows_and_never_ends_mid_word_property() -> None:
    rng = random.Random(20240611)
    streamed = 0
    for sequence in range(200):
        la = policy()
        previous: list[int] | None = None
        history: list[list[int]] = [[]]
        for step in range(rng.randint(5, 60)):
            hyp = _perturb(rng, la.committed, previous)
            before = list(la.committed)
            prev_hyp = la.previous
            new = la.update(hyp)
            streamed += len(new)
            assert la.committed == before + new, (sequence, step)
            assert hyp[:len(la.committed)] == la.committed
            if new:
                # committed tokens were agreed by the two latest hypotheses...
                assert prev_hyp is not None and prev_hyp[:len(la.committed)] == la.committed
                # ...and the cut falls where both of them start a word (or a timestamp)
                assert ends_on_word_boundary(la.committed, hyp), (sequence, step, hyp)
                assert ends_on_word_boundary(la.committed, prev_hyp), (sequence, step)
                assert len(la.committed) < len(hyp)
            previous = hyp
            history.append(list(la.committed))
        final = la.update(_perturb(rng, la.committed, previous), complete=True)
        history.append(list(la.committed))
        assert la.committed[len(la.committed) - len(final):] == final
        for a, b in zip(history, history[1:]):
            assert b[:len(a)] == a, sequence  # every committed list is a prefix of the next
    assert streamed > 2000  # the property was exercised, not vacuously true


def test_committed_text_never_changes_across_trims_property() -> None:
    """Driver-style use: after each update, closed segments are reported and trimmed. The text
    reported so far plus the text still committed only ever grows."""
    rng = random.Random(7)
    trimmed = 0
    for sequence in range(200):
        la = policy()
        previous: list[int] | None = None
        finals: list[int] = []
        seen: list[int] = []
        for step in range(rng.randint(5, 60)):
            hyp = _perturb(rng, la.committed, previous)
            la.update(hyp)
            previous = hyp
            while (seg := la.closed_segment()) is not None:
                assert all(t < TB for t in seg.tokens) and seg.end_step > seg.start_step
                finals += seg.tokens
                la.trim(seg)
                trimmed += 1
                assert la.committed[0] == ts(0)  # the next segment starts at the cut
                previous = None  # the buffer was cut: hypotheses restart from the committed
            text = finals + [t for t in la.committed if t < TB]
            assert text[:len(seen)] == seen, (sequence, step)
            seen = text
    assert trimmed > 200
