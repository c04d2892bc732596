"""The ESAP engine on tiny MoE models: bounds, exported-model agreement, identity, prefix reuse, alignment, NaN."""
from __future__ import annotations

import dataclasses

import random

import pytest
import torch

from allocopt.data.tokens import TokenSet
from allocopt.models import describe, load_pruned
from allocopt.export import save_pruned
from allocopt.testing.tiny import build_tiny_model
from allocopt.objectives import Evaluator
from conftest import random_kept


def _tokens(rows: int = 3, length: int = 24, seed: int = 0, pad: int = 0) -> TokenSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (rows, length), generator=g)
    attn = torch.ones_like(ids)
    if pad:
        ids[-1, -pad:], attn[-1, -pad:] = 0, 0
    score = attn.bool() & torch.roll(attn.bool(), -1, 1)     # position t scores token t+1, which must be real
    score[:, -1] = False
    return TokenSet(ids, attn, score)


def _random_plans(model, n: int, seed: int = 0) -> list[dict[int, list[int]]]:
    info, rng = describe(model), random.Random(seed)
    return [random_kept(info, [rng.randint(l.top_k, l.num_experts) for l in info.layers], seed * 1000 + i)
            for i in range(n)]


def _peaked(model):
    """Random-init logits are nearly flat; a trained LM's are peaked, which is what makes the sparse cache small."""
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def test_sparse_bound_contains_exact_esap_for_random_plans():
    model = _peaked(build_tiny_model("olmoe", seed=0))
    tokens = _tokens()
    plans = _random_plans(model, 12)
    exact = Evaluator(model, tokens, exact=True).evaluate(plans)
    for tol in (1e-4, 1e-2):
        ev = Evaluator(model, tokens, tolerance=tol)
        assert ev.teacher.mode == "sparse" and ev.teacher.mean_tail <= tol
        for s, e in zip(ev.evaluate(plans), exact):
            assert s.lo <= e.value <= s.hi and s.hi - s.lo <= tol + 1e-5
            assert abs(s.value - e.value) <= tol / 2 + 1e-5


@pytest.mark.parametrize("tol, words", [(-1e-4, "ESAP tolerance -0.0001 is not a bound width in [0, 0.1]"),
                                        (5, "ESAP tolerance 5.0 is not a bound width in [0, 0.1]"),
                                        (0.10000001, "ESAP tolerance 0.10000001 is not"),      # not printed as 0.1
                                        (float("nan"), "ESAP tolerance nan is not"),
                                        ("abc", "ESAP tolerance must be a number, got str 'abc'"),
                                        (None, "ESAP tolerance must be a number, got NoneType None"),
                                        (True, "ESAP tolerance must be a number, got bool True")])
def test_a_library_caller_meets_the_command_lines_tolerance_rule(tol, words):
    """Evaluator built in Python (no RunConfig in front) refuses a bound too wide to rank plans, or not a number,
    in one AllocoptError line with the words the command line uses."""
    from allocopt.errors import AllocoptError

    with pytest.raises(AllocoptError) as refused:
        Evaluator(build_tiny_model("olmoe", seed=0), _tokens(), tolerance=tol)
    assert words in str(refused.value) and "\n" not in str(refused.value)


