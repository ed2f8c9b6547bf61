"""The relay's rest between passes: a quiet database (quick passes) keeps the live stream prompt, a busy one
(slow passes) spaces passes out so that the events of that time share them."""
from bookshop.storage.outbox import PACE_SECONDS, rest_before_pass


def test_after_a_quick_pass_the_next_event_waits_at_most_twice_its_duration():
    # 6 ms passes (the fan-out bench's idle database): an event 50 ms later is not held at all, one right
    # after the pass at most 12 ms (a fixed 0.2 s pace held every event of a 20-a-second stream ~0.1 s)
    assert rest_before_pass(0.006, 0.050, moved=1) <= 0
    assert abs(rest_before_pass(0.006, 0.0, moved=1) - 0.012) < 1e-9


def test_after_a_slow_pass_passes_are_spaced_out_up_to_the_pace():
    assert abs(rest_before_pass(0.05, 0.0, moved=2) - 0.1) < 1e-9
    assert rest_before_pass(0.5, 0.0, moved=2) == PACE_SECONDS
    assert abs(rest_before_pass(0.5, 0.15, moved=2) - (PACE_SECONDS - 0.15)) < 1e-9


def test_the_first_event_after_a_quiet_moment_moves_at_once():
    assert rest_before_pass(0.5, 0.0, moved=0) == 0
