"""`dynaexq serve`: per-row sampling, the batch slots, continuous batching under the runtime, and
the OpenAI-compatible API through the official `openai` client on localhost."""
import concurrent.futures
import json
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from dynaexq_jax.errors import GenerationError, PromptTooLongError, QueueFullError, RuntimeConfigError
from dynaexq_jax.runtime.budget import budget_for_fraction
from dynaexq_jax.runtime.config import EngineConfig
from dynaexq_jax.runtime.engine import Engine
from dynaexq_jax.server.app import create_app, serving_in_thread
from dynaexq_jax.server.batcher import Batcher, Request, _unsettled
from dynaexq_jax.serving.sampling import Sampling, _keep, sample, sample_rows
from tests.tiny_runtime import TINY

VOCAB, SLOTS, MAX_LEN, SEG = 512, 4, 128, 4
KEY = "test-key"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The runtime tests' tiny model with a tokenizer (the server takes text)."""
    from checkpoints_convert import convert
    from dynaexq_jax.experiments.synthetic import write_random_qwen3_moe
    from dynaexq_jax.serving.checkpoint import load_checkpoint
    tmp = tmp_path_factory.mktemp("serve")
    hf = write_random_qwen3_moe(tmp / "hf", seed=1, tokenizer=True, **{**TINY, "vocab_size": VOCAB})
    return load_checkpoint(convert(hf, tmp / "conv", lo="int4:g32", progress=False))


def engine(ckpt, policy="static", hi_fraction=0.5, slots=SLOTS, **settings):
    s = EngineConfig(**{**dict(policy=policy, batch=slots + 1, prefill_batch=1, max_len=MAX_LEN, segment_len=SEG,
                               prefill_chunk=32), **settings})
    fraction = {"all-hi": 1.0, "all-lo": 0.0}.get(policy, hi_fraction)
    return Engine(ckpt, budget_bytes=budget_for_fraction(ckpt, fraction, s), settings=s)


def prompts(n, seed=0, low=3, high=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, int(rng.integers(low, high))).tolist() for _ in range(n)]


def run(batcher, token_prompts, max_tokens=20, **options):
    """Submit requests side by side and wait for all of them."""
    left, done = [len(token_prompts)], threading.Event()
    lock = threading.Lock()

    def on_event(ev):
        if ev.kind in ("done", "error"):
            with lock:
                left[0] -= 1
                if not left[0]:
                    done.set()
    reqs = [Request(p, max_tokens, on_event, **options) for p in token_prompts]
    for r in reqs:
        batcher.submit(r)
    assert done.wait(120)
    return reqs


# ---- sampling per row -----------------------------------------------------------------------------
def _keep_reference(logits, k, p):
    """numpy: the top-k cut, then the nucleus among what is left."""
    out = logits.copy()
    if k:
        out[logits < np.sort(logits)[::-1][k - 1]] = -np.inf
    order = np.sort(out)[::-1]
    probs = np.exp(order - order.max())
    probs /= probs.sum()
    cut = order[min(int(np.sum(np.cumsum(probs) < p)), len(order) - 1)]
    out[out < cut] = -np.inf
    return out


@pytest.mark.parametrize("k,p", [(0, 1.0), (5, 1.0), (0, 0.5), (7, 0.8), (1, 0.3), (64, 0.999)])
def test_keep_matches_a_numpy_reference(k, p):
    logits = np.random.default_rng(k).normal(size=(3, 64)).astype(np.float32) * 3
    got = np.asarray(_keep(jnp.asarray(logits), k, p))
    for row, want in zip(got, logits):
        np.testing.assert_array_equal(np.isfinite(row), np.isfinite(_keep_reference(want, k, p)))


