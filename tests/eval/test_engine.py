"""The batching engine: right-padded batches over a shared, copied KV prefix give the logits of a plain
forward of each whole prompt."""

from __future__ import annotations

import torch

from edgellm.eval.cache import ResultStore
from edgellm.eval.engine import Request, Runner, common_prefix_len, pack_rows, plan


def test_common_prefix_len():
    assert common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_len([[5], [6]]) == 0 and common_prefix_len([]) == 0


def test_plan_respects_budget_and_positions():
    reqs = [Request(str(i), [7] * 20 + list(range(i + 1)), [19 + i]) for i in range(10)]
    p = plan([reqs], batch_tokens=16, max_rows=3)
    assert p.prefix == [19]  # capped at the first wanted position
    assert all(len(b.requests) <= 3 for b in p.batches)
    assert sorted(r.key for b in p.batches for r in b.requests) == sorted(r.key for r in reqs)


def test_shared_prefix_batches_match_plain_forward(llm_fp32):
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(100, 5000, (40,), generator=g).tolist()
    reqs = []
    for i, n in enumerate([3, 9, 1, 6]):
        tail = torch.randint(100, 5000, (n,), generator=g).tolist()
        ids = prefix + tail
        reqs.append(Request(f"r{i}", ids, list(range(len(ids) - min(n, 3), len(ids)))))
    runner = Runner(llm_fp32, ResultStore(None, "t"), progress=False)
    p = runner.plan([reqs], batch_tokens=64)
    assert p.prefix == [40] and len(p.batches) >= 1
    got = runner.run(p, lambda r, logits: logits.tolist())
    for r in reqs:
        ref = llm_fp32.logits(r.ids)[r.positions]
        assert (torch.tensor(got[r.key]) - ref).abs().max().item() < 1e-3


def test_kv_cache_stays_within_budget_across_groups(llm_fp32, monkeypatch):
    """Groups with many short prompts then few long ones: the cache keeps the larger shape only while
    (most rows) x (longest prompt) fits the budget, instead of growing both without bound."""
    from edgellm.eval import engine

    runner = Runner(llm_fp32, ResultStore(None, "t"), progress=False)
    cfg = llm_fp32.config
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4  # fp32 keys + values, every layer
    monkeypatch.setattr(engine, "CACHE_BYTES", per_token * 1000)  # room for 1000 cached tokens
    runner._ensure_cache(8, 100)       # 800 tokens
    runner._ensure_cache(2, 120)       # (8, 120) = 960 tokens still fits: keep the larger shape
    assert runner._cache_shape == (8, 120)
    runner._ensure_cache(2, 400)       # (8, 400) would be 3200: allocate just (2, 400)
    assert runner._cache_shape == (2, 400)
    assert llm_fp32.model.layers[0].self_attn.cache.k.shape[0] == 2


def test_pack_rows_groups_an_items_choices_not_unrelated_prompts():
    question = [5] * 30
    choices = [Request(f"c{i}", question + [10 + i] * (i + 2), [29 + j for j in range(i + 2)]) for i in range(4)]
    other = [Request("o", [5, 5, 5] + [9] * 40, [42])]  # shares only 3 leading tokens with the question
    rows = pack_rows(choices + other)
    assert sorted(len(r.requests) for r in rows) == [1, 4]
    row = next(r for r in rows if len(r.requests) == 4)
    assert row.prefix == 30 and row.length == 30 + 2 + 3 + 4 + 5
    assert all(len(r.requests) == 1 for r in pack_rows(choices, max_len=33))  # a row never outgrows max_len


def test_packed_batches_match_plain_forward(llm_fp32):
    """Items whose prompts share a question are packed (one row per question): every wanted logit equals the
    plain forward's of that prompt alone, wanted positions inside the shared part included."""
    g = torch.Generator().manual_seed(3)
    reqs = []
    for q in range(3):
        question = torch.randint(100, 5000, (12 + 7 * q,), generator=g).tolist()
        for c, n in enumerate([4, 1, 7]):
            ids = question + torch.randint(100, 5000, (n,), generator=g).tolist()
            reqs.append(Request(f"q{q}c{c}", ids, list(range(len(question) - 2, len(ids)))))
    runner = Runner(llm_fp32, ResultStore(None, "t"), progress=False)
    p = runner.plan([reqs], batch_tokens=4096)
    assert p.prefix == [0] and all(b.rows is not None for b in p.batches)
    assert sum(len(b.rows) for b in p.batches) == 3
    got = runner.run(p, lambda r, logits: logits.tolist())
    for r in reqs:
        ref = llm_fp32.logits(r.ids)[r.positions]
        assert (torch.tensor(got[r.key]) - ref).abs().max().item() < 1e-3