def _plain_esap(full, pruned, tokens: TokenSet) -> float:
    """Two plain forward passes, softmax in fp64, min, sum, mean over scored positions."""
    with torch.no_grad():
        p = torch.softmax(full(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits.double(), -1)
        q = torch.softmax(pruned(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits.double(), -1)
    return float(torch.minimum(p, q).sum(-1)[tokens.score_mask].mean())


@pytest.mark.parametrize("family,seed", [("olmoe", 3), ("deepseek_v3", 4)])
def test_engine_matches_exported_pruned_model(tmp_path, family, seed):
    model = _peaked(build_tiny_model(family, seed=seed))
    tokens = _tokens(pad=5)
    info = describe(model)
    plan = {l: [0, 1, 3, 4, 6, 7] for l in info.num_experts}      # 3 of each group of 4 (deepseek_v3: 2 groups)
    exported = _peaked(build_tiny_model(family, seed=seed))
    save_pruned(exported, None, tmp_path / "pruned", plan)
    pruned = load_pruned(tmp_path / "pruned")
    assert describe(pruned).num_experts == {l: len(k) for l, k in plan.items()}
    direct = _plain_esap(model, pruned, tokens)
    [exact] = Evaluator(model, tokens, exact=True).evaluate([plan])
    [sparse] = Evaluator(model, tokens).evaluate([plan])
    assert abs(exact.value - direct) <= 1e-5
    assert sparse.lo - 1e-6 <= direct <= sparse.hi + 1e-6
    assert exact.tokens == sparse.tokens == int(tokens.score_mask.sum())


def test_identity_plan_is_exactly_one():
    model = build_tiny_model("qwen3_moe", seed=0)
    tokens = _tokens()
    info = describe(model)
    full = {l: list(range(e)) for l, e in info.num_experts.items()}
    for objective, want in (("esap", 1.0), ("kl_pq", 0.0), ("kl_qp", 0.0)):
        ev = Evaluator(model, tokens, objective=objective)
        values = ev.evaluate([{}, full, _random_plans(model, 1)[0]])
        assert values[0].value == values[0].lo == values[0].hi == want and values[1].value == want
        assert values[2].value != want


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "deepseek_v3", "glm_moe_dsa", "hy_v4"])
def test_prefix_reuse_batching_and_the_narrowed_head_match_one_full_forward_per_candidate(family):
    # ungrouped routing, so that the hand-made plans below are routable; glm_moe_dsa passes (hidden, indexer
    # top-k) from layer to layer, which prefix reuse must carry whole
    model = build_tiny_model(family, seed=1, **({"n_group": 1, "topk_group": 1} if family != "gpt_oss" else {}))
    tokens = _tokens(rows=4, pad=3)
    info = describe(model)
    layers = sorted(info.num_experts)
    base = {l: list(range(info.num_experts[l] - 2)) for l in layers}
    # a GA-like population: children of one parent that differ from it in later layers only, plus duplicates
    plans = [base] + [{**base, layers[-1]: list(range(2, 2 + k))} for k in (2, 3, 4)] \
        + [{**base, layers[-2]: [0, 1, 5]}, {layers[-1]: [1, 2, 3]}, base, {**base, layers[-1]: [2, 3]}]
    fast = Evaluator(model, tokens, exact=True)
    slow = Evaluator(model, tokens, exact=True, batch_size=1, prefix_reuse=False, head_rows=False)
    assert fast.prefix_reuse, "the suffix trick must be verified safe on this family"
    assert fast.head_rows and not slow.head_rows, "the LM head must run on the scored positions only"
    a, b = fast.evaluate(plans), slow.evaluate(plans)
    assert max(abs(x.value - y.value) for x, y in zip(a, b)) <= 1e-6
    assert fast.counters["evaluated"] == 6 and fast.counters["prefix_hits"] >= 5
    assert fast.counters["layers_run"] < slow.counters["layers_run"]
    again = fast.evaluate(plans[::-1])                     # served from the result cache
    assert [v.value for v in again] == [v.value for v in a[::-1]] and fast.counters["evaluated"] == 6


def test_alignment_position_t_predicts_token_t_plus_1_and_padding_is_ignored():
    model = build_tiny_model("olmoe", seed=2)
    tokens = _tokens(rows=3, length=20, pad=6)
    [v] = Evaluator(model, tokens, objective="nll").evaluate([{}])
    total, count = 0.0, 0
    with torch.no_grad():
        for row, attn, score in zip(tokens.input_ids, tokens.attention_mask, tokens.score_mask):
            real = row[attn.bool()][None]                 # the row alone, without its padding
            logq = torch.log_softmax(model(input_ids=real).logits[0].double(), -1)
            for t in score.nonzero().flatten().tolist():
                total -= float(logq[t, real[0, t + 1]])
                count += 1
    assert v.tokens == count == 3 * 19 - 6
    assert abs(v.value - total / count) <= 1e-5


def test_nan_expert_fails_only_the_plans_that_keep_it():
    model = build_tiny_model("olmoe", seed=5)
    tokens = _tokens()
    keep_it = [{1: [0, 1, 2, 3]}, {1: [3, 4, 5], 2: [0, 1]}]
    drop_it = [{1: [0, 1, 2]}, {1: [1, 2, 4, 5], 2: [0, 1, 2]}]
    clean = Evaluator(model, tokens, exact=True)
    before = clean.evaluate(drop_it)
    with torch.no_grad():
        experts = model.model.layers[1].mlp.experts
        experts.gate_up_proj[3].fill_(float("nan"))
    # changed weights are another model (its fingerprint covers every tensor), so the clean model's teacher is handed
    # over re-labelled: the damaged expert is scored against what the full model computed before the damage
    teacher = dataclasses.replace(clean.teacher, model_fingerprint=describe(model).fingerprint)
    ev = Evaluator(model, tokens, exact=True, teacher=teacher)
    values = ev.evaluate(keep_it + drop_it)
    assert all(not v.ok and v.value is None and "non-finite" in v.failed for v in values[:2])
    assert [v.value for v in values[2:]] == pytest.approx([v.value for v in before], abs=1e-7)


