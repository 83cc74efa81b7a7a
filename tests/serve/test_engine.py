"""The continuous-batching engine in-process: the batched decode step against one-sequence decoding on tiny
models of every architecture, and the scheduler's batching/prefix-reuse invariants."""

from __future__ import annotations

import threading

import pytest
import torch

import edgellm
from edgellm.generate import SamplingParams
from edgellm.model import KVCache
from edgellm.serve.engine import PREFILL_CHUNK, Engine, Request

from ..conftest import TINY_CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")


def pooled(model, rows: int, size: int) -> list[KVCache]:
    cfg = model.config
    return [KVCache(rows, cfg.num_kv_heads, size, cfg.head_dim, model.dtype, rolling=False) for _ in model.layers]


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
@torch.inference_mode()
def test_batched_rows_equal_rows_alone_and_the_full_forward(tiny_checkpoints, arch):
    """Three sequences at different positions (past Mistral's 16-token window) decode in one batched step;
    each row equals the same row decoded alone and the full causal forward within fp32 noise. (Not bit for
    bit: dense fp32 GEMMs round an M=1 product differently from an M=3 one; the default model's 4-bit kernels
    do not, see the next test.)"""
    m = edgellm.load(tiny_checkpoints[arch], dtype="fp32").model
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 23, 40)]
    pool = pooled(m, 4, 64)
    rows = [2, 0, 3]  # not in order: rows are slots of a pool
    for r, ids in zip(rows, seqs, strict=True):
        m.use_caches([c.row(r) for c in pool])
        m(torch.tensor([ids[:-1]]), 0, use_cache=True)
    m.use_caches(pool)
    last = torch.tensor([[ids[-1]] for ids in seqs])
    pos = [len(ids) - 1 for ids in seqs]
    batched = m.batch_decode_step(last, rows, pos)  # (3, V)
    for b, ids in enumerate(seqs):
        alone = m.batch_decode_step(last[b:b + 1], rows[b:b + 1], pos[b:b + 1])
        torch.testing.assert_close(batched[b], alone[0], atol=1e-5, rtol=1e-5)
        full = m(torch.tensor([ids]))[0, -1].float()
        torch.testing.assert_close(batched[b], full, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_default_model_batched_rows_equal_rows_alone_bit_for_bit(default_gguf):
    """The default settings' kernels (int8-activation dot products per row, per-row attention) make a batched
    row identical to the same sequence alone: the server's answers do not depend on who shares the step."""
    llm = edgellm.load(default_gguf)
    m = llm.model
    seqs = [llm.tokenizer.encode(t) for t in ("The capital of France is", "def fibonacci(n):\n    return",
                                              "One, two, three, four, five, six,")]
    pool = pooled(m, 3, 64)
    for r, ids in enumerate(seqs):
        m.use_caches([c.row(r) for c in pool])
        m(torch.tensor([ids[:-1]]), 0, use_cache=True)
    m.use_caches(pool)
    last, rows, pos = torch.tensor([[ids[-1]] for ids in seqs]), [0, 1, 2], [len(ids) - 1 for ids in seqs]
    batched = m.batch_decode_step(last, rows, pos)
    for b in range(3):
        assert torch.equal(batched[b], m.batch_decode_step(last[b:b + 1], rows[b:b + 1], pos[b:b + 1])[0])


def run(engine: Engine, prompts: list[list[int]], max_new: int = 8) -> list[tuple[list[int], dict]]:
    results: list = [None] * len(prompts)
    done = threading.Semaphore(0)
    for i, ids in enumerate(prompts):
        toks: list[int] = []

        def emit(kind, payload, i=i, toks=toks):
            if kind == "tokens":
                toks.extend(t.token for t in payload)
            else:
                results[i] = (toks, payload)
                done.release()

        engine.submit(Request(ids, SamplingParams(max_new_tokens=max_new, ignore_eos=True), emit))
    for _ in prompts:
        assert done.acquire(timeout=60)
    return results


def test_scheduler_batches_reuses_prefixes_and_answers_as_alone(tiny_checkpoints):
    llm = edgellm.load(tiny_checkpoints["llama"], dtype="fp32")
    engine = Engine(llm.model, llm.tokenizer, parallel=3, ctx=256, max_queue=8)
    engine.start()
    try:
        g = torch.Generator().manual_seed(1)
        shared = torch.randint(3, 300, (2 * PREFILL_CHUNK + 10,), generator=g).tolist()
        prompts = [shared + torch.randint(3, 300, (n,), generator=g).tolist() for n in (3, 7, 12, 1, 30)]
        alone = [run(engine, [p])[0] for p in prompts]            # one at a time
        together = run(engine, prompts)                            # 5 requests, 3 rows: some wait, all batch
        assert [t for t, _ in together] == [t for t, _ in alone]
        # the shared prefix's whole chunks were reused (never the last prompt token, never a partial chunk)
        assert all(d["cached_tokens"] % PREFILL_CHUNK == 0 for _, d in alone + together)
        assert max(d["cached_tokens"] for _, d in alone[1:]) == 2 * PREFILL_CHUNK
        assert alone[0][1]["cached_tokens"] == 0
        assert all(d["finish_reason"] == "length" and d["completion_tokens"] == 8 for _, d in together)
    finally:
        engine.stop()


def test_engine_runs_on_the_thread_that_calls_run(tiny_checkpoints):
    """The server loads the model and runs the loop on one thread (serve/app.py: OpenMP keeps a thread team per
    thread that runs kernels, two such threads oversubscribe the cores); stop() from another thread ends it."""
    llm = edgellm.load(tiny_checkpoints["llama"], dtype="fp32")
    engine = Engine(llm.model, llm.tokenizer, parallel=2, ctx=64, max_queue=4)
    worker = threading.Thread(target=engine.run)
    worker.start()
    try:
        (tokens, done), = run(engine, [[5, 6, 7]], max_new=4)
        assert len(tokens) == 4 and engine._thread is worker
    finally:
        engine.stop()
        worker.join(timeout=10)
    assert not worker.is_alive()


def test_server_config_carries_the_thread_count():
    from edgellm.serve.app import ServerConfig, create_app

    assert create_app(ServerConfig()).state.server.cfg.threads == torch.get_num_threads()
    assert create_app(ServerConfig(threads=1)).state.server.cfg.threads == 1


@torch.inference_mode()
def test_default_model_engine_decodes_in_c_as_the_eager_batch_step(default_gguf):
    llm = edgellm.load(default_gguf)
    engine = Engine(llm.model, llm.tokenizer, parallel=3, ctx=64, max_queue=4)
    assert engine.native is not None
    m = llm.model
    seqs = [llm.tokenizer.encode(t) for t in ("The capital of France is", "One, two, three, four,")]
    for r, ids in zip((2, 0), seqs, strict=True):
        m.use_caches([c.row(r) for c in engine.pool])
        m(torch.tensor([ids[:-1]]), 0, use_cache=True)
    m.use_caches(engine.pool)
    last, rows, pos = torch.tensor([[ids[-1]] for ids in seqs]), [2, 0], [len(ids) - 1 for ids in seqs]
    assert torch.equal(engine.native.batch_step(last, rows, pos), m.batch_decode_step(last, rows, pos))


def run_requests(engine: Engine, reqs: list[tuple[list[int], SamplingParams]]) -> list[tuple[list[int], dict]]:
    """Submit every request at once, drive the engine on this thread until all are done."""
    results: list = [None] * len(reqs)
    for i, (ids, params) in enumerate(reqs):
        toks: list[int] = []

        def emit(kind, payload, i=i, toks=toks):
            if kind == "tokens":
                toks.extend(t.token for t in payload if t.token >= 0)
            else:
                results[i] = (toks, payload)

        engine.submit(Request(ids, params, emit))
    engine.run_until_done()
    return results


def speculation_cases(tok) -> list[tuple[list[int], SamplingParams]]:
    prompts = ["Obama is the man who is the man who is the man who is the man who",
               "red, green, blue, red, green, blue, red, green, blue, red,",
               "def add(a, b):\n    return a + b\n\ndef add(a, b):\n", "The capital of France is"]
    ids = [tok.encode(p) for p in prompts]
    return [(ids[0], SamplingParams(max_new_tokens=40, ignore_eos=True)),
            (ids[1], SamplingParams(max_new_tokens=33, ignore_eos=True)),
            (ids[2], SamplingParams(max_new_tokens=30, temperature=0.8, top_k=20, seed=7, ignore_eos=True)),
            (ids[0], SamplingParams(max_new_tokens=40, stop=["who is the man who is the man who is the man who is"],
                                    repetition_penalty=1.1)),
            (ids[3], SamplingParams(max_new_tokens=25))]


@pytest.mark.parametrize("source", ["default", "tiny-llama"])
@torch.inference_mode()
def test_lookup_speculation_answers_exactly_as_plain_decoding(default_gguf, tiny_checkpoints, source):
    """Prompt lookup in the batched step (drafts as extra entries of the request's own row) changes nothing but
    the number of steps: greedy, seeded sampling, stop strings, repetition penalty and max_tokens give the same
    tokens and finish reasons as the engine without it, and drafts were actually made and kept."""
    llm = edgellm.load(default_gguf) if source == "default" else edgellm.load(tiny_checkpoints["llama"], dtype="fp32")
    cases = speculation_cases(llm.tokenizer)
    plain = run_requests(Engine(llm.model, llm.tokenizer, parallel=3, ctx=128, max_queue=8), cases)
    for k in (None, 2):
        spec = Engine(llm.model, llm.tokenizer, parallel=3, ctx=128, max_queue=8, speculative="lookup", draft_k=k)
        assert (spec.native is not None) == (source == "default")
        assert run_requests(spec, cases) == plain
        counters = spec.metrics.counters
        # the random tiny model's drafts are mostly rejected, after which the adaptive length stops drafting
        assert counters["draft_tokens_accepted_total" if k or source == "default" else "draft_tokens_total"] > 0, \
            counters
        if source == "default":  # the copying prompts: most drafts are kept
            assert counters["draft_tokens_accepted_total"] > counters["draft_tokens_total"] / 2, counters
    assert [d["completion_tokens"] for _, d in plain[:3]] == [40, 33, 30]


def test_lookup_drafts_stay_inside_the_context_and_the_step(default_gguf):
    """A request that fills its row to the last slot ends with 'length' exactly there, and no step exceeds the
    entries that keep every product on the per-row kernel."""
    from edgellm.serve import engine as engine_mod

    llm = edgellm.load(default_gguf)
    ids = llm.tokenizer.encode("a b c d e f g a b c d e f g a b c d e f g a b c d")
    sizes: list[int] = []
    spec = Engine(llm.model, llm.tokenizer, parallel=2, ctx=48, max_queue=4, speculative="lookup", draft_k=16)
    step = spec.native.batch_step

    def counted(tokens, rows, pos):
        sizes.append(len(rows))
        assert max(pos) < spec.ctx
        return step(tokens, rows, pos)

    spec.native.batch_step = counted
    reqs = [(ids, SamplingParams(max_new_tokens=200, ignore_eos=True))] * 2
    (toks, done), (toks2, _) = run_requests(spec, reqs)
    # every position of the row was fed; the token sampled after the last one is the answer's last
    assert done["finish_reason"] == "length" and len(ids) + len(toks) == spec.ctx + 1 and toks2 == toks
    plain = Engine(llm.model, llm.tokenizer, parallel=2, ctx=48, max_queue=4)
    assert run_requests(plain, reqs)[0] == (toks, done)
    assert max(sizes) <= engine_mod.STEP_ENTRIES and max(sizes) > 2  # drafts were verified


def test_adaptive_draft_length_follows_acceptance_and_batch():
    """A drafted entry costs about a row: drafts get shorter as the batch grows and as acceptance falls; a full batch
    drafts only likely copies; one request drafts on the prior alone. The kept-draft statistics behind it."""
    from edgellm.speculative import K_MAX, DraftStats, draft_length

    assert draft_length(0.5, 0.5, 1) >= 1                  # the prior drafts when alone
    assert draft_length(0.5, 0.9, 8) == 0                  # first tokens kept half the time: not worth a row at 8
    assert draft_length(0.9, 0.9, 8) >= 2                  # likely copies: still drafted in a full batch
    assert draft_length(0.99, 0.999, 1) == K_MAX
    for a, b in [(0.5, 0.5), (0.6, 0.8), (0.8, 0.9), (0.95, 0.95)]:
        lengths = [draft_length(a, b, rows) for rows in (1, 2, 4, 8, 16, 31)]
        assert lengths == sorted(lengths, reverse=True), (a, b, lengths)
    for rows in (1, 4, 8):
        lengths = [draft_length(a, 0.9, rows) for a in (0.1, 0.5, 0.7, 0.9, 0.99)]
        assert lengths == sorted(lengths), (rows, lengths)

    stats = DraftStats()
    for drafted, kept in [(3, 3), (3, 0), (2, 1), (4, 2)]:
        stats.add(drafted, kept)
    # first tokens: 3 of 4 kept; later tokens tried after a kept one: 2 + 0 + 1 + 2 = 5, kept 2 + 0 + 0 + 1 = 3
    assert (stats.first_tried, stats.first_kept, stats.next_tried, stats.next_kept) == (4, 3, 5, 3)
    assert stats.rates((0.5, 0.5)) == ((3 + 2) / 8, (3 + 2) / 9)
    pooled = DraftStats()
    pooled.add(1, 1, decay=0.5)
    pooled.add(1, 0, decay=0.5)  # the older draft counts half
    assert (pooled.first_tried, pooled.first_kept) == (1.5, 0.5)


def test_engine_speculates_with_lookup_only(tiny_checkpoints):
    from edgellm.errors import InvalidArgumentError

    llm = edgellm.load(tiny_checkpoints["llama"], dtype="fp32")
    with pytest.raises(InvalidArgumentError, match="lookup"):
        Engine(llm.model, llm.tokenizer, parallel=2, ctx=64, max_queue=4, speculative="self")
    with pytest.raises(InvalidArgumentError, match="draft length"):
        Engine(llm.model, llm.tokenizer, parallel=2, ctx=64, max_queue=4, speculative="lookup", draft_k=0)


@torch.inference_mode()
def test_default_model_prompt_chunks_in_c_equal_decode_steps(default_gguf):
    """On AVX512-VNNI CPUs the engine prefills prompt chunks through the C verify step: each token's logits (and
    so its keys/values) are bit for bit what decoding the prompt one token at a time computes."""
    llm = edgellm.load(default_gguf)
    engine = Engine(llm.model, llm.tokenizer, parallel=2, ctx=128, max_queue=4)
    if engine.native is None or engine.native.prefill_rows() <= 40:
        pytest.skip("prompt chunks take the eager forward on this CPU path (dense GEMMs from 32 rows)")
    m = llm.model
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)[:40]
    m.use_caches([c.row(0) for c in engine.pool])
    chunked = engine.native.prefill(torch.tensor([ids]), 0)                  # (V,)
    m.use_caches(engine.pool)
    for p, t in enumerate(ids):                                               # row 1, one token a step
        stepped = engine.native.batch_step(torch.tensor([[t]]), [1], [p])[0]
    assert torch.equal(chunked, stepped)
    assert torch.equal(engine.pool[0].k[0, :, :40], engine.pool[0].k[1, :, :40])  # the same keys written