def test_sample_rows_each_row_its_own_setting_and_key():
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 50)) * 4
    keys = jnp.stack([jax.random.PRNGKey(s) for s in (1, 2, 3, 4)])
    temp, top_k, top_p = jnp.array([0.0, 1.0, 0.7, 1.0]), jnp.array([0, 0, 3, 1]), jnp.array([1.0, 0.9, 1.0, 1.0])
    tok = np.asarray(sample_rows(logits, keys, jnp.array([5, 5, 5, 5]), temp, top_k, top_p))
    argmax = np.asarray(jnp.argmax(logits, -1))
    assert tok[0] == argmax[0] and tok[3] == argmax[3]        # greedy, and top-k 1
    assert tok[2] in np.argsort(-np.asarray(logits[2]))[:3]     # within its top 3
    # A row's token depends on its own logits, key and index only, not on its neighbours.
    for i in range(4):
        alone = sample_rows(logits[i:i + 1], keys[i:i + 1], jnp.array([5]), temp[i:i + 1], top_k[i:i + 1],
                            top_p[i:i + 1])
        assert int(alone[0]) == tok[i]
    # One row with the same setting as sample's, drawn with the same folded key: the same token.
    folded = jax.random.fold_in(keys[1], 5)
    assert int(sample(logits[1:2], folded, Sampling(1.0, 0, 0.9))[0]) == tok[1]


def test_unsettled_holds_back_a_stop_prefix_and_a_partial_character():
    assert _unsettled("hello wor", ("world",)) == 3
    assert _unsettled("hello", ("xyz",)) == 0
    assert _unsettled("caf\ufffd", ()) == 1


# ---- continuous batching ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batcher(ckpt):
    b = Batcher(engine(ckpt), slots=SLOTS).start()
    yield b
    b.close()


def test_requests_alone_equal_requests_side_by_side_and_generate(ckpt, batcher):
    ps = prompts(10)
    alone = [run(batcher, [p])[0] for p in ps]
    together = run(batcher, ps)          # 10 requests through 4 slots: joins and leaves mid-stream
    assert [r.tokens for r in alone] == [r.tokens for r in together]
    assert all(r.finish_reason in ("stop", "length") for r in together)
    # The same greedy tokens as a static batch of the frozen assignment (Engine.generate, static policy).
    ref = engine(ckpt, prefill_batch=None).generate(ps[:SLOTS], max_new_tokens=20)
    for want, r in zip(ref.tokens, together):
        assert r.tokens == want[:len(r.tokens)]


def test_sampled_requests_follow_their_own_seed(batcher):
    ps = prompts(6, seed=3)
    options = dict(temperature=0.9, top_k=20, top_p=0.95, seed=7)
    alone = [run(batcher, [p], **options)[0].tokens for p in ps[:3]]
    together = [r.tokens for r in run(batcher, ps, **options)]
    assert together[:3] == alone
    assert len({tuple(t) for t in together}) > 1
    other_seed = run(batcher, ps[:1], **{**options, "seed": 8})[0].tokens
    assert other_seed != alone[0]


def test_stop_strings_end_a_request_without_reaching_its_text(batcher):
    full = run(batcher, prompts(1, seed=5), max_tokens=30)[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = run(batcher, prompts(1, seed=5), max_tokens=30, stop=(stop,))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]


def test_one_token_requests_and_the_length_limit(batcher):
    one = run(batcher, prompts(3, seed=6), max_tokens=1)
    assert all(len(r.tokens) == 1 for r in one)
    long = run(batcher, prompts(2, seed=6), max_tokens=9)
    assert all(len(r.tokens) == 9 and r.finish_reason == "length" for r in long if 0 not in r.tokens)


def test_bad_requests_and_a_full_queue(ckpt, batcher):
    with pytest.raises(PromptTooLongError, match="max_len=128"):
        batcher.submit(Request([1] * 100, 40, lambda ev: None))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        batcher.submit(Request([VOCAB + 3], 4, lambda ev: None))
    with pytest.raises(RuntimeConfigError, match="slots \\+ 1"):
        Batcher(engine(ckpt), slots=SLOTS + 1)
    small = Batcher(engine(ckpt, slots=1), slots=1, max_queue=1)     # not started: nothing drains the queue
    small.submit(Request([1, 2], 4, lambda ev: None))
    with pytest.raises(QueueFullError, match="max-queue 1"):
        small.submit(Request([1, 2], 4, lambda ev: None))


