"""`edgellm serve` as a real process on a free loopback port, driven by the `openai` package and raw HTTP.

One server (the default model, 4 rows) serves the whole module; the load and fuzz tests are bounded in count
and time and talk to 127.0.0.1 only."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

KEY = "test-key"
CTX = 512
PARALLEL = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | str | dict | None = None, key: str | None = KEY,
            headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    if isinstance(body, dict):
        body = json.dumps(body)
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def start_server(*flags: str):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", "--port", str(port), "--api-key", KEY,
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    statuses = set()
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read().decode()[-2000:]}")
            try:
                status, _, _ = request(port, "GET", "/health", key=None, timeout=2)
                statuses.add(status)
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("server did not become healthy in 180 s")
        yield {"port": port, "pid": proc.pid, "health_statuses": statuses}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server():
    yield from start_server("--parallel", str(PARALLEL), "--ctx-size", str(CTX), "--max-body", "65536")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def chat_stream(client, model_id, messages, **kw) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model=model_id, messages=messages, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


def test_health_models_and_metrics(server, client, model_id):
    assert 200 in server["health_statuses"]
    assert model_id.startswith("SmolLM2-135M-Instruct")
    status, headers, body = request(server["port"], "GET", "/metrics")
    assert status == 200 and "edgellm_requests_running" in body.decode()
    assert "edgellm_time_to_first_token_seconds_bucket" in body.decode()


def test_chat_stream_equals_non_stream_and_usage_only_when_asked(client, model_id):
    full = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 0
    streamed, chunks = chat_stream(client, model_id, MESSAGES, temperature=0, max_tokens=40)
    assert streamed == text
    assert all(c.usage is None for c in chunks)
    streamed, chunks = chat_stream(client, model_id, MESSAGES, temperature=0, max_tokens=40,
                                   stream_options={"include_usage": True})
    assert streamed == text
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1] and not chunks[-1].choices
    assert with_usage[0].usage.completion_tokens == full.usage.completion_tokens


def test_completions_stream_equals_non_stream_and_finish_reasons(client, model_id):
    prompt = "The three primary colours are"
    full = client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=12)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    chunks = list(client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=12,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    short = client.chat.completions.create(model=model_id, temperature=0, max_tokens=200,
                                           messages=[{"role": "user", "content": "Say hi."}])
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 200


def test_n_choices_and_seed(client, model_id):
    kw = dict(model=model_id, messages=MESSAGES, temperature=1.0, max_tokens=16, seed=1234)
    a = client.chat.completions.create(n=2, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    b = client.chat.completions.create(n=2, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # two samples, not one twice
    c = client.chat.completions.create(**{**kw, "seed": 99})
    d = client.chat.completions.create(**{**kw, "seed": 99})
    assert c.choices[0].message.content == d.choices[0].message.content


def test_stop_strings_while_streaming(client, model_id):
    full = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    words = text.split()
    stop = " " + words[len(words) // 2]  # a word from the middle of the greedy answer
    cut = text.index(stop)
    streamed, chunks = chat_stream(client, model_id, MESSAGES, temperature=0, max_tokens=40, stop=[stop, "@@@"])
    assert streamed == text[:cut]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    plain = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_tokens=40,
                                           stop=stop)
    assert plain.choices[0].message.content == text[:cut] and plain.choices[0].finish_reason == "stop"


def test_logprobs_join_to_the_content(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_tokens=20,
                                       logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)  # greedy picks the top token
    c = client.completions.create(model=model_id, prompt="Once upon a time", temperature=0, max_tokens=10,
                                  logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and all(x <= 0 for x in lp.token_logprobs)


def test_json_schema_output_validates(client, model_id):
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colours"],
              "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                             "colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                         "maxItems": 3}}}
    r = client.chat.completions.create(
        model=model_id, temperature=0, max_tokens=80,
        messages=[{"role": "user", "content": "Describe a person as JSON with name, age and favourite colours."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"name", "age", "colours"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 20 and isinstance(obj["age"], int)
    assert all(c in ("red", "green", "blue") for c in obj["colours"]) and len(obj["colours"]) <= 3
    r = client.chat.completions.create(
        model=model_id, temperature=0, max_tokens=60, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Return a JSON object with keys city and country for Paris."}])
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_embeddings_float_and_base64_equal(server, client, model_id):
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock prices fell sharply."]
    f = client.embeddings.create(model=model_id, input=texts, encoding_format="float")
    status, _, body = request(server["port"], "POST", "/v1/embeddings",
                              {"model": model_id, "input": texts, "encoding_format": "base64"})
    assert status == 200
    b64 = json.loads(body)["data"]
    import numpy as np

    for a, b in zip(f.data, b64, strict=True):
        got = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert got.tolist() == a.embedding
        assert abs(float(np.linalg.norm(got)) - 1) < 1e-4
    e = [np.array(d.embedding) for d in f.data]
    assert e[0] @ e[1] > e[0] @ e[2]  # the paraphrase is closer than the unrelated sentence
    assert f.usage.prompt_tokens > 0


def test_prefix_reuse_reports_cached_tokens_and_changes_nothing(client, model_id):
    system = ("You are a helpful assistant for the Acme Corporation. " * 12).strip()
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Who do you work for?"}]
    a = client.chat.completions.create(model=model_id, messages=msgs, temperature=0, max_tokens=16)
    b = client.chat.completions.create(model=model_id, messages=msgs, temperature=0, max_tokens=16)
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage.prompt_tokens_details.cached_tokens >= 64
    follow = msgs + [{"role": "assistant", "content": a.choices[0].message.content},
                     {"role": "user", "content": "And where is it?"}]
    c = client.chat.completions.create(model=model_id, messages=follow, temperature=0, max_tokens=8)
    assert c.usage.prompt_tokens_details.cached_tokens >= 64


def test_errors_are_openai_shaped(server, client, model_id):
    port = server["port"]

    def check(status, body, code=None):
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if code:
            assert err["code"] == code
        return err

    for bad in ({"temperature": -1}, {"temperature": "hot"}, {"max_tokens": 0}, {"top_p": 2}, {"n": 0},
                {"messages": []}, {"messages": "hi"}, {"logit_bias": {"x": 1}}, {"seed": 1.5},
                {"tools": [{"type": "function", "function": {"name": "f"}}]},
                {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}):
        s, _, b = request(port, "POST", "/v1/chat/completions", {"model": model_id, "messages": MESSAGES, **bad})
        assert s == 400, bad
        check(s, b)
    s, _, b = request(port, "POST", "/v1/completions", {"model": model_id, "prompt": "word " * 600,
                                                         "max_tokens": 10})
    err = check(s, b, "context_length_exceeded")
    assert s == 400 and "601" in err["message"] and "10" in err["message"] and str(CTX) in err["message"]
    # the context check comes before any SSE byte
    s, h, b = request(port, "POST", "/v1/completions", {"model": model_id, "prompt": "hi", "max_tokens": CTX,
                                                         "stream": True})
    assert s == 400 and h["content-type"].startswith("application/json")
    s, _, b = request(port, "GET", "/v1/models", key="wrong")
    assert s == 401 and check(s, b, "invalid_api_key")
    s, _, b = request(port, "GET", "/v1/models", key=None)
    assert s == 401
    s, _, _ = request(port, "GET", "/health", key=None)
    assert s == 200
    s, _, b = request(port, "GET", "/v1/nothing-here")
    assert s == 404 and check(s, b)
    s, _, b = request(port, "POST", "/v1/chat/completions", {"model": "gpt-17", "messages": MESSAGES})
    assert s == 404 and check(s, b, "model_not_found")
    s, _, b = request(port, "POST", "/v1/completions", {"model": model_id, "prompt": "x" * 70000})
    assert s == 413 and check(s, b)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=5)


def test_cancelled_stream_frees_its_row(server, client, model_id):
    stream = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_tokens=400,
                                            stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.time() + 10
    while time.time() < deadline:
        _, _, body = request(server["port"], "GET", "/metrics")
        text = body.decode()
        if "edgellm_requests_running 0" in text and 'reason="cancelled"' in text:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the cancelled request still runs")


def prompts_for_load(n: int) -> list[str]:
    topics = ["the sea", "a mountain", "coffee", "trains", "the moon", "a library", "winter", "a robot"]
    return [f"Write one sentence about {topics[i % len(topics)]} and the number {i}." for i in range(n)]


def test_32_concurrent_streaming_clients_get_the_answers_served_alone(client, model_id):
    prompts = prompts_for_load(64)
    kw = dict(temperature=0, max_tokens=12)

    def alone(p):
        r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": p}], **kw)
        return r.choices[0].message.content

    def streaming_client(i):
        out = []
        for p in (prompts[2 * i], prompts[2 * i + 1]):
            text, chunks = chat_stream(client, model_id, [{"role": "user", "content": p}], **kw)
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
            out.append(text)
        return out

    reference = [alone(p) for p in prompts]
    t0 = time.time()
    with cf.ThreadPoolExecutor(32) as ex:
        results = list(ex.map(streaming_client, range(32)))
    assert time.time() - t0 < 300
    got = [t for pair in results for t in pair]
    assert got == reference


def fuzz_bodies(rng: random.Random, model_id: str) -> list[tuple[str, bytes]]:
    weird = [None, True, -1, 0, 10**30, -(10**30), 1e308, "x", "", [], {}, [1, "a"], {"a": {"b": []}}, "\u0000",
             "NaN", 3.5, [[[]]], "🙂" * 50]
    base_chat = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    base_comp = {"model": model_id, "prompt": "hi", "max_tokens": 1}
    base_emb = {"model": model_id, "input": "hi"}
    out = []
    paths = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize", "/detokenize"]
    for _ in range(1000):
        path = rng.choice(paths)
        base = {"/v1/chat/completions": base_chat, "/v1/completions": base_comp}.get(path, base_emb)
        if path == "/tokenize":
            base = {"content": "hi"}
        if path == "/detokenize":
            base = {"tokens": [1, 2]}
        body = json.loads(json.dumps(base))
        kind = rng.randrange(6)
        if kind == 0:  # a field of the wrong type or size
            body[rng.choice([*body, "temperature", "top_p", "n", "stop", "seed", "logit_bias", "response_format",
                             "stream_options", "top_logprobs", "logprobs"])] = rng.choice(weird)
        elif kind == 1:  # a missing field
            body.pop(rng.choice(list(body)), None)
        elif kind == 2:  # nested junk in messages / prompt / input
            key = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}.get(path, "input")
            body[key] = rng.choice([[{"role": rng.choice(weird)}], [{"content": rng.choice(weird)}],
                                    [rng.choice(weird)], [[-5]], [10**12], rng.choice(weird)])
        raw = json.dumps(body).encode()
        if kind == 3:  # invalid UTF-8 / truncated JSON / not JSON
            raw = rng.choice([raw[: rng.randrange(1, len(raw))], b"\xff\xfe" + raw, raw.replace(b"hi", b"\xc3("),
                              b"[]", b"null", b"1e999999", b"{" * 5000])
        elif kind == 4:  # oversize body
            raw = b'{"prompt": "' + b"a" * 70000 + b'"}'
        out.append((path, raw))
    return out


def test_fuzzed_requests_never_give_5xx(server, client, model_id):
    rng = random.Random(7)
    statuses: dict[int, int] = {}
    t0 = time.time()
    for path, raw in fuzz_bodies(rng, model_id):
        s, _, _ = request(server["port"], "POST", path, raw)
        statuses[s] = statuses.get(s, 0) + 1
        assert s < 500, (path, raw[:200], s)
        assert time.time() - t0 < 240
    assert sum(statuses.values()) == 1000 and statuses.get(400, 0) > 300
    r = client.chat.completions.create(model=model_id, messages=MESSAGES, temperature=0, max_tokens=5)
    assert r.choices[0].message.content


def test_no_memory_growth_over_1000_requests(server, model_id):
    port = server["port"]

    def burst(n):
        for i in range(n):
            s, _, _ = request(port, "POST", "/v1/completions",
                              {"model": model_id, "prompt": f"Count {i}:", "max_tokens": 2, "temperature": 0})
            assert s == 200

    burst(100)
    after_100 = rss_kb(server["pid"])
    burst(900)
    after_1000 = rss_kb(server["pid"])
    assert after_1000 <= after_100 * 1.10, (after_100, after_1000)


def test_a_full_queue_answers_503_with_retry_after():
    """One row, no queue: while a long answer streams, the next request is turned away (and the server lives)."""
    for srv in start_server("--parallel", "1", "--max-queue", "0", "--ctx-size", "512"):
        port = srv["port"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        model = client.models.list().data[0].id
        stream = client.completions.create(model=model, prompt="Once upon a time", max_tokens=400, temperature=0,
                                           stream=True)
        next(iter(stream))  # the row is taken
        s, headers, body = request(port, "POST", "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2})
        assert s == 503 and int(headers["retry-after"]) >= 1 and json.loads(body)["error"]["code"] == "queue_full"
        stream.close()
        deadline = time.time() + 10
        while (s := request(port, "POST", "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2})[0]) \
                == 503 and time.time() < deadline:
            time.sleep(0.1)
        assert s == 200


def test_a_speculating_server_answers_as_the_plain_one(client, model_id):
    """`--speculative lookup`: the same completions as the module's plain server, streamed and not, greedy and
    seeded, several at once; /metrics counts drafted and kept tokens."""
    prompts = ["Obama is the man who is the man who is the man who is the man who",
               "red, green, blue, red, green, blue, red, green, blue, red,", "Once upon a time"]
    kw = [dict(temperature=0), dict(temperature=0.9, seed=5), dict(temperature=0)]

    def answers(c) -> list[str]:
        with cf.ThreadPoolExecutor(3) as pool:
            full = list(pool.map(lambda a: c.completions.create(model=model_id, prompt=a[0], max_tokens=48, **a[1])
                                 .choices[0].text, zip(prompts, kw, strict=True)))
        streamed = ["".join(ch.choices[0].text for ch in c.completions.create(
            model=model_id, prompt=p, max_tokens=48, stream=True, **k) if ch.choices) for p, k in zip(prompts, kw,
                                                                                                    strict=True)]
        return full + streamed

    plain = answers(client)
    for srv in start_server("--parallel", "3", "--ctx-size", str(CTX), "--speculative", "lookup"):
        spec = openai.OpenAI(base_url=f"http://127.0.0.1:{srv['port']}/v1", api_key=KEY, max_retries=0, timeout=120)
        assert answers(spec) == plain
        metrics = request(srv["port"], "GET", "/metrics")[2].decode()
        kept = int(next(line.split()[1] for line in metrics.splitlines()
                        if line.startswith("edgellm_draft_tokens_accepted_total ")))
        assert kept > 20, metrics
