import numpy as np
import pytest

from llm_rerank_plugin.feedback import (
    FeedbackEvent,
    FusionParams,
    SQLiteUserStateStore,
    apply_item_event,
    apply_text_event,
    effective_user_vector,
    empty_state,
    feedback_adjustment,
    fold_events,
    parse_text_feedback,
    refresh_state,
)

D, J = 32, 4
P = FusionParams()
UNIFORM = np.full(J, 1 / J)


def unit(x):
    return (x / np.linalg.norm(x)).astype(np.float32)


def neighbour(v, rng, noise=0.25):
    return unit(v + noise * unit(rng.normal(size=D)))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


class FakeResolver:
    """Items "0".."49" with random unit vectors; text phrases encoded by hashing to a fixed random vector."""

    def __init__(self, seed=0):
        r = np.random.default_rng(seed)
        self.items = {str(i): unit(r.normal(size=D)) for i in range(50)}
        self.phrases = {}
        self._r = r

    def item_vector(self, item_id):
        return self.items.get(item_id)

    def aspect_share(self, user_id, item_id):
        share = np.abs(self.items[item_id][:J]) + 0.01
        return share / share.sum()

    def text_directions(self, text):
        out = []
        for sign, phrase in parse_text_feedback(text):
            vec = self.phrases.setdefault(phrase, unit(self._r.normal(size=D)))
            out.append((sign, vec))
        return out


def test_liked_item_and_its_neighbour_rise_above_a_far_item(rng):
    liked = unit(rng.normal(size=D))
    near, far = neighbour(liked, rng), unit(rng.normal(size=D))
    base_u = unit(rng.normal(size=D))
    s = apply_item_event(empty_state(D, J), +1, liked, UNIFORM, P)
    adj = feedback_adjustment(np.stack([liked, near, far]), s)
    assert adj[0] > adj[2] + 0.2 and adj[1] > adj[2] + 0.2
    u = effective_user_vector(base_u, s, P)
    assert u @ near > base_u @ near
    assert np.linalg.norm(u) == pytest.approx(1.0, abs=1e-5) and u.dtype == np.float32


def test_disliked_item_and_near_neighbour_drop_relative_to_far_item(rng):
    disliked = unit(rng.normal(size=D))
    near, far = neighbour(disliked, rng), unit(rng.normal(size=D))
    items = np.stack([disliked, near, far])
    base_u = unit(disliked + far)  # disliked and far item start (nearly) tied
    s = apply_item_event(empty_state(D, J), -1, disliked, UNIFORM, P)
    before = items @ base_u
    after = before + feedback_adjustment(items, s)
    assert after[0] < after[2] and after[1] < after[2]
    assert (before - after)[0] > (before - after)[2] + 0.2
    u = effective_user_vector(base_u, s, P)
    assert u @ disliked < base_u @ disliked


def test_aspect_bias_moves_toward_aspects_of_liked_items_and_away_for_dislikes(rng):
    share = np.array([0.7, 0.1, 0.1, 0.1])
    v = unit(rng.normal(size=D))
    liked = apply_item_event(empty_state(D, J), +1, v, share, P)
    disliked = apply_item_event(empty_state(D, J), -1, v, share, P)
    assert liked.aspect_bias[0] > 0 and (liked.aspect_bias[1:] < 0).all()
    np.testing.assert_allclose(disliked.aspect_bias, -liked.aspect_bias)
    assert liked.aspect_bias.sum() == pytest.approx(0.0, abs=1e-6)  # only the mix shifts
    unchanged = apply_item_event(empty_state(D, J), +1, v, UNIFORM, P)
    np.testing.assert_allclose(unchanged.aspect_bias, 0.0)


def test_bounds_hold_after_100_repeated_events(rng):
    params = FusionParams(step_positive=1.0, step_negative=1.0, decay=1.0, aspect_step=1.0)
    s = empty_state(D, J)
    v, share = unit(rng.normal(size=D)), np.array([1.0, 0, 0, 0])
    for _ in range(100):
        s = apply_item_event(s, +1, v, share, params)
        s = apply_item_event(s, -1, unit(rng.normal(size=D)), share[::-1], params)
        s = apply_text_event(s, [(1, 5 * v), (-1, rng.normal(size=D))], params)
    assert np.linalg.norm(s.pos) <= params.max_norm + 1e-5
    assert np.linalg.norm(s.neg) <= params.max_norm + 1e-5
    assert np.abs(s.aspect_bias).max() <= params.aspect_bias_bound + 1e-6
    assert s.n_events == 300
    assert np.abs(feedback_adjustment(np.stack([v, -v]), s)).max() <= 2 * params.max_norm + 1e-5


def test_decay_makes_an_older_event_weigh_less(rng):
    a, b = unit(rng.normal(size=D)), unit(rng.normal(size=D))
    s = apply_item_event(empty_state(D, J), +1, a, UNIFORM, P)
    s = apply_item_event(s, +1, b, UNIFORM, P)
    adj = feedback_adjustment(np.stack([a, b]), s)
    assert adj[1] > adj[0]
    no_decay = FusionParams(decay=1.0)
    s2 = apply_item_event(
        apply_item_event(empty_state(D, J), +1, a, UNIFORM, no_decay), +1, b, UNIFORM, no_decay
    )
    assert feedback_adjustment(a[None], s2)[0] > adj[0]


def test_neutral_event_only_does_bookkeeping_and_inputs_stay_untouched(rng):
    v = unit(rng.normal(size=D))
    s0 = apply_item_event(empty_state(D, J), +1, v, UNIFORM, P, seq=3)
    pos_before = s0.pos.copy()
    s1 = apply_item_event(s0, 0, v, UNIFORM, P, seq=8)
    np.testing.assert_array_equal(s1.pos, pos_before)
    np.testing.assert_array_equal(s0.pos, pos_before)
    assert (s1.n_events, s1.last_seq) == (2, 8) and (s0.n_events, s0.last_seq) == (1, 3)
    with pytest.raises(ValueError):
        s0.pos[0] = 1.0  # states are immutable


