"""The openai backend against a real ``llmsql serve`` (the embedded model) on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import socket
from pathlib import Path

import pandas as pd
import pytest

import llmsql
from llmsql.backends import BackendSpec
from llmsql.backends.base import Request
from llmsql.backends.openai_compat import OpenAIBackend, Secret
from llmsql.errors import BackendError, CallFailed, ConfigError
from tests.llm_servers import (
    SERVER_KEY_ENV,
    SERVER_MAX_MODEL_LEN,
    ServeProcess,
    client_options,
    read_jsonl,
    shared_server,
)

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def server() -> ServeProcess:
    return shared_server()


def spec(server: ServeProcess, model: str | None = "smollm2", **opts: object) -> BackendSpec:
    client_options(server)  # puts the key in the environment variable
    return BackendSpec.make("openai", model, base_url=server.url, api_key_env=SERVER_KEY_ENV,
                            **opts)


def test_filter_and_map_through_the_server(server: ServeProcess, tmp_path: Path) -> None:
    df = pd.DataFrame({"city": ["Paris", "Lyon", "Tokyo", "Osaka", "Paris"]})
    with llmsql.connect(**client_options(server, cache=False)) as con:
        con.register("t", df)
        res = con.sql("SELECT city, LLM_FILTER('Is this city in France?', city) AS fr, "
                      "LLM('Name the country of this city in one word.', city, max_tokens => 4) "
                      "AS country FROM t ORDER BY city")
        backend = con.backend()
    out = res.df()
    assert out["fr"].notna().all() and out["country"].map(bool).all()
    filt = res.stats.calls[0]
    assert filt.sent == 4 and filt.prompt_tokens > 4 * 10  # usage read from the server
    assert backend.capabilities.constrained_choice  # llmsql serve advertises it
    assert backend.capabilities.max_model_len == SERVER_MAX_MODEL_LEN


def test_constrained_choices_and_cached_tokens_from_usage(server: ServeProcess) -> None:
    backend = OpenAIBackend(spec(server, concurrency=8))
    try:
        prompts = [f"Shared instruction that is long enough to share a prefix. Item {i}?"
                   for i in range(12)]
        out = backend.generate([Request(p, max_tokens=2, choices=("Alpha", "Beta"))
                                for p in prompts])
    finally:
        backend.close()
    assert {r.text for r in out} <= {"Alpha", "Beta"}
    assert all(r.error is None and r.prompt_tokens > 10 for r in out)
    assert sum(r.cached_tokens for r in out) > 0  # batched on the server, prefix reused


def test_model_is_picked_from_the_server_and_completions_endpoint(server: ServeProcess) -> None:
    backend = OpenAIBackend(spec(server, model=None, endpoint="completions"))
    try:
        assert backend.model == "smollm2"
        assert backend.model_id() == f"openai:{server.url}:smollm2"
        [r] = backend.generate([Request("Say hello.", max_tokens=3)])
        assert r.error is None and r.output_tokens >= 1
        assert backend.count_tokens("Say hello.") == r.prompt_tokens  # server's /tokenize
    finally:
        backend.close()


def test_key_comes_from_the_environment_and_never_leaks(server: ServeProcess,
                                                        tmp_path: Path) -> None:
    log = tmp_path / "client.jsonl"
    opts = client_options(server, log, cache=tmp_path / "c.sqlite")
    with llmsql.connect(**opts) as con:
        con.register("t", pd.DataFrame({"x": ["a"]}))
        con.sql("SELECT LLM_FILTER('Is this a vowel?', x) FROM t")
        assert server.key not in repr(con.spec())
    for path in (log, tmp_path / "c.sqlite", server.request_log, server.stderr_path):
        assert server.key.encode() not in path.read_bytes(), path
    # a wrong key: a clear error naming the variable, not the key
    env = "LLMSQL_TEST_WRONG_KEY"
    os.environ[env] = "wrong-" + server.key
    with pytest.raises(BackendError, match=f"\\${env}") as info:
        OpenAIBackend(BackendSpec.make("openai", "smollm2", base_url=server.url, api_key_env=env)
                      ).generate([Request("hi")])
    assert server.key not in str(info.value) and "wrong-" not in str(info.value)
    # a key given in code is hidden in the spec
    assert "sk-" not in repr(BackendSpec.make("openai", "m", api_key=Secret("sk-1")))


def test_wrong_model_url_and_dead_server_are_clear_errors(server: ServeProcess) -> None:
    backend = OpenAIBackend(spec(server, model="no-such-model", max_retries=0))
    try:
        with pytest.raises(BackendError, match="no-such-model"):
            backend.generate([Request("hi")])
    finally:
        backend.close()
    root = server.url.removesuffix("/v1")
    nowhere = OpenAIBackend(BackendSpec.make("openai", None, base_url=root,
                                             api_key_env=SERVER_KEY_ENV))
    try:
        with pytest.raises(ConfigError, match="found no models"):
            nowhere.capabilities  # noqa: B018 (the server's model list is read on first use)
    finally:
        nowhere.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{dead}/v1"
        named = OpenAIBackend(BackendSpec.make("openai", "m", base_url=url, max_retries=1,
                                               backoff=0.01))
        nameless = OpenAIBackend(BackendSpec.make("openai", None, base_url=url, max_retries=1,
                                                  backoff=0.01))
        try:
            # building contacts nothing; a named model's identity needs no server
            assert named.model_id() == f"openai:{url}:m"
            with pytest.raises(BackendError, match="cannot reach"):
                named.generate([Request("hi")])
            with pytest.raises(BackendError, match="cannot reach.*name it \\(--model NAME"):
                nameless.model_id()
        finally:
            named.close()
            nameless.close()
    with pytest.raises(ConfigError, match="base_url"):
        OpenAIBackend(BackendSpec.make("openai", "m"))
    with pytest.raises(ConfigError, match="concurrency"):
        OpenAIBackend(BackendSpec.make("openai", "m", base_url=server.url, concurrency=0))


def test_request_rate_limit(server: ServeProcess, tmp_path: Path) -> None:
    log = tmp_path / "client.jsonl"
    backend = OpenAIBackend(spec(server, rpm=240, concurrency=8, request_log=str(log)))
    try:
        backend.generate([Request(f"Count to {i}.", max_tokens=1) for i in range(10)])
    finally:
        backend.close()
    starts = sorted(e["started"] for e in read_jsonl(log))
    assert len(starts) == 10
    # a bucket of 4 requests refilled at 4 per second: the 10th starts >= 1.5 s after the 1st
    assert starts[-1] - starts[0] >= 1.5 - 0.05
    for i in range(len(starts) - 5):
        assert starts[i + 5] - starts[i] >= 0.25 - 0.05


def test_a_prompt_the_server_refuses_follows_the_error_policy(server: ServeProcess,
                                                              tmp_path: Path) -> None:
    """The client believes in a longer context than the server's: the server answers 400 for
    the long prompt (a per-request error, not retried), the short ones are answered."""
    df = pd.DataFrame({"doc": ["short one", "word " * 1500, "short two"]})
    opts = client_options(server, cache=tmp_path / "c.sqlite", max_model_len=100_000)
    sql = "SELECT doc, LLM_FILTER('Is this text short?', doc) AS s FROM t"
    with llmsql.connect(**opts) as con:
        con.register("t", df)
        con.sql("SET llmsql.on_error = 'fail'")
        with pytest.raises(CallFailed, match="max_model_len"):
            con.sql(sql)
        con.sql("SET llmsql.on_error = 'null'")
        res = con.sql(sql)
    out = res.df()
    long_row = out["doc"].str.len() > 1000
    assert out.loc[long_row, "s"].isna().all() and out.loc[~long_row, "s"].notna().all()
    [err] = con.last_errors()
    assert err.kind == "failed" and "HTTP 400" in err.reason and "max_model_len" in err.reason
    call = res.stats.calls[0]
    assert call.from_cache == 2 and call.sent == 1  # the 'fail' run's answers were kept


def test_the_server_batches_concurrent_requests_and_logs_each_answer(server: ServeProcess,
                                                                     tmp_path: Path) -> None:
    log = tmp_path / "client.jsonl"
    backend = OpenAIBackend(spec(server, concurrency=6, request_log=str(log)))
    try:
        backend.generate([Request(f"Repeat: {i}", max_tokens=2) for i in range(6)])
    finally:
        backend.close()
    ids = {e["attempt_id"] for e in read_jsonl(log)}
    served = [e for e in read_jsonl(server.request_log) if e["request_id"] in ids]
    assert len(served) == 6
    assert max(e["batch_size"] for e in served) > 1
    assert all(len(e["prompt_sha256"]) == 64 and "prompt" not in e for e in served)


def test_server_refuses_what_it_cannot_do(server: ServeProcess) -> None:
    def post(path: str, body: object, key: str | None = server.key) -> tuple[int, dict]:
        host, port = server.url.removeprefix("http://").split("/")[0].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request("POST", path, body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        out = resp.status, json.loads(resp.read())
        conn.close()
        return out

    chat = "/v1/chat/completions"
    one = [{"role": "user", "content": "hi"}]
    assert post(chat, {"model": "smollm2", "messages": one}, key=None)[0] == 401
    assert post(chat, {"model": "smollm2", "messages": one}, key="nope")[0] == 401
    assert post(chat, {"model": "gpt-9", "messages": one})[0] == 404
    assert post(chat, {"model": "smollm2", "messages": one, "stream": True})[0] == 400
    assert post(chat, {"model": "smollm2", "messages": one, "n": 2})[0] == 400
    sys_msg = [{"role": "system", "content": "x"}, *one]
    assert post(chat, {"model": "smollm2", "messages": sys_msg})[0] == 400
    status, body = post(chat, {"model": "smollm2", "messages": one,
                               "response_format": {"type": "json_schema", "json_schema": {}}})
    assert status == 400 and "response_format" in body["error"]["message"]
    # the embedded backend constrains to a JSON schema (outlines_core, in the local extra)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    status, body = post(chat, {"model": "smollm2", "messages": one, "max_tokens": 12,
                               "temperature": 0, "response_format": {
                                   "type": "json_schema", "json_schema": {"schema": schema}}})
    assert status == 200, body
    assert isinstance(json.loads(body["choices"][0]["message"]["content"])["n"], int)
    status, body = post(chat, {"model": "smollm2", "messages": one, "max_tokens": 2,
                               "temperature": 0, "guided_choice": ["Yes", "No"]})
    assert status == 200 and body["choices"][0]["message"]["content"] in ("Yes", "No")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + \
        body["usage"]["completion_tokens"]


def test_retry_delays_grow_and_honour_retry_after(server: ServeProcess) -> None:
    backend = OpenAIBackend(spec(server, backoff=0.5, max_backoff=4, max_retry_after=10))
    try:
        delays = [backend._delay(a, None) for a in range(6)]
        assert all(0.25 <= d <= 0.5 for d in delays[:1]) and all(d <= 4 for d in delays)
        assert delays[3] >= 2.0  # 0.5 * 2**3 = 4, equal jitter: at least half
        assert backend._delay(0, 7.0) == 7.0 and backend._delay(0, 60.0) == 10.0
    finally:
        backend.close()


def test_choice_probabilities_through_the_server(server: ServeProcess) -> None:
    """LLM_SCORE through ``llmsql serve``: the server answers ``logprobs`` for requests
    constrained to choices with the transformers backend's exact choice probabilities, and
    the openai backend reads them back (both endpoints) as the local backend gives them."""
    from llmsql.backends import get_backend

    prompts = ["Is Paris the capital of France? Answer Yes or No.",
               "Is the sun cold? Answer Yes or No."]
    reqs = [Request(p, max_tokens=2, choices=("Yes", "No"), choice_probs=True) for p in prompts]
    local = get_backend(BackendSpec.make("transformers", None, threads=1))
    try:
        expected = local.generate(reqs)
    finally:
        local.close()
    assert expected[0].choice_probs != expected[1].choice_probs
    for endpoint in ("chat", "completions"):
        backend = OpenAIBackend(spec(server, endpoint=endpoint))
        try:
            assert backend.capabilities.choice_probabilities  # llmsql serve says it can
            out = backend.generate([*reqs, Request(prompts[0], choices=("Yes", "No"))])
        finally:
            backend.close()
        assert out[-1].choice_probs is None  # not asked: no logprobs requested
        for got, want in zip(out, expected, strict=False):
            assert got.text == want.text and got.choice_probs is not None
            assert want.choice_probs is not None
            assert max(abs(a - b) for a, b in zip(got.choice_probs, want.choice_probs,
                                                  strict=True)) < 1e-4
    off = OpenAIBackend(spec(server, choice_probs=False))
    try:
        assert not off.capabilities.choice_probabilities
        assert off.generate(reqs[:1])[0].choice_probs is None
    finally:
        off.close()
    host, port = server.url.removeprefix("http://").split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/chat/completions", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {server.key}"},
        body=json.dumps({"model": "smollm2", "logprobs": True, "top_logprobs": 2,
                         "messages": [{"role": "user", "content": "hi"}]}))
    resp = conn.getresponse()
    status, body = resp.status, json.loads(resp.read())
    conn.close()
    assert status == 400 and "only for requests constrained to choices" in body["error"]["message"]