def test_a_cancelled_request_frees_its_slot(batcher):
    events = []
    r = Request(prompts(1, seed=9)[0], 100, events.append)
    batcher.submit(r)
    while not any(ev.kind == "text" for ev in events) and not r.finished:
        time.sleep(0.01)
    batcher.cancel(r)
    deadline = time.time() + 30
    while r in batcher.running and time.time() < deadline:
        time.sleep(0.01)
    assert r not in batcher.running and r.finish_reason == "cancelled"
    assert not any(ev.kind == "done" for ev in events)
    assert run(batcher, prompts(1), max_tokens=5)[0].finished      # the server goes on


def test_a_consumer_that_fails_ends_only_its_own_request(batcher, capfd):
    def broken(ev):
        raise RuntimeError("the consumer's loop is closed")
    r = Request(prompts(1, seed=4)[0], 50, broken)
    batcher.submit(r)
    deadline = time.time() + 30
    while r.finish_reason != "cancelled" and time.time() < deadline:
        time.sleep(0.01)
    assert r.finish_reason == "cancelled" and "loop is closed" in capfd.readouterr().err
    assert batcher.error is None and run(batcher, prompts(2), max_tokens=5)[0].finished


def test_dynaexq_under_a_budget_swaps_while_serving_and_nothing_recompiles(ckpt):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    e = engine(ckpt, policy="dynaexq", hi_fraction=0.25, update_period=8)
    b = Batcher(e, slots=SLOTS).start()
    warm = len(compiles)
    try:
        reqs = run(b, prompts(12, seed=11, high=MAX_LEN - 40), max_tokens=40)
        reqs += run(b, prompts(5, seed=12), max_tokens=30, temperature=0.8, top_k=9, top_p=0.9, stop=("ab",))
    finally:
        b.close()
    assert len(compiles) == warm, f"{len(compiles) - warm} compilations while serving"
    assert all(r.finish_reason in ("stop", "length") for r in reqs)
    assert e.counters.promotions > 0 and e.counters.device_stalls == 0
    assert e.counters.max_owned_bytes <= e.budget_for_owned
    assert 0 < b.stats()["hi_hit_rate"] < 1 and b.engine.steps_served == 0   # the clock is the server's steps


# ---- the HTTP API through the openai client ---------------------------------------------------------
@pytest.fixture(scope="module")
def server(batcher):
    app = create_app(batcher, model_name="tiny", api_key=KEY, request_timeout=60, max_body_bytes=20_000)
    with serving_in_thread(app) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_health_and_the_api_key(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(server + "/health").status_code == 200               # no key needed
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()


def test_completions_equal_the_batcher_and_streaming_equals_not(batcher, client):
    text = "the quick brown fox"
    ids = batcher.codec.encode(text)
    want = run(batcher, [ids], max_tokens=12)[0]
    res = client.completions.create(model="tiny", prompt=text, max_tokens=12, temperature=0)
    assert res.choices[0].text == want.text and res.choices[0].finish_reason == want.finish_reason
    assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == len(want.tokens)
    chunks = list(client.completions.create(model="tiny", prompt=text, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.tokens)
    # Token-id prompts and several prompts in one request: one choice each, in order.
    many = client.completions.create(model="tiny", prompt=[ids, batcher.codec.encode("hello")], max_tokens=6,
                                     temperature=0)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text.startswith(want.text[:3])


def test_chat_streaming_equals_not(batcher, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    res = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert res.choices[0].message.role == "assistant" and res.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == res.choices[0].message.content
    # The plain template (this checkpoint has no chat template): what /v1/completions gets for its text.
    prompt = "system: be brief\nuser: hello there\nassistant:"
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert plain.choices[0].text == res.choices[0].message.content


def test_24_concurrent_requests_equal_the_same_requests_alone(batcher, client):
    texts = [f"request number {i}: " + "abc def " * (i % 5) for i in range(24)]

    def ask(t):
        return client.completions.create(model="tiny", prompt=t, max_tokens=16, temperature=0).choices[0].text
    alone = [ask(t) for t in texts]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        together = list(pool.map(ask, texts))
    assert together == alone


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "echo": True}, 400, "echo"),
    ({"model": "tiny", "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "x", "frequency_penalty": 0.5}, 400, "penalties"),
    ({"model": "tiny", "prompt": "x", "bogus": 1}, 400, "bogus"),
    ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "prompt": "x " * 200}, 400, "max_len=128"),
    ({"model": "tiny", "prompt": [VOCAB + 1]}, 400, "vocabulary"),
    ({"model": "tiny"}, 400, "prompt"),
])
def test_bad_requests_get_openai_errors(server, body, status, needle):
    r = httpx.post(server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]


