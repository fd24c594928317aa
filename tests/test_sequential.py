"""The sequential model, the hybrid retriever that merges it with ALS, and their place in the chain."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from llm_rerank_plugin.config import load_config
from llm_rerank_plugin.data import leave_last_out, load_data
from llm_rerank_plugin.data.split import hold_out_last, with_sequence_position
from llm_rerank_plugin.pipeline.chain import Chain
from llm_rerank_plugin.pipeline.train import host_frame
from llm_rerank_plugin.rerank.sequences import NO_ITEM
from llm_rerank_plugin.retrieve.base import IdMap
from llm_rerank_plugin.retrieve.retrievers import load_retriever
from llm_rerank_plugin.retrieve.sequential import (
    HybridRetriever,
    SequentialModel,
    SequentialParams,
    standardize,
)
from tests.test_lifecycle import shop_config

# Encoded ids as NVTabular gives them: indices 0-2 are reserved, the vocabulary maps index -> id.
USERS = IdMap(np.array([None, None, None, "u1", "u2"], dtype=object))
ITEMS = IdMap(np.array([None, None, None, "a", "b", "c", "d"], dtype=object))


def history(rows: list[tuple[str, str]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["user_id", "item_id"])
    frame["timestamp"] = np.arange(len(frame), dtype=float)
    return with_sequence_position(frame)


def test_successor_counts_follow_the_sequence_order():
    params = SequentialParams(window=2, decay=0.5, backward=0.25, recent=2, popularity_exponent=0.0)
    model = SequentialModel.fit(
        history([("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "c"), ("u2", "d")]), USERS, ITEMS, params
    )
    s = model.successors.toarray()
    a, b, c, d = ITEMS.encode(["a", "b", "c", "d"])
    assert s[a, b] == 1.0 and s[b, c] == 1.0 and s[c, d] == 1.0  # next item
    assert s[a, c] == 0.5  # two steps later
    assert s[b, a] == 0.25 and s[c, a] == 0.125  # the reverse order, weighted by `backward`
    assert s[c, b] == 0.25 and s[d, c] == 0.25
    # Sequences of different users never pair up: u1's last item and u2's first are not neighbours
    # beyond their own co-occurrence (c -> d only comes from u2).
    assert s[b, d] == 0.0 and s[a, d] == 0.0
    u1, u2 = USERS.encode(["u1", "u2"])
    assert model.recent[u1].tolist() == [c, b]  # newest first, `recent` long
    assert model.recent[u2].tolist() == [d, c]
    assert (model.recent[:3] == NO_ITEM).all()


def test_user_scores_weight_the_newest_items_most():
    params = SequentialParams(window=1, backward=0.0, recent=2, recent_decay=0.5, popularity_exponent=0.0)
    model = SequentialModel.fit(
        history([("u1", "a"), ("u1", "b"), ("u2", "b"), ("u2", "c"), ("u2", "a"), ("u2", "d")]),
        USERS,
        ITEMS,
        params,
    )
    a, b, c, d = ITEMS.encode(["a", "b", "c", "d"])
    u1, u2 = USERS.encode(["u1", "u2"])
    scores = model.scores(np.array([u1, u2]))
    # u1's newest item is b (successors: c); then a (weight 0.5; successors: b, d).
    assert scores[0, c] == 1.0 and scores[0, b] == 0.5 and scores[0, d] == 0.5
    # u2's newest is d (no successor), then a (0.5): b and d.
    assert scores[1, b] == 0.5 and scores[1, d] == 0.5 and scores[1, c] == 0.0
    # A user known only by their items (newest first) scores as a fitted user with that history; items
    # the vocabulary does not know (the out-of-vocabulary code 2) are skipped.
    oov = ITEMS.encode(["zzz"])[0]
    again = model.scores_of_histories([np.array([b, a]), np.array([d, oov, a, c])])
    assert np.array_equal(again, scores)


def test_standardize_ignores_excluded_items():
    scores = np.array([[1.0, 2.0, 3.0, 100.0], [5.0, 5.0, 5.0, 5.0]])
    excluded = np.array([[False, False, False, True], [False, False, False, False]])
    z = standardize(scores, excluded)
    kept = z[0, :3]
    assert np.isclose(kept.mean(), 0.0) and np.isclose(kept.std(), 1.0)
    assert (z[1] == 0).all()  # no spread: no signal


@pytest.fixture(scope="module")
def shop_chain(tmp_path_factory, shop_dir):
    tmp = tmp_path_factory.mktemp("sequential")
    raw = shop_config(tmp, shop_dir, tmp / "no-model")
    (tmp / "config.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp / "config.yaml")
    data = load_data(config.data)
    split = leave_last_out(host_frame(data.interactions))
    return config, data, split, tmp


def test_weight_is_chosen_on_validation_and_used_by_later_fits(shop_chain):
    config, data, split, tmp = shop_chain
    history = split.train_and_valid
    chain = Chain(config, data, history, tmp / "work-weight")
    inner, valid = hold_out_last(history, 1)
    users, targets = valid["user_id"].to_numpy(), valid["item_id"].to_numpy()
    retriever, info = chain.fit_validation_retriever(inner, users, targets)
    assert isinstance(retriever, HybridRetriever)
    recall = info["valid_recall@20_by_weight"]
    assert info["sequential_weight"] == max(recall, key=lambda w: (recall[w], -w))
    assert retriever.weight == info["sequential_weight"]
    # The recall it reports is the recall of the retriever's own top 20 at that weight.
    top = retriever.recommend(users, k=20).item_ids
    assert np.isclose(np.mean((top == targets[:, None]).any(axis=1)), recall[retriever.weight])
    later = chain.fit_retriever(history)
    assert isinstance(later, HybridRetriever) and later.weight == retriever.weight
    # The base alone is what `merged=False` and the `retrieval` stage give.
    assert not isinstance(chain.fit_retriever(history, merged=False), HybridRetriever)


def test_the_candidates_never_see_the_events_they_are_judged_on(shop_chain):
    """Replacing every test event by another item changes nothing the chain fitted on the rest builds."""
    config, data, split, tmp = shop_chain
    history = split.train_and_valid

    def candidates(interactions: pd.DataFrame, folder: str) -> np.ndarray:
        altered = type(data)(**{**data.__dict__, "interactions": interactions})
        chain = Chain(config, altered, history, tmp / folder)
        chain.sequential_weight = 0.5
        return chain.fit_retriever(history).recommend(split.test["user_id"].to_numpy(), k=20).item_ids

    original = candidates(data.interactions, "work-a")
    test = split.test
    items = host_frame(data.items)["item_id"].to_numpy()
    swapped = test.assign(item_id=items[(np.searchsorted(items, test["item_id"]) + 7) % len(items)])
    altered = pd.concat([history, swapped])[list(host_frame(data.interactions).columns)]
    np.testing.assert_array_equal(original, candidates(altered, "work-b"))


def test_hybrid_saves_and_reloads_with_the_same_candidates(shop_chain, tmp_path):
    config, data, split, tmp = shop_chain
    history = split.train_and_valid
    chain = Chain(config, data, history, tmp / "work-save")
    chain.sequential_weight = 0.6
    retriever = chain.fit_retriever(history)
    retriever.save(tmp_path / "retriever")
    again = load_retriever(tmp_path / "retriever")
    assert isinstance(again, HybridRetriever) and again.weight == 0.6
    users = split.test["user_id"].to_numpy()
    before, after = retriever.recommend(users, k=20), again.recommend(users, k=20)
    np.testing.assert_array_equal(before.item_ids, after.item_ids)
    np.testing.assert_allclose(before.scores, after.scores, rtol=1e-6)
    # Seen items are never candidates.
    seen = history.groupby("user_id")["item_id"].apply(set)
    for user, row in zip(users.tolist(), before.item_ids, strict=True):
        assert not (set(row.tolist()) & seen[user])


def test_a_weight_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"sequential weight must be in \[0, 1\], got 1.5"):
        HybridRetriever(object(), None, 1.5)


def test_bad_sequential_settings_name_their_key(tmp_path):
    from llm_rerank_plugin.config import ConfigError

    with pytest.raises(ConfigError, match=r"retrieval\.sequential\.weight"):
        load_config(overrides={"retrieval": {"sequential": {"weight": 1.5}}})
    with pytest.raises(ConfigError, match=r"retrieval\.sequential\.window"):
        load_config(overrides={"retrieval": {"sequential": {"window": 0}}})


def test_a_bundle_refuses_a_config_with_other_sequential_settings(tmp_path):
    from llm_rerank_plugin.pipeline.bundle import BundleError, check_compatible

    saved = load_config(overrides={"retrieval": {"sequential": {"window": 10}}})
    check_compatible(saved, load_config(), tmp_path)  # the defaults are the same settings
    with pytest.raises(BundleError, match=r"retrieval\.sequential\.window: bundle 10, config 5"):
        check_compatible(saved, load_config(overrides={"retrieval": {"sequential": {"window": 5}}}), tmp_path)
    with pytest.raises(BundleError, match=r"retrieval\.sequential\.enabled: bundle True, config False"):
        check_compatible(
            saved, load_config(overrides={"retrieval": {"sequential": {"enabled": False}}}), tmp_path
        )