def test_text_event_adds_signed_directions(rng):
    more, less = unit(rng.normal(size=D)), unit(rng.normal(size=D))
    s = apply_text_event(empty_state(D, J), [(1, 3 * more), (-1, less), (0, rng.normal(size=D))], P)
    adj = feedback_adjustment(np.stack([more, less]), s)
    assert adj[0] > 0.4 and adj[1] < -0.4
    np.testing.assert_allclose(np.linalg.norm(s.pos), P.text_step, rtol=1e-5)
    empty = apply_text_event(s, [], P, seq=4)
    np.testing.assert_array_equal(empty.pos, s.pos)
    assert (empty.n_events, empty.last_seq) == (2, 4)


def test_effective_user_vector_falls_back_to_base_when_feedback_cancels_it(rng):
    base = unit(rng.normal(size=D))
    s = empty_state(D, J)
    np.testing.assert_allclose(effective_user_vector(base, s, P), base, atol=1e-6)
    cancel = type(s)(pos=np.zeros(D), neg=base, aspect_bias=np.zeros(J))
    np.testing.assert_array_equal(effective_user_vector(base, cancel, P), base)


@pytest.mark.parametrize(
    "kw, field",
    [({"decay": 0.0}, "decay"), ({"step_positive": 1.5}, "step_positive"), ({"max_norm": 0}, "max_norm")],
)
def test_params_validation_names_field(kw, field):
    with pytest.raises(ValueError, match=rf"FusionParams\.{field} must be"):
        FusionParams(**kw)


def test_shape_errors_name_expected_shape():
    s = empty_state(D, J)
    with pytest.raises(
        ValueError, match=r"item_vector must be a finite array of shape \(32,\), got shape \(16,\)"
    ):
        apply_item_event(s, 1, np.ones(16), UNIFORM, P)
    with pytest.raises(ValueError, match=r"aspect_share .*\(4,\)"):
        apply_item_event(s, 1, np.ones(D), np.ones(3), P)
    with pytest.raises(ValueError, match=r"shape \(C, 32\), got \(5,\)"):
        feedback_adjustment(np.ones(5), s)
    with pytest.raises(ValueError, match="sign must be"):
        apply_item_event(s, 2, np.ones(D), UNIFORM, P)


def _events():
    kinds = [
        {"kind": "like", "item_id": "1"},
        {"kind": "dislike", "item_id": "2"},
        {"kind": "rating", "item_id": "3", "rating": 3.0},
        {"kind": "text", "text": "less horror, more comedies"},
        {"kind": "click", "item_id": "unknown-item"},
        {"kind": "rating", "item_id": "4", "rating": 5.0},
        {"kind": "skip", "item_id": "5"},
        {"kind": "text", "text": "no musicals"},
    ]
    return [FeedbackEvent(event_id=f"e{i}", user_id="u1", **kw) for i, kw in enumerate(kinds)]


def test_fold_events_skips_unknown_items_and_is_idempotent():
    resolve = FakeResolver()
    pairs = list(enumerate(_events(), start=1))
    s = fold_events(empty_state(D, J), pairs, resolve)
    assert (s.last_seq, s.n_events, s.n_skipped) == (8, 7, 1)
    again = fold_events(s, pairs, resolve)
    assert (again.n_events, again.n_skipped) == (7, 1)
    np.testing.assert_array_equal(again.pos, s.pos)
    assert feedback_adjustment(resolve.items["2"][None], s)[0] < 0


def test_rebuild_from_log_equals_incremental_folding(tmp_path):
    resolve = FakeResolver()
    with SQLiteUserStateStore(tmp_path / "fb.db") as store:
        for i, ev in enumerate(_events()):
            store.append(ev)
            store.append(FeedbackEvent(event_id=f"other{i}", user_id="u2", kind="like", item_id=str(10 + i)))
            incremental = refresh_state(store, "u1", resolve, D, J)  # as before each ranking
        assert store.get_state("u1").last_seq == incremental.last_seq
        rebuilt = fold_events(empty_state(D, J), store.events("u1"), resolve)
    for name in ("pos", "neg", "aspect_bias"):
        np.testing.assert_allclose(getattr(rebuilt, name), getattr(incremental, name), atol=1e-6)
    assert (rebuilt.last_seq, rebuilt.n_events, rebuilt.n_skipped) == (
        incremental.last_seq,
        incremental.n_events,
        incremental.n_skipped,
    )


def test_feedback_changes_the_very_next_ranking(tmp_path):
    resolve = FakeResolver()
    ids = list(resolve.items)
    items = np.stack([resolve.items[i] for i in ids])
    base_u = unit(1.2 * items[7] + items[8] + items[9])  # "7" ranks first, by a realistic margin
    with SQLiteUserStateStore(tmp_path / "fb.db") as store:

        def top():
            s = refresh_state(store, "u1", resolve, D, J)
            return ids[int(np.argmax(items @ base_u + feedback_adjustment(items, s)))]

        assert top() == "7"
        store.append({"event_id": "x", "user_id": "u1", "kind": "dislike", "item_id": "7"})
        assert top() != "7"


def test_refresh_state_rejects_dimension_change(tmp_path):
    with SQLiteUserStateStore(tmp_path / "fb.db") as store:
        store.put_state("u1", empty_state(D, J))
        with pytest.raises(ValueError, match=r"dim=32, n_aspects=4; expected dim=16, n_aspects=4"):
            refresh_state(store, "u1", FakeResolver(), 16, J)
