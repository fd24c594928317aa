"""The cold-start protocol: the seeded split, its metrics, and one end-to-end run on the tiny shop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from llm_rerank_plugin.config import load_config
from llm_rerank_plugin.evaluation.cold import (
    COLD_ITEM_RANKERS,
    cold_split,
    ndcg_recall_at,
    random_expectation,
    run_cold_protocol,
)
from llm_rerank_plugin.pipeline.text_items import item_text_matrix
from llm_rerank_plugin.pipeline.train import host_frame
from llm_rerank_plugin.retrieve.base import IdMap
from llm_rerank_plugin.retrieve.sequential import standardize
from llm_rerank_plugin.retrieve.text_adapter import TextAdapter, fit_text_adapter
from tests.test_lifecycle import shop_config


def _log(seed: int = 0) -> pd.DataFrame:
    """40 users, 30 items; item i has about 2 * i events, so some fall under the eligibility bound."""
    rng = np.random.default_rng(seed)
    rows = [(u, i, float(t)) for i in range(30) for t, u in enumerate(rng.choice(40, size=min(2 * i, 40)))]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    frame["rating"] = 1.0
    return frame


def test_cold_split_is_seeded_and_removes_every_cold_event():
    log = _log()
    a = cold_split(log, 0.2, 0.1, min_interactions=6, seed=7)
    b = cold_split(log, 0.2, 0.1, min_interactions=6, seed=7)
    assert a.items.tolist() == b.items.tolist() and a.users.tolist() == b.users.tolist()
    assert a.warm.equals(b.warm)
    counts = log["item_id"].value_counts()
    eligible = set(counts.index[counts >= 6].tolist())
    assert a.eligible_items == len(eligible)
    assert len(a.items) == round(0.2 * len(eligible)) and set(a.items.tolist()) <= eligible
    assert len(a.users) == round(0.1 * log["user_id"].nunique())
    assert not a.warm["item_id"].isin(a.items.tolist()).any()
    assert not a.warm["user_id"].isin(a.users.tolist()).any()
    cold = log["item_id"].isin(a.items.tolist()) | log["user_id"].isin(a.users.tolist())
    assert len(a.warm) == int((~cold).sum())
    # the user draw is its own stream: turning cold users off keeps the same cold items
    assert cold_split(log, 0.2, 0.0, 6, seed=7).items.tolist() == a.items.tolist()
    draws = {tuple(cold_split(log, 0.2, 0.1, 6, seed=s).items.tolist()) for s in range(5)}
    assert len(draws) > 1, "the seed does not change the draw"


def test_a_share_that_leaves_nothing_names_its_key():
    log = _log()
    with pytest.raises(ValueError, match="evaluation.cold_items"):
        cold_split(log, 0.01, 0.0, min_interactions=6, seed=0)
    with pytest.raises(ValueError, match="evaluation.cold_users"):
        cold_split(log, 0.0, 0.001, min_interactions=6, seed=0)


def test_ndcg_and_recall_of_hand_made_rankings():
    ranked = np.array(["a", "b", "c", "d"])
    ndcg, recall = ndcg_recall_at(ranked, {"b", "z"})
    assert ndcg == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    assert recall == pytest.approx(0.5)
    assert ndcg_recall_at(ranked, {"a"}) == (pytest.approx(1.0), pytest.approx(1.0))
    # more relevant items than the cutoff: a perfect top 10 scores 1 on both
    many = [str(i) for i in range(30)]
    assert ndcg_recall_at(many, set(many[:15])) == (pytest.approx(1.0), pytest.approx(1.0))
    assert ndcg_recall_at(many, set(many[10:])) == (0.0, 0.0)
    with pytest.raises(ValueError, match="no relevant"):
        ndcg_recall_at(ranked, set())


def test_random_expectation_is_the_mean_of_random_orders():
    rng = np.random.default_rng(0)
    items = np.arange(25)
    for relevant in (1, 3, 12):
        rel = set(range(relevant))
        draws = np.array([ndcg_recall_at(rng.permutation(items), rel) for _ in range(6000)])
        expected = random_expectation(25, relevant)
        assert draws.mean(axis=0) == pytest.approx(expected, abs=0.012)


def test_the_text_adapter_recovers_a_linear_map_and_survives_a_round_trip(tmp_path):
    # Factors that are an exact linear function of the text: the ridge map must predict unseen items'.
    rng = np.random.default_rng(0)
    text = rng.normal(size=(200, 16))
    truth = rng.normal(size=(16, 4))
    factors = text @ truth + 0.5
    adapter = fit_text_adapter(text[:150], factors[:150], seed=0)
    assert adapter.items == 150 and adapter.valid_r2 > 0.99
    predicted = adapter.predict(text[150:])
    assert np.corrcoef(predicted.ravel(), factors[150:].ravel())[0, 1] > 0.99
    adapter.save(tmp_path / "adapter")
    again = TextAdapter.load(tmp_path / "adapter")
    assert np.array_equal(again.predict(text[150:]), predicted) and again.info == adapter.info
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        adapter.predict(text[:, :8])
    with pytest.raises(ValueError, match="expected >= 10"):
        fit_text_adapter(text[:5], factors[:5], seed=0)


def test_fold_in_is_the_als_step_for_a_new_user():
    # The same user factor implicit's own recalculate_user solves, the history excluded from the top.
    from implicit.cpu.als import AlternatingLeastSquares

    from llm_rerank_plugin.retrieve.retrievers import ImplicitRetriever

    rng = np.random.default_rng(0)
    n = 40
    dense = (rng.random((60, 3 + n)) < 0.2).astype(np.float32)
    dense[:, :3] = 0  # pad / null / out-of-vocabulary columns, as in the workflow's vocabulary
    als = AlternatingLeastSquares(factors=8, iterations=5, regularization=0.05, alpha=2.0, random_state=0)
    als.fit(sp.csr_matrix(dense), show_progress=False)
    retriever = ImplicitRetriever("als", factors=8, regularization=0.05, alpha=2.0)
    retriever.item_map = IdMap(np.array([None, None, None, *range(100, 100 + n)], dtype=object))
    retriever.user_map = IdMap(np.array([None, None, None, "known"], dtype=object))
    retriever.seen = sp.csr_matrix((4, 3 + n), dtype=np.float32)
    retriever.item_factors = np.asarray(als.item_factors)
    found = retriever.recommend_for_histories(["new"], [[105, 117, 130, "unknown"]], k=n)
    top, scores = found.item_ids[0], found.scores[0]
    assert not {105, 117, 130} & set(top.tolist()) and (top != -1).sum() == n - 3
    row = sp.csr_matrix((np.ones(3, np.float32), ([0, 0, 0], [8, 20, 33])), shape=(1, 3 + n))
    expected = np.asarray(als.item_factors) @ als.recalculate_user(0, row)
    real = top != -1
    assert scores[real] == pytest.approx(expected[retriever.item_map.encode(top[real])], abs=1e-4)
    assert not retriever.fold_in([np.array([2, 0])]).any()  # no known item: a zero factor
    with pytest.raises(ValueError, match="one history per user"):
        retriever.recommend_for_histories(["a", "b"], [[105]], k=3)


@pytest.fixture(scope="module")
def cold_run(tmp_path_factory, tiny_bert_dir, single_torch_thread):
    from llm_rerank_plugin.data import load_data
    from llm_rerank_plugin.data.synthetic import generate_shop

    shop = tmp_path_factory.mktemp("cold-shop")
    generate_shop(shop, scale=0.04, seed=3)
    raw = shop_config(tmp_path_factory.mktemp("cold"), shop, tiny_bert_dir)
    raw["evaluation"] = {"cold_items": 0.3, "cold_users": 0.1, "cold_min_interactions": 5}
    raw["stages"]["llm_rerank"]["new_item_slots"] = 1
    config = load_config(overrides=raw)
    data = load_data(config.data)
    return config, data, run_cold_protocol(config, data)


def test_the_protocol_runs_and_reports_every_row(cold_run):
    config, _, out = cold_run
    assert set(out) >= {"cold_items", "cold_users", "protocol", "seconds"}
    items = out["cold_items"]
    assert items["share"] == 0.3 and items["items"] > 10 and items["users"] > 0
    assert set(items["rankers"]) == {*COLD_ITEM_RANKERS, "random", "random-expected"}
    assert "text-adapter" in COLD_ITEM_RANKERS and "reranker" in COLD_ITEM_RANKERS
    for row in items["rankers"].values():
        assert 0.0 <= row["ndcg@10"] <= 1.0 and 0.0 <= row["recall@10"] <= 1.0
    users = out["cold_users"]
    assert users["users"] == round(0.1 * 80)
    assert set(users["by_events"]) == {"0", "1", "3"}
    assert set(users["by_events"]["0"]) == {"users", "reranker", "popularity"}
    for n in ("1", "3"):
        row = users["by_events"][n]
        assert set(row) == {"users", "reranker", "popularity", "als-fold-in", "reranker+fold-in",
                            "fold_in_on_popularity"}  # fmt: skip
    for row in users["by_events"].values():
        assert row["users"] > 0


def test_the_warm_bundle_never_saw_a_cold_event(cold_run):
    from llm_rerank_plugin.pipeline import Bundle

    config, data, out = cold_run
    e = config.evaluation
    split = cold_split(data.interactions, e.cold_items, e.cold_users, e.cold_min_interactions, config.seed)
    bundle = Bundle.load(out["bundle"])
    cold_items, cold_users = set(split.items.tolist()), set(split.users.tolist())
    for retriever in (bundle.retriever, bundle.popularity):
        assert not cold_users & set(retriever.user_map._index)
        assert retriever.seen.sum() == split.warm[["user_id", "item_id"]].drop_duplicates().shape[0]
    assert not cold_items & set(bundle.popularity.item_map._index)
    # The retriever knows the cold items only by the factor their text predicts (retrieval.text_items):
    # no user has seen them and no successor count holds them.
    retriever = bundle.retriever
    index = retriever.item_map.encode(split.items)
    assert (index > 2).all() and retriever.seen[:, index].nnz == 0
    successors = retriever.sequential.successors
    assert successors[index].nnz == 0 and successors[:, index].nnz == 0
    base = retriever.base
    never_seen = set(host_frame(data.items)["item_id"]) - set(split.warm["item_id"])
    assert len(base.added_item_factors) == len(never_seen) and cold_items <= never_seen
    text = item_text_matrix(bundle.reranker.items, bundle.reranker.items.rows(split.items))
    assert np.allclose(base.item_factors[index], bundle.text_adapter.predict(text), atol=1e-5)
    reranker = bundle.reranker
    rows = reranker.items.rows(split.items)
    assert (reranker.items.popularity[rows] == 0).all()
    assert reranker.items.co_watch[rows].nnz == 0 and reranker.items.co_watch[:, rows].nnz == 0
    assert not np.isin(reranker.items.event_rows, rows).any()
    assert not cold_users & set(reranker.histories)
    assert not any(cold_items & set(h) for h in reranker.histories.values())


def test_never_seen_items_are_served_as_candidates(cold_run):
    from llm_rerank_plugin.pipeline import Bundle

    config, data, out = cold_run
    bundle = Bundle.load(out["bundle"])
    e = config.evaluation
    split = cold_split(data.interactions, e.cold_items, e.cold_users, e.cold_min_interactions, config.seed)
    info = bundle.manifest["training"]["text_items"]
    assert info["items_added"] == len(bundle.retriever.base.added_item_factors) >= len(split.items)
    assert info["fitted_on_items"] == bundle.text_adapter.items > 10
    candidates = bundle.candidates(bundle.users)
    assert np.isin(candidates.item_ids, split.items).any(), "no cold item reached any user's candidates"
    served = out["cold_items"]["served"]
    places = config.retrieval.text_items.places(config.retrieval.k)
    assert served["k"] == config.retrieval.k == 20 and served["kept_places"] == places == 2
    assert 0.0 < served["candidates_recall@20"] <= 1.0 and 0.0 <= served["reranked_recall@10"] <= 1.0
    # Every user's list holds the slots' worth of items without events, the rest are items with a history.
    added = set(bundle.retriever.item_map.vocabulary[-bundle.retriever.added_items :].tolist())
    per_user = [len(added & set(row.tolist())) for row in candidates.item_ids]
    assert min(per_user) == max(per_user) == min(places, len(added))
    # The baseline is the retrieval model as fitted: no item without events in it.
    merged_off = bundle.candidates(bundle.users, merged=False)
    as_fitted = bundle.retriever.base.recommend(bundle.users, k=config.retrieval.k, with_added=False)
    assert np.array_equal(merged_off.item_ids, as_fitted.item_ids)
    assert not added & set(merged_off.item_ids.ravel().tolist())
    with pytest.raises(ValueError, match="reserved_for_added needs with_added"):
        bundle.retriever.recommend(bundle.users, k=5, reserved_for_added=2, with_added=False)
    assert out["cold_items"]["text_adapter"]["in_bundle"] is True
    # One place of every served top 5 (stages.llm_rerank.top_k) is kept for an item without events.
    assert served["new_item_slots"] == 1
    for ranking in bundle.rank(bundle.users[:40]):
        assert len(added & set(ranking.item_ids.tolist())) >= 1


def test_items_added_to_a_served_bundle_become_candidates(cold_run):
    from llm_rerank_plugin.pipeline import Bundle

    config, data, out = cold_run
    bundle = Bundle.load(out["bundle"])
    catalogue = host_frame(data.items)
    new = catalogue.iloc[:2].copy()
    new["item_id"] = ["new-a", "new-b"]
    new["name"] = ["Trail running shoe", "Espresso grinder"]
    assert bundle.add_items(pd.concat([new, catalogue.iloc[:3]])) == 2  # known items are skipped
    retriever = bundle.retriever
    assert "new-a" in retriever.item_map and "new-b" in retriever.item_map
    rows = bundle.reranker.items.rows(["new-a", "new-b"])
    text = item_text_matrix(bundle.reranker.items, rows)
    index = retriever.item_map.encode(["new-a", "new-b"])
    assert np.allclose(retriever.base.item_factors[index], bundle.text_adapter.predict(text), atol=1e-5)
    user = bundle.users[0]
    scores = retriever.base.score([user, user], ["new-a", "new-b"])
    user_factor = retriever.base.user_factors[retriever.user_map.encode([user])[0]]
    expected = bundle.text_adapter.predict(text) @ user_factor
    assert scores == pytest.approx(expected, rel=1e-4)
    assert bundle.add_items(new) == 0 and len(retriever.item_map) == index.max() + 1
    best = bundle.candidates(bundle.users, k=len(retriever.item_map))
    assert np.isin(best.item_ids, ["new-a", "new-b"]).any()
    # Rows as the items file has them (its own id column, data.item_id_column) are taken too.
    raw = pd.read_parquet(config.data.items).head(1).assign(sku="new-c")
    assert bundle.add_items(raw) == 1 and "new-c" in retriever.item_map
    with pytest.raises(ValueError, match="expected 'sku' \\(data.item_id_column\\) or item_id"):
        bundle.add_items(raw.drop(columns=["sku"]))


def test_adding_items_to_retrievers_checks_what_it_is_given(cold_run):
    from llm_rerank_plugin.pipeline import Bundle

    _, _, out = cold_run
    bundle = Bundle.load(out["bundle"])
    base = bundle.retriever.base
    known = [next(iter(base.item_map._index))]
    with pytest.raises(ValueError, match="already known"):
        base.add_items(known, np.zeros((1, base.item_factors.shape[1])))
    with pytest.raises(ValueError, match="one factor row of width"):
        base.add_items(["x"], np.zeros((1, 3)))
    with pytest.raises(ValueError, match="repeat an id"):
        base.add_items(["x", "x"], np.zeros((2, base.item_factors.shape[1])))
    with pytest.raises(TypeError, match="popularity retriever has no item factors"):
        bundle.popularity.add_items(["x"], np.zeros((1, 4)))


def test_text_items_config_is_checked_and_bound_to_the_bundle(cold_run, tmp_path):
    from llm_rerank_plugin.config import ConfigError
    from llm_rerank_plugin.pipeline import Bundle
    from llm_rerank_plugin.pipeline.bundle import BundleError

    config, _, out = cold_run
    with pytest.raises(ConfigError, match="retrieval.text_items.enabled"):
        load_config(overrides={"retrieval": {"model": "popularity", "text_items": {"enabled": True}}})
    assert not load_config(overrides={"retrieval": {"model": "popularity"}}).retrieval.uses_text_items
    assert config.retrieval.uses_text_items
    raw = config.model_dump(mode="json")
    raw["retrieval"]["text_items"] = {"min_interactions": 3}
    with pytest.raises(BundleError, match="retrieval.text_items.min_interactions"):
        Bundle.load(out["bundle"], load_config(overrides=raw))
    shares = {0.0: 0, 0.01: 1, 0.1: 10, 0.25: 25, 1.0: 100}  # at least one place when above 0
    for share, places in shares.items():
        text_items = load_config(
            overrides={"retrieval": {"text_items": {"share": share}}}
        ).retrieval.text_items
        assert text_items.places(100) == places
    with pytest.raises(ConfigError, match="retrieval.text_items.share"):
        load_config(overrides={"retrieval": {"text_items": {"share": 1.5}}})
    # The places kept for new items only shape the served lists: any value serves the same bundle.
    raw["retrieval"]["text_items"] = {"share": 0}
    bundle = Bundle.load(out["bundle"], load_config(overrides=raw))
    added = set(bundle.retriever.item_map.vocabulary[-bundle.retriever.added_items :].tolist())
    by_score = bundle.retriever.recommend(bundle.users, k=config.retrieval.k)
    assert np.array_equal(bundle.candidates(bundle.users).item_ids, by_score.item_ids) and added


def test_a_new_user_with_events_gets_candidates_from_them(cold_run):
    from llm_rerank_plugin.pipeline import Bundle

    config, data, out = cold_run
    bundle = Bundle.load(out["bundle"])
    e = config.evaluation
    split = cold_split(data.interactions, e.cold_items, e.cold_users, e.cold_min_interactions, config.seed)
    user = split.users[0]
    assert not bundle.retriever.known_user(user)
    popular = bundle.candidates([user]).item_ids[0]
    events = split.events[split.events["user_id"] == user].sort_values("timestamp")
    history = [i for i in events["item_id"].tolist() if i in bundle.retriever.item_map][:3][::-1]
    for item in history[::-1]:  # what feedback does: each event becomes the newest history item
        bundle.reranker.observe(user, item)
    served = bundle.candidates([user])
    direct = bundle.retriever.recommend_for_histories(
        [user],
        [history],
        k=config.retrieval.k,
        reserved_for_added=config.retrieval.text_items.places(config.retrieval.k),
    )
    assert np.array_equal(served.item_ids, direct.item_ids) and not np.array_equal(
        served.item_ids[0], popular
    )
    assert not set(history) & set(served.item_ids[0].tolist())
    # ALS's folded-in factor and the successors of the newest items, each standardised, then mixed
    retriever = bundle.retriever
    encoded = [retriever.item_map.encode(history)]
    excluded = np.zeros((1, len(retriever.item_map)), bool)
    excluded[0, encoded[0]] = True
    excluded[:, :3] = True
    base = standardize(retriever.base.fold_in(encoded) @ retriever.base.item_factors.T, excluded)
    successors = standardize(retriever.sequential.scores_of_histories(encoded), excluded)
    mixed = (1 - retriever.weight) * base + retriever.weight * successors
    real = served.item_ids[0] != -1
    index = retriever.item_map.encode(served.item_ids[0][real])
    assert served.scores[0][real] == pytest.approx(mixed[0, index], rel=1e-4, abs=1e-5)
    # Events on items the retriever does not know leave the popularity list.
    stranger = "a-stranger"
    bundle.reranker.observe(stranger, "no-such-item")
    assert np.array_equal(bundle.candidates([stranger]).item_ids[0], popular)


def test_a_known_users_new_events_move_their_candidates(cold_run):
    from llm_rerank_plugin.pipeline import Bundle

    config, _, out = cold_run
    bundle = Bundle.load(out["bundle"])
    retriever, histories = bundle.retriever, bundle.reranker.histories
    k = config.retrieval.k
    places = {"reserved_for_added": config.retrieval.text_items.places(k)}
    users = bundle.users[:4]
    # Right after the fit nobody has events since: every known user keeps their fitted scores.
    assert all(retriever.history_since_fit(u, histories.get(u, [])) is None for u in bundle.users)
    before = bundle.candidates(users)
    assert np.array_equal(before.item_ids, retriever.recommend(users, k=k, **places).item_ids)
    user, new_item = users[0], before.item_ids[0][5]
    row = retriever.user_map.encode([user])[0]
    fitted_items = set(retriever.item_map.vocabulary[retriever.seen[row].indices].tolist())
    assert new_item not in fitted_items
    bundle.reranker.observe(user, new_item)  # what a positive feedback event does
    since = retriever.history_since_fit(user, histories[user])
    assert since[0] == new_item and set(since) == fitted_items | {new_item}
    after = bundle.candidates(users)
    direct = retriever.recommend_for_histories([user], [since], k=k, **places)
    assert np.array_equal(after.item_ids[0], direct.item_ids[0])
    assert not (fitted_items | {new_item}) & set(after.item_ids[0].tolist())
    assert not np.array_equal(after.item_ids[0], before.item_ids[0])
    assert np.array_equal(after.item_ids[1:], before.item_ids[1:])  # the others are untouched
    # The ablation baseline (ALS alone) follows the same events.
    alone = bundle.candidates([user], merged=False)
    assert new_item not in alone.item_ids[0].tolist()


def test_cold_item_users_are_the_warm_users_of_cold_items(cold_run):
    # The random-expected row is recomputed here from the split alone: the same users and relevant sets.
    config, data, out = cold_run
    e = config.evaluation
    split = cold_split(data.interactions, e.cold_items, e.cold_users, e.cold_min_interactions, config.seed)
    events = split.events
    on_cold = events[events["item_id"].isin(split.items.tolist())]
    on_cold = on_cold[on_cold["user_id"].isin(split.warm["user_id"].unique().tolist())]
    relevant = on_cold.groupby("user_id")["item_id"].nunique()
    expected = np.mean([random_expectation(len(split.items), r)[0] for r in relevant.tolist()])
    assert out["cold_items"]["users"] == len(relevant)
    assert out["cold_items"]["rankers"]["random-expected"]["ndcg@10"] == pytest.approx(expected)


def test_evaluate_runs_the_cold_protocol_when_configured(tmp_path, tiny_bert_dir, single_torch_thread):
    import json

    import yaml
    from typer.testing import CliRunner

    from llm_rerank_plugin.cli import app
    from llm_rerank_plugin.data.synthetic import generate_shop

    generate_shop(tmp_path / "shop", scale=0.04, seed=3)
    raw = shop_config(tmp_path, tmp_path / "shop", tiny_bert_dir)
    raw["evaluation"] = {"stages": ["popularity", "candidates"], "cold_items": 0.3, "cold_users": 0.1}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["evaluate", "--config", str(tmp_path / "config.yaml")])
    assert result.exit_code == 0, result.output
    assert "Cold items:" in result.output and "Cold users:" in result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["stages"]) == {"popularity", "candidates"}
    assert set(results["cold"]["cold_items"]["rankers"]) >= {"reranker", "text-cosine", "random"}
    assert results["cold"]["cold_users"]["users"] == round(0.1 * 80)
    assert "cold" in results["seconds"]
