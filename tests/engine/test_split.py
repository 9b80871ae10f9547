"""A model split at layer k across two processes gives the unsplit model's greedy tokens."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llmsql.engine import from_config, num_layers
from llmsql.engine.split import (
    ModelSource,
    SplitGenerator,
    SplitServer,
    decode,
    encode,
    model_identity,
)
from llmsql.errors import ConfigError
from tests.engine.conftest import llama_config

LAYERS = 3
PROMPTS = [[1, 5, 9, 33, 7, 41, 60], [1, 8, 8, 12], [1, 70, 3, 3, 3, 50]]
NEW = 8


def _greedy(model: Any, prompt: list[int], new: int) -> tuple[list[int], torch.Tensor]:
    """The unsplit model's greedy tokens, each from a full forward pass (no cache), and the
    logits that chose the last one."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(new):
            logits = model(input_ids=ids).logits[:, -1]
            token = int(logits.argmax(-1))
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out, logits[0]


@pytest.fixture(scope="module")
def tiny() -> tuple[ModelSource, Any]:
    # larger weights than the default: varied greedy tokens instead of one repeated token
    config = llama_config(num_hidden_layers=LAYERS, initializer_range=0.2)
    source = ModelSource(config=config, seed=0)
    return source, source.load()


@pytest.fixture(scope="module")
def server(tiny: tuple[ModelSource, Any]) -> Any:
    with SplitServer(tiny[0], idle_timeout=60.0, start_timeout=60.0) as s:
        yield s


@pytest.mark.parametrize("k", range(LAYERS + 1))
def test_every_split_point_gives_the_unsplit_tokens(tiny: Any, server: SplitServer,
                                                    k: int) -> None:
    """k = 0: only the embedding is local; k = N: only the head is on the server."""
    model = tiny[1]
    gen = SplitGenerator(model, k, server)
    for prompt in PROMPTS:
        result = gen.generate([prompt], NEW)
        want, logits = _greedy(model, prompt, NEW)
        assert result.tokens == [want]
        torch.testing.assert_close(result.logits[0], logits, rtol=0, atol=1e-5)
        hidden = model.config.hidden_size
        assert result.activation_bytes[0] == len(prompt) * hidden * 4  # the prefill
        assert result.bytes_per_token == hidden * 4  # one fp32 hidden state per token


def test_a_left_padded_batch_gives_each_prompt_its_own_tokens(tiny: Any,
                                                              server: SplitServer) -> None:
    model = tiny[1]
    result = SplitGenerator(model, 1, server).generate(PROMPTS, NEW)
    for i, prompt in enumerate(PROMPTS):
        want, logits = _greedy(model, prompt, NEW)
        assert result.tokens[i] == want
        torch.testing.assert_close(result.logits[i], logits, rtol=0, atol=1e-4)


def test_a_different_model_is_refused_and_the_process_exits(tiny: Any) -> None:
    source, model = tiny
    other = ModelSource(config=source.config, seed=1)
    with SplitServer(other, start_timeout=60.0) as s:
        with pytest.raises(ConfigError, match="not the client's"):
            SplitGenerator(model, 1, s)
        process = s.process
        assert process.is_alive()
    assert not process.is_alive()


def test_the_process_exits_when_the_client_disappears(tiny: Any) -> None:
    s = SplitServer(tiny[0], start_timeout=60.0).__enter__()
    s._conn.close()  # the client goes away without saying goodbye
    s.process.join(10.0)
    try:
        assert not s.process.is_alive()
        assert s.process.exitcode == 0
    finally:
        s._conn = None
        s.close()


PARENT = """
import os, sys
from llmsql.engine.split import ModelSource, SplitServer
from tests.engine.conftest import llama_config

if __name__ == "__main__":
    s = SplitServer(ModelSource(config=llama_config()), start_timeout=60.0).__enter__()
    print(s.process.pid, flush=True)
    os._exit(9)  # the client process dies without closing anything
"""


def test_the_process_exits_when_its_parent_dies(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          check=False)
    assert done.returncode == 9, done.stderr
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_a_split_point_outside_the_model_is_refused(tiny: Any, server: SplitServer) -> None:
    with pytest.raises(ConfigError, match="outside the model's 3 layers"):
        SplitGenerator(tiny[1], LAYERS + 1, server)


def test_frames_carry_dtype_shape_and_bytes() -> None:
    for t in (torch.randn(2, 3, 4), torch.randn(1, 5).to(torch.bfloat16)):
        header, back = decode(encode({"op": "forward"}, t))
        assert header["tensor"] == {"dtype": str(t.dtype)[6:], "shape": list(t.shape)}
        assert back is not None and back.dtype == t.dtype and torch.equal(back, t)
    assert decode(encode({"op": "close"})) == ({"op": "close"}, None)


def test_identity_tells_seeds_apart() -> None:
    a, b = (from_config(llama_config(), seed=s) for s in (0, 1))
    assert model_identity(a) == model_identity(from_config(llama_config(), seed=0))
    assert model_identity(a) != model_identity(b)


@pytest.mark.model
def test_smollm2_split_in_half_gives_the_unsplit_tokens() -> None:
    from llmsql.engine import load_tokenizer
    from llmsql.models import resolve_model

    source = ModelSource(path=str(resolve_model(None)), dtype="float32")
    model = source.load()
    prompt = load_tokenizer(source.path)("The capital of France is")["input_ids"]
    with SplitServer(source) as s:
        result = SplitGenerator(model, num_layers(model) // 2, s).generate([prompt], 5)
    want, logits = _greedy(model, prompt, 5)
    assert result.tokens == [want]
    torch.testing.assert_close(result.logits[0], logits, rtol=0, atol=1e-4)