def test_malformed_oversized_and_unknown_requests(server, client):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server + "/v1/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/completions", content=json.dumps({"model": "tiny", "prompt": "x" * 30_000}),
                   headers=auth)
    assert r.status_code == 413
    r = httpx.post(server + "/v1/chat/completions", json={"model": "tiny", "messages": []}, headers=auth)
    assert r.status_code == 400
    r = httpx.post(server + "/v1/chat/completions", headers=auth,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                         "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    assert httpx.get(server + "/v1/nothing", headers=auth).status_code == 404
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert client.completions.create(model="tiny", prompt="still serving", max_tokens=2).choices   # and it goes on


def test_a_client_that_disconnects_frees_its_slot(server, batcher):
    before = batcher.counters.requests["cancelled"]
    body = {"model": "tiny", "prompt": "a long one", "max_tokens": 100, "stream": True, "temperature": 0,
            "stop": ["\u2603"]}
    with httpx.stream("POST", server + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        next(r.iter_lines())
    deadline = time.time() + 30
    while batcher.counters.requests["cancelled"] == before and time.time() < deadline:
        time.sleep(0.05)
    assert batcher.counters.requests["cancelled"] == before + 1
    while any(batcher.running) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(batcher.running)


def test_metrics_report_requests_tokens_and_the_runtime(server, client):
    client.completions.create(model="tiny", prompt="count me", max_tokens=4)
    auth = {"Authorization": f"Bearer {KEY}"}
    text = httpx.get(server + "/metrics", headers=auth).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    for name in ("prompt_tokens_total", "generation_tokens_total", "generation_tokens_per_second", "queue_depth",
                 "batch_occupancy", "hi_hit_rate", "promotions_total", "bytes_moved_total", "device_stalls_total",
                 "device_owned_bytes", "budget_bytes"):
        assert f"dynaexq_{name}" in values, name
    assert values["dynaexq_prompt_tokens_total"] > 0 and values["dynaexq_batch_slots"] == SLOTS
    assert values['dynaexq_requests_total{finish_reason="length"}'] >= 1
    assert values["dynaexq_device_owned_bytes"] <= values["dynaexq_budget_bytes"]
    assert httpx.get(server + "/metrics").status_code == 401


def test_overload_gets_429_and_shutdown_503(ckpt):
    b = Batcher(engine(ckpt, slots=1), slots=1, max_queue=1)       # not started: the queue never drains
    b.queue.append(Request([1], 4, lambda ev: None))
    with serving_in_thread(create_app(b, model_name="tiny")) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        b._closing = True
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 503



def test_a_request_past_its_timeout_and_a_client_that_leaves_while_queued(ckpt):
    b = Batcher(engine(ckpt, slots=1), slots=1, max_queue=4)       # not started: requests stay queued
    with serving_in_thread(create_app(b, model_name="tiny", request_timeout=0.5)) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 504 and "0.5 s" in r.json()["error"]["message"]
        assert not b.queue                                          # and it left the queue
        with serving_in_thread(create_app(b, model_name="tiny", request_timeout=60)) as url2:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url2 + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=0.3)
            deadline = time.time() + 10
            while b.queue and time.time() < deadline:
                time.sleep(0.05)
            assert not b.queue


def test_chat_through_the_checkpoints_template(batcher, client):
    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    batcher.codec.__dict__["chat_template"] = template
    try:
        res = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=8, temperature=0)
        ids = batcher.codec.encode("<|user|>hi\n<|assistant|>", add_special_tokens=False)
        want = run(batcher, [ids], max_tokens=8)[0]
        assert res.choices[0].message.content == want.text
        assert res.usage.prompt_tokens == len(ids)
    finally:
        del batcher.codec.__dict__["chat_template"]


