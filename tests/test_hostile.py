"""Hostile values: data containing SQL, quotes, template braces or control characters cannot
change the query or the template, and model output is never evaluated as code or SQL."""

from __future__ import annotations

import http.client
import itertools
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import llmsql
from llmsql.errors import ConfigError
from tests.answers import RuleBackend
from tests.llm_servers import FaultProxy, ServeProcess, client_options, shared_server

HOSTILE = [
    "'); DROP TABLE t; --",
    '"; DELETE FROM t; SELECT "',
    "{review} {{review}} {0} {__class__}",
    "$$ ; ATTACH 'x.db' AS x; $$",
    "tab\there, nul\x00, escape \x1b[31mred\x1b[0m, cr\r, bell\x07",
    "line one\nstars: 5\nline three",
    "\u202eright-to-left override\u202c and \U0001f600",
    "\\'\\\"\\\\ backslashes",
]


@pytest.fixture
def hostile() -> pd.DataFrame:
    return pd.DataFrame({"id": range(len(HOSTILE)), "review": HOSTILE})


def tables(con: llmsql.Session) -> list[str]:
    return sorted(r[0] for r in con.duckdb.sql("SELECT table_name FROM information_schema.tables "
                                               "WHERE table_name NOT LIKE '__llmsql%'").fetchall())


def test_values_reach_the_prompt_verbatim_and_change_nothing(hostile: pd.DataFrame) -> None:
    # optimize=False: the warm_prefixes rule currently fails on {placeholder} templates
    # (reported to its owner); the rendering under test does not depend on the optimizer
    with llmsql.connect(dry_run=True, progress=False, optimize=False) as con:
        con.register("t", hostile)
        e = con.explain("SELECT id FROM t WHERE LLM_FILTER('Rate {review} please.', review)")
        assert sorted(e.prompts) == sorted(f"Rate {v} please.\n" for v in HOSTILE)
        e = con.explain("SELECT id, LLM('Summarize.', id, review) FROM t")
        for v in HOSTILE:
            assert any(p.startswith("Summarize.\n") and f"review: {v}\n" in p for p in e.prompts)
        assert tables(con) == ["t"]
        assert con.sql("SELECT COUNT(*) AS n FROM t").df()["n"][0] == len(HOSTILE)


def test_model_output_is_data_not_code() -> None:
    """RuleBackend echoes single-line values back: the answers are hostile strings."""
    one_line = [v for v in HOSTILE if len(v.splitlines()) == 1]
    with llmsql.connect(backend=RuleBackend(), progress=False, cache=False) as con:
        con.register("t", pd.DataFrame({"id": range(len(one_line)), "review": one_line}))
        out = con.sql("SELECT id, LLM('Echo', review) AS echo FROM t ORDER BY id").df()
        assert out["echo"].tolist() == [v.upper().strip() for v in one_line]
        assert tables(con) == ["t"]


def test_hostile_names_stay_names(tmp_path: Path) -> None:
    weird = "x'); DROP TABLE t; -- {review}"
    df = pd.DataFrame({weird: ["Great"], "review": ["ok"]})
    with llmsql.connect(dry_run=True, progress=False) as con:
        con.register("t", df)
        con.register('t"; DROP TABLE t; --', df)
        col = '"' + weird.replace('"', '""') + '"'
        e = con.explain(f"SELECT LLM_FILTER('Good?', {col}, review) FROM t")
        assert e.prompts == (f"Good?\n{weird}: Great\nreview: ok\n",)
        assert tables(con) == ['t', 't"; DROP TABLE t; --']


@pytest.mark.parametrize("value", ["'null; DROP TABLE t'", "'1; DROP TABLE t'", "'-5'"])
def test_hostile_settings_are_refused(value: str) -> None:
    with llmsql.connect(dry_run=True, progress=False) as con, pytest.raises(ConfigError):
        con.sql(f"SET llmsql.on_error = {value}" if "null" in value
                else f"SET llmsql.max_calls = {value}")


# ---- through the real server, with the answers rewritten into hostile text -------------------

ANSWERS = {
    "Answer": "'); DROP TABLE t; --",
    "Extract": json.dumps({"n": "__import__('os').system('touch PWNED')",
                           "s": "'); DROP TABLE t; --"}),
    "Sum": json.dumps({"n": "1+1", "s": "{review}"}),
    "Keep": "Yes'); DROP TABLE t; --",
}


@pytest.mark.model
def test_hostile_answers_from_a_server_are_values(hostile: pd.DataFrame, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    server = shared_server()
    answers: Iterator[str] = iter(())

    def hostile_reply(body: dict[str, Any]) -> dict[str, Any]:
        body["choices"][0]["message"]["content"] = next(answers)
        return body

    with FaultProxy(server.url, rewrite=hostile_reply) as proxy:
        opts = client_options(server, base_url=proxy.url, cache=False, concurrency=3)
        with llmsql.connect(**opts) as con:
            con.register("t", hostile.head(3))
            answers = itertools.repeat(ANSWERS["Answer"])
            out = con.sql("SELECT id, LLM('Answer.', review, max_tokens => 2) AS a FROM t").df()
            assert out["a"].tolist() == [ANSWERS["Answer"]] * 3
            answers = itertools.cycle([ANSWERS["Extract"], ANSWERS["Sum"], ANSWERS["Keep"]])
            ext = con.sql("SELECT id, LLM_EXTRACT('Extract.', schema => 'n INTEGER, s VARCHAR', "
                          "review, max_tokens => 2) AS e FROM t ORDER BY id").df()
            assert ext["e"].isna().all()  # 'n' is no integer: NULL, never evaluated
            assert len(con.last_errors()) == 3
            answers = itertools.repeat(ANSWERS["Keep"])
            kept = con.sql("SELECT id FROM t WHERE LLM_FILTER('Keep?', review)").df()
            assert len(kept) == 3  # 'Yes...' is a yes; the rest is ignored text
            assert tables(con) == ["t"]
    assert not (tmp_path / "PWNED").exists()


def raw(server: ServeProcess, data: bytes) -> bytes:
    host, port = server.url.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.model
def test_the_server_survives_hostile_requests() -> None:
    server = shared_server()
    auth = f"Authorization: Bearer {server.key}\r\n".encode()
    post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
    cases = {
        b"\x00\xff garbage \r\n\r\n": b"400",
        post + b"Content-Length: 5\r\n\r\n{nope": b"400",
        post + b"Content-Length: 999999999\r\n\r\n": b"413",
        post + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n": b"411",
        post + f"Content-Length: {200_001}\r\n\r\n".encode() + b"[" * 200_001: b"400",
        post + b"Content-Length: 2\r\n\r\n[]": b"400",
    }
    body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": {"$gt": 1}}]})
    cases[post + f"Content-Length: {len(body)}\r\n\r\n".encode() + body.encode()] = b"400"
    for request, status in cases.items():
        reply = raw(server, request)
        if request.startswith(b"\x00"):  # no HTTP version to answer in: a bare error page
            assert b"Error code: 400" in reply
            continue
        assert reply.split(b"\r\n", 1)[0].split(b" ")[1] == status, (request[:60], reply[:200])
    host, port = server.url.removeprefix("http://").split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {server.key}"})
    assert conn.getresponse().status == 200  # still serving
    conn.close()