def test_cpu_bf16_model_scores_in_fp32():
    model = _peaked(build_tiny_model("olmoe", seed=6)).to(torch.bfloat16)
    tokens = _tokens()
    plans = _random_plans(model, 3, seed=1)
    exact = Evaluator(model, tokens, exact=True).evaluate(plans + [{}])
    sparse = Evaluator(model, tokens).evaluate(plans)
    assert exact[-1].value == 1.0
    for s, e in zip(sparse, exact):
        assert isinstance(e.value, float) and 0 < e.value < 1 and s.lo <= e.value <= s.hi


@pytest.mark.parametrize("objective", ["esap", "kl_pq"])
def test_non_finite_teacher_logits_are_refused(objective):
    """Every plan is compared with the full model: a NaN teacher (here one NaN row of lm_head) fails in one line
    instead of deep in the teacher cache's histogram."""
    from allocopt.errors import AllocoptError

    model = build_tiny_model("olmoe", seed=0)
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")
    with pytest.raises(AllocoptError, match=r"full model's logits are not finite \(inf/NaN\) in float32 on search batch 0; "
                                            r"check the checkpoint's weights"):
        Evaluator(model, _tokens(), objective=objective)


def _row_esap_sums(full, kept, tokens: TokenSet) -> list[float]:
    """Per row: sum over its scored positions of sum_v min(p, q), from two plain forwards in fp64."""
    from allocopt.models import mask_experts

    with torch.no_grad():
        p = torch.softmax(full(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits.double(), -1)
        with mask_experts(full, kept):
            q = torch.softmax(full(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).logits.double(), -1)
    overlap = torch.minimum(p, q).sum(-1)
    score = tokens.score_mask.clone()
    score[:, -1] = False
    return [float(overlap[i][score[i]].sum()) for i in range(len(tokens))]


def test_partial_scores_are_the_first_rows_and_reuse_what_was_scored():
    model = _peaked(build_tiny_model("olmoe", seed=7))
    tokens = _tokens(rows=6, pad=4)
    plans = _random_plans(model, 3, seed=2)
    ev = Evaluator(model, tokens, exact=True, batch_size=2, prefix_reuse=False)
    partial = ev.evaluate(plans, rows=3)                          # rounded up to whole micro-batches: 4 rows
    assert [v.rows for v in partial] == [4, 4, 4] and ev.rows_for(3) == 4 and ev.num_rows == 6
    head = TokenSet(tokens.input_ids[:4], tokens.attention_mask[:4], tokens.score_mask[:4])
    alone = Evaluator(model, head, exact=True, batch_size=2).evaluate(plans)
    for p, a in zip(partial, alone):
        assert p.value == pytest.approx(a.value, abs=1e-12) and p.tokens == a.tokens
    per_pass = len(ev.runner.layers) * 2 * tokens.input_ids.shape[1]          # one micro-batch through every layer
    assert ev.counters["layer_tokens"] == 3 * 2 * per_pass
    full = ev.evaluate(plans)                                     # only the last micro-batch is new
    assert ev.counters["layer_tokens"] == 3 * 3 * per_pass and [v.rows for v in full] == [6, 6, 6]
    fresh = Evaluator(model, tokens, exact=True, batch_size=2, prefix_reuse=False, teacher=ev.teacher).evaluate(plans)
    assert [v.value for v in full] == pytest.approx([v.value for v in fresh], abs=1e-12)
    first = ev.evaluate(plans[:1], rows=1)[0]                     # fewer rows than scored: the same sums, cut
    assert first.rows == 2 and first.row_sums == full[0].row_sums[:2] and ev.counters["layer_tokens"] == 9 * per_pass


def test_row_sums_standard_error_and_paired_difference_follow_their_definitions():
    import numpy as np

    from allocopt.objectives.engine import paired_difference

    model = _peaked(build_tiny_model("olmoe", seed=8))
    tokens = _tokens(rows=5, pad=3)
    a_plan, b_plan = _random_plans(model, 2, seed=3)
    a, b = Evaluator(model, tokens, exact=True, batch_size=2).evaluate([a_plan, b_plan])
    for v, plan in ((a, a_plan), (b, b_plan)):
        assert list(v.row_sums) == pytest.approx(_row_esap_sums(model, plan, tokens), abs=1e-5)
        n = np.array(v.row_tokens, dtype=float)
        s = np.array(v.row_sums)
        assert n.sum() == v.tokens and v.value == pytest.approx(s.sum() / n.sum(), abs=1e-12)
        want = np.sqrt(5 / 4 * ((s - v.value * n) ** 2).sum()) / n.sum()
        assert v.se == pytest.approx(want, rel=1e-9) and v.se > 0
    diff, se = paired_difference(a, b)
    d = np.array(a.row_sums) - np.array(b.row_sums)
    n = np.array(a.row_tokens, dtype=float)
    assert diff == pytest.approx(a.value - b.value, abs=1e-12)
    assert se == pytest.approx(np.sqrt(5 / 4 * ((d - diff * n) ** 2).sum()) / n.sum(), rel=1e-9)
