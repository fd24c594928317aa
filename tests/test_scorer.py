"""MultiAspectScorer: shapes, the scoring formula on hand-built weights, the numpy fast path, persistence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llm_rerank_plugin.rerank.scorer import MultiAspectScorer
from tests.fixtures import unit_rows

ASPECTS = ["overall", "title", "genres"]
D = 8


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _scorer(mode: str = "max", tied: bool = False, n_features: int = 2, seed: int = 0) -> MultiAspectScorer:
    torch.manual_seed(seed)
    return MultiAspectScorer(
        D, ASPECTS, rank=3, gate_hidden=6, mode=mode, n_features=n_features, tied_fields=tied, dropout=0.1
    )


def _inputs(tied: bool, b: int = 2, c: int = 5, n_features: int = 2, seed: int = 1):
    rng = np.random.default_rng(seed)
    u = torch.from_numpy(unit_rows(rng.standard_normal((b, D))))
    shape = (b, c, len(ASPECTS), D) if tied else (b, c, D)
    items = torch.from_numpy(unit_rows(rng.standard_normal(shape)))
    feats = torch.from_numpy(rng.standard_normal((b, c, n_features)).astype(np.float32))
    return u, items, feats


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode", ["max", "softmax"])
def test_shapes_and_components(mode: str, tied: bool) -> None:
    scorer = _scorer(mode, tied).eval()
    u, items, feats = _inputs(tied)
    scores = scorer(u, items, feats)
    assert scores.shape == (2, 5) and scores.dtype == torch.float32
    comp = scorer.components(u, items, feats, gate_bias=torch.zeros(2, 3))
    for key in ("aspect_scores", "gate_weights", "gate_logits"):
        assert comp[key].shape == (2, 5, 3), key
    for key in ("bilinear", "score", "aspect_share", "item_bias", "feature_term"):
        assert comp[key].shape == (2, 5), key
    assert comp["aspect_idx"].dtype == torch.int64
    assert ((comp["aspect_idx"] >= 0) & (comp["aspect_idx"] < 3)).all()
    assert ((comp["aspect_share"] >= 0) & (comp["aspect_share"] <= 1 + 1e-6)).all()
    torch.testing.assert_close(comp["score"], scores)
    # |s_j| <= ‖u‖‖v‖ = 1 because the spectral norm never exceeds the Frobenius norm.
    assert comp["aspect_scores"].abs().max() <= 1.0 + 1e-6
    if mode == "softmax":
        torch.testing.assert_close(comp["gate_weights"].sum(-1), torch.ones(2, 5))
    else:
        assert (comp["gate_weights"] > 0).all()


def test_features_none_equals_zero_features() -> None:
    scorer = _scorer().eval()
    u, items, feats = _inputs(False)
    torch.testing.assert_close(scorer(u, items), scorer(u, items, torch.zeros_like(feats)))


def test_aspect_norms_match_dense_frobenius() -> None:
    scorer = _scorer()
    with torch.no_grad():
        dense = torch.einsum("jdr,jer->jde", scorer.aspect_a, scorer.aspect_b)
        torch.testing.assert_close(scorer.aspect_norms(), torch.linalg.matrix_norm(dense, ord="fro"))


def _hand_scorer(mode: str) -> tuple[MultiAspectScorer, torch.Tensor, torch.Tensor]:
    """d=4, J=2, r=2 with known weights; the gate outputs constant logits [0.5, -0.3]."""
    scorer = MultiAspectScorer(
        4, ["overall", "genres"], rank=2, gate_hidden=3, mode=mode, n_features=1
    ).eval()
    e = torch.eye(4)
    with torch.no_grad():
        scorer.aspect_a.zero_()
        scorer.aspect_b.zero_()
        # M_0 = e0 (2 e0)ᵀ: ‖M_0‖_F = 2.  M_1 = e1 (4 e0 + 3 e2)ᵀ: ‖M_1‖_F = 5.
        scorer.aspect_a[0, :, 0] = e[0]
        scorer.aspect_b[0, :, 0] = 2 * e[0]
        scorer.aspect_a[1, :, 0] = e[1]
        scorer.aspect_b[1, :, 0] = 4 * e[0] + 3 * e[2]
        scorer.gate_in.weight.zero_()
        scorer.gate_in.bias.zero_()
        scorer.gate_out.weight.zero_()
        scorer.gate_out.bias.copy_(torch.tensor([0.5, -0.3]))
        scorer.beta.zero_()
    u = torch.tensor([[0.6, 0.8, 0.0, 0.0]])
    v = torch.tensor([[[0.8, 0.0, 0.6, 0.0]]])
    return scorer, u, v


# s_0 = uᵀM_0v / 2 = 2·0.6·0.8 / 2;  s_1 = u_1·(4 v_0 + 3 v_2) / 5 = 0.8·(3.2 + 1.8) / 5.
S0, S1 = 0.48, 0.8


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_max_mode_by_hand() -> None:
    scorer, u, v = _hand_scorer("max")
    comp = scorer.components(u, v)
    torch.testing.assert_close(comp["aspect_scores"][0, 0], torch.tensor([S0, S1]))
    w = [_softplus(0.5), _softplus(-0.3)]
    torch.testing.assert_close(comp["gate_weights"][0, 0], torch.tensor(w))
    # w_0 s_0 = 0.4676 beats w_1 s_1 = 0.4435 although s_1 > s_0: the gate decides.
    expected = max(w[0] * S0, w[1] * S1)
    assert comp["aspect_idx"].item() == 0
    assert comp["bilinear"].item() == pytest.approx(expected, abs=1e-6)
    assert comp["aspect_share"].item() == pytest.approx(w[0] * S0 / (w[0] * S0 + w[1] * S1), abs=1e-6)
    # The fused score with α = 2, β = 0.5 on feature 1.5 and a zero item prior.
    with torch.no_grad():
        scorer.alpha.fill_(2.0)
        scorer.beta.fill_(0.5)
    score = scorer(u, v, torch.tensor([[[1.5]]]))
    assert score.item() == pytest.approx(2 * expected + 0.75, abs=1e-6)


def test_softmax_mode_by_hand() -> None:
    scorer, u, v = _hand_scorer("softmax")
    comp = scorer.components(u, v)
    z = math.exp(0.5) + math.exp(-0.3)
    w = [math.exp(0.5) / z, math.exp(-0.3) / z]
    torch.testing.assert_close(comp["gate_weights"][0, 0], torch.tensor(w))
    assert comp["bilinear"].item() == pytest.approx(w[0] * S0 + w[1] * S1, abs=1e-6)
    # In softmax mode the reported aspect is the largest contributor: 0.3101·0.8 < 0.6900·0.48.
    assert comp["aspect_idx"].item() == 0


def test_frobenius_normalisation_makes_scale_irrelevant() -> None:
    scorer, u, v = _hand_scorer("max")
    before = scorer.components(u, v)["aspect_scores"]
    with torch.no_grad():
        scorer.aspect_a.mul_(7.0)
        scorer.aspect_b[1].mul_(0.01)
    torch.testing.assert_close(scorer.components(u, v)["aspect_scores"], before)


def test_gate_bias_shifts_weights_and_winner() -> None:
    scorer, u, v = _hand_scorer("max")
    comp = scorer.components(u, v, gate_bias=torch.tensor([[0.0, 2.0]]))
    w = [_softplus(0.5), _softplus(1.7)]
    torch.testing.assert_close(comp["gate_weights"][0, 0], torch.tensor(w))
    assert comp["aspect_idx"].item() == 1
    assert comp["bilinear"].item() == pytest.approx(w[1] * S1, abs=1e-6)
    soft, u, v = _hand_scorer("softmax")
    plain = soft.components(u, v)["gate_weights"][0, 0]
    biased = soft.components(u, v, gate_bias=torch.tensor([[0.0, 2.0]]))["gate_weights"][0, 0]
    assert biased[1] > plain[1] and biased[0] < plain[0]


def test_max_mode_gradient_flows_only_through_argmax() -> None:
    scorer, u, v = _hand_scorer("max")
    scorer(u, v).sum().backward()
    assert scorer.aspect_a.grad[0].abs().sum() > 0
    assert scorer.aspect_a.grad[1].abs().sum() == 0


def test_untrained_scorer_starts_close_to_retrieval_order() -> None:
    torch.manual_seed(0)
    scorer = MultiAspectScorer(64, ASPECTS, rank=8, gate_hidden=16, n_features=2).eval()
    rng = np.random.default_rng(0)
    u = torch.from_numpy(unit_rows(rng.standard_normal((4, 64))))
    items = torch.from_numpy(unit_rows(rng.standard_normal((4, 30, 64))))
    retrieval = torch.from_numpy(rng.standard_normal((4, 30)).astype(np.float32))
    feats = torch.stack([retrieval, torch.from_numpy(rng.standard_normal((4, 30)).astype(np.float32))], -1)
    with torch.no_grad():
        scores = scorer(u, items, feats)
    for row in range(4):
        corr = np.corrcoef(scores[row].numpy(), retrieval[row].numpy())[0, 1]
        assert corr > 0.9


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode", ["max", "softmax"])
def test_score_fast_equals_forward(mode: str, tied: bool) -> None:
    scorer = _scorer(mode, tied, n_features=2)
    # Non-trivial item prior and β so every term of the fused score is exercised.
    with torch.no_grad():
        scorer.item_prior.weight.normal_()
        scorer.beta.copy_(torch.tensor([0.7, -0.2]))
    scorer.eval()
    rng = np.random.default_rng(3)
    shape = (40, len(ASPECTS), D) if tied else (40, D)
    item_matrix = unit_rows(rng.standard_normal(shape))
    proj = scorer.precompute_items(item_matrix)
    for _ in range(3):
        u = unit_rows(rng.standard_normal(D))
        idx = rng.choice(40, size=12, replace=False)
        feats = rng.standard_normal((12, 2)).astype(np.float32)
        gate_bias = rng.standard_normal(3).astype(np.float32)
        scores, aspect_idx, share = scorer.score_fast(u, idx, proj, feats, gate_bias)
        with torch.no_grad():
            comp = scorer.components(
                torch.from_numpy(u)[None],
                torch.from_numpy(item_matrix[idx])[None],
                torch.from_numpy(feats)[None],
                torch.from_numpy(gate_bias)[None],
            )
        assert scores.shape == (12,) and scores.dtype == np.float32
        np.testing.assert_allclose(scores, comp["score"][0].numpy(), atol=1e-4)
        np.testing.assert_array_equal(aspect_idx, comp["aspect_idx"][0].numpy())
        np.testing.assert_allclose(share, comp["aspect_share"][0].numpy(), atol=1e-4)
    # Without features / gate bias too.
    fast, _, _ = scorer.score_fast(u, idx, proj)
    with torch.no_grad():
        ref = scorer(torch.from_numpy(u)[None], torch.from_numpy(item_matrix[idx])[None])
    np.testing.assert_allclose(fast, ref[0].numpy(), atol=1e-4)


def test_score_fast_with_full_text_gate_vectors() -> None:
    scorer = _scorer("max", tied=True).eval()
    rng = np.random.default_rng(4)
    fields = unit_rows(rng.standard_normal((20, len(ASPECTS), D)))
    full = unit_rows(rng.standard_normal((20, D)))
    proj = scorer.precompute_items(fields, gate_matrix=full)
    u = unit_rows(rng.standard_normal(D))
    idx = np.arange(0, 20, 2)
    fast, _, _ = scorer.score_fast(u, idx, proj)
    with torch.no_grad():
        ref = scorer(
            torch.from_numpy(u)[None],
            torch.from_numpy(fields[idx])[None],
            gate_items=torch.from_numpy(full[idx])[None],
        )
        mean_gate = scorer(torch.from_numpy(u)[None], torch.from_numpy(fields[idx])[None])
    np.testing.assert_allclose(fast, ref[0].numpy(), atol=1e-4)
    assert not np.allclose(fast, mean_gate[0].numpy(), atol=1e-4)


def test_score_fast_rejects_stale_projections_and_bad_inputs() -> None:
    scorer = _scorer().eval()
    item_matrix = unit_rows(np.random.default_rng(5).standard_normal((10, D)))
    proj = scorer.precompute_items(item_matrix)
    u = item_matrix[0]
    with pytest.raises(ValueError, match=r"item_idx must lie in \[0, 10\)"):
        scorer.score_fast(u, np.array([0, 10]), proj)
    with pytest.raises(ValueError, match="item_idx must lie"):
        scorer.score_fast(u, np.array([-1]), proj)
    with pytest.raises(ValueError, match=r"u must have shape \(8,\)"):
        scorer.score_fast(u[:4], np.array([0]), proj)
    with pytest.raises(ValueError, match=r"features must have shape \(C, F\) = \(2, 2\)"):
        scorer.score_fast(u, np.array([0, 1]), proj, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"gate_bias must have shape \(3,\)"):
        scorer.score_fast(u, np.array([0, 1]), proj, gate_bias=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="item_matrix must be a float array of shape"):
        scorer.precompute_items(np.zeros((10, len(ASPECTS), D), np.float32))
    with torch.no_grad():
        scorer.alpha.add_(1.0)
    with pytest.raises(ValueError, match="stale"):
        scorer.score_fast(u, np.array([0]), proj)
    with pytest.raises(ValueError, match="stale"):
        _scorer().eval().score_fast(u, np.array([0]), scorer.precompute_items(item_matrix))


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path, tied: bool) -> None:
    scorer = _scorer("softmax", tied)
    with torch.no_grad():
        scorer.item_prior.weight.normal_()
    scorer.eval()
    u, items, feats = _inputs(tied)
    path = scorer.save(tmp_path / "sub" / "scorer.pt")
    loaded = MultiAspectScorer.load(path)
    assert loaded.config == scorer.config
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(u, items, feats), scorer(u, items, feats), rtol=0, atol=0)
    payload = torch.load(path, weights_only=True)
    assert payload["config"]["aspect_names"] == ASPECTS
    torch.save({"something": "else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a MultiAspectScorer checkpoint"):
        MultiAspectScorer.load(tmp_path / "other.pt")


def test_bad_shapes_name_the_expected_layout() -> None:
    untied, tied = _scorer(tied=False).eval(), _scorer(tied=True).eval()
    u, items, feats = _inputs(False)
    _, items4, _ = _inputs(True)
    with pytest.raises(ValueError, match=r"items must have shape \(B, C, 8\) .*got \(2, 5, 3, 8\)"):
        untied(u, items4)
    with pytest.raises(ValueError, match=r"items must have shape \(B, C, 3, 8\) .*got \(2, 5, 8\)"):
        tied(u, items)
    with pytest.raises(ValueError, match=r"items must have shape .*with B=1"):
        untied(u[:1], items)
    with pytest.raises(ValueError, match=r"u must have shape \(B, 8\); got \(2, 4\)"):
        untied(u[:, :4], items)
    with pytest.raises(ValueError, match=r"features must have shape \(B, C, F\) = \(2, 5, 2\)"):
        untied(u, items, feats[..., :1])
    with pytest.raises(ValueError, match=r"gate_bias must have shape \(B, J\) = \(2, 3\)"):
        untied(u, items, feats, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="gate_items .* only applies with tied_fields=True"):
        untied(u, items, gate_items=items)
    with pytest.raises(TypeError, match="items must be a floating-point tensor"):
        untied(u, items.long())


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        MultiAspectScorer(D, ASPECTS, mode="mean")
    with pytest.raises(ValueError, match="aspect_names must be unique"):
        MultiAspectScorer(D, ["a", "a"])
    with pytest.raises(TypeError, match="single string"):
        MultiAspectScorer(D, "overall")
    with pytest.raises(ValueError, match="feature_init must be a float or 2 floats"):
        MultiAspectScorer(D, ASPECTS, n_features=2, feature_init=[0.1])
    scorer = MultiAspectScorer(D, ASPECTS, n_features=2, feature_init=0.3)
    assert scorer.beta.tolist() == pytest.approx([0.3, 0.0])
    assert scorer.alpha.item() == 1.0