def test_dynaexq_serve_from_the_command_line_with_a_key_from_the_environment(ckpt):
    """The CLI as a user starts it: a converted checkpoint under a budget, the key from
    $DYNAEXQ_API_KEY, the openai client against it, then stopped by a signal."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dynaexq_jax.cli", "serve", str(ckpt.path), "--port", str(port),
                             "--budget", "30%", "--max-batch", "2", "--max-len", "96", "--prefill-chunk", "32",
                             "--segment", "4"], env={**os.environ, "DYNAEXQ_API_KEY": "from-env"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="from-env", max_retries=0, timeout=60)
        name = client.models.list().data[0].id
        assert name == ckpt.path.name
        res = client.completions.create(model=name, prompt="hello", max_tokens=5, temperature=0)
        assert res.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    assert "serving" in out and "policy dynaexq" in out and "API key required" in out, out


def _family_configs():
    from tests.hf_deepseek import TINY_DEEPSEEK
    from tests.hf_gpt_oss import TINY_GPT_OSS
    from tests.hf_mixtral import TINY_MIXTRAL
    from tests.hf_models import TINY_QWEN3_NEXT
    return {
        "qwen3_next": dict(model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"], rope_theta=10000.0,
                           eos_token_id=0, full_attention_interval=2, decoder_sparse_step=1, **TINY_QWEN3_NEXT),
        "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], rope_theta=10000.0,
                        eos_token_id=0, sliding_window=8, **TINY_MIXTRAL),
        "deepseek_v3": dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], rope_theta=10000.0,
                            eos_token_id=0, q_lora_rank=24, **TINY_DEEPSEEK),
        "gpt_oss": dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], **TINY_GPT_OSS),
    }


@pytest.mark.parametrize("name", ["qwen3_next", "mixtral", "deepseek_v3", "gpt_oss"])
def test_every_cache_layout_serves_as_generate_does(tmp_path, name):
    """Slots work for each family's cache (recurrent state, sliding windows, the MLA latent cache,
    attention sinks): requests side by side give each prompt's tokens generated alone."""
    import dynaexq_jax
    from checkpoints_convert import convert
    from dynaexq_jax.experiments.synthetic import write_random_checkpoint
    from dynaexq_jax.serving.checkpoint import load_checkpoint
    config = {**_family_configs()[name], "vocab_size": VOCAB}
    hf = write_random_checkpoint(tmp_path / "hf", config, seed=4, tokenizer=True)
    path = convert(hf, tmp_path / "conv", lo="int4:g16", progress=False)
    ps = prompts(5, seed=21, high=30)
    b = Batcher(engine(load_checkpoint(path), policy="all-hi", slots=3), slots=3).start()
    try:
        served = [r.tokens for r in run(b, ps, max_tokens=10)]
    finally:
        b.close()
    model = dynaexq_jax.load(path)
    for p, got in zip(ps, served):
        want = model.generate([p], max_new_tokens=10, max_len=MAX_LEN).tokens[0]
        assert got == want
