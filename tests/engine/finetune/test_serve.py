"""AdapterBank (issue 16): several PEFT LoRA adapters on one tiny random Llama, switched per
run; base outputs bit-identical; PEFT files written atomically and read back by plain PEFT."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from llmsql.engine import from_config
from llmsql.errors import ConfigError, ExecutionError
from tests.engine.conftest import llama_config

pytest.importorskip("peft")

from llmsql.engine.finetune.serve import (  # noqa: E402 -- after the skip: needs peft
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterBank,
    check_targets,
    file_digest,
    linear_names,
    save_adapter,
)

IDS = torch.tensor([[5, 9, 13, 2, 40, 41, 7]])


def _model() -> Any:
    return from_config(llama_config(), seed=0)


def _logits(model: Any) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


def _randomize(params: list[torch.nn.Parameter], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _trained(bank: AdapterBank, name: str, seed: int, targets: tuple[str, ...] = ("q_proj", "v_proj"),
             ) -> list[torch.nn.Parameter]:
    params = bank.add_trainable(name, rank=4, alpha=8, target_modules=targets, seed=seed)
    _randomize(params, seed)
    return params


def test_switching_adapters_and_the_base_model_bit_exactly() -> None:
    model = _model()
    base = _logits(model)
    bank = AdapterBank(model)
    _trained(bank, "a", 1)
    _trained(bank, "b", 2, ("k_proj", "o_proj", "down_proj"))
    bank.use(None)
    assert torch.equal(_logits(model), base)  # adapters off: exactly the base layers
    bank.use("a")
    with_a = _logits(model)
    bank.use("b")
    with_b = _logits(model)
    assert not torch.allclose(with_a, base) and not torch.allclose(with_b, base)
    assert not torch.allclose(with_a, with_b)
    with bank.using("a"):
        assert torch.equal(_logits(model), with_a)
    assert bank.active == "b" and torch.equal(_logits(model), with_b)
    bank.remove("b")
    assert bank.active is None and torch.equal(_logits(model), base)
    bank.use("a")
    assert torch.equal(_logits(model), with_a)  # removing b left a as it was


def test_a_served_adapter_gives_what_plain_peft_gives(tmp_path: Path) -> None:
    from peft import PeftModel

    model = _model()
    bank = AdapterBank(model)
    _trained(bank, "t", 3)
    digest = bank.save("t", tmp_path / "ad", base_model="tiny")
    assert digest == file_digest(tmp_path / "ad" / WEIGHTS_FILE)
    bank.use("t")
    want = _logits(model)
    bank.remove("t")
    bank.load("served", tmp_path / "ad")
    bank.use("served")
    assert torch.equal(_logits(model), want)
    plain = PeftModel.from_pretrained(_model(), str(tmp_path / "ad"))
    with torch.inference_mode():
        assert torch.allclose(plain(input_ids=IDS).logits, want, atol=1e-6)
    config = json.loads((tmp_path / "ad" / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_loading_an_adapter_keeps_the_trainable_one_trainable(tmp_path: Path) -> None:
    model = _model()
    bank = AdapterBank(model)
    _trained(bank, "served_src", 4)
    bank.save("served_src", tmp_path / "s")
    bank.remove("served_src")
    params = _trained(bank, "trainee", 5)
    bank.use("trainee")
    bank.load("s", tmp_path / "s")
    assert bank.active == "trainee"  # loading switches nothing
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in bank.parameters("s"))
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_least_recently_used_adapters_are_unloaded(tmp_path: Path) -> None:
    model = _model()
    bank = AdapterBank(model, capacity=2)
    src = AdapterBank(_model())
    _trained(src, "x", 6)
    src.save("x", tmp_path / "x")
    for name in ("a", "b"):
        bank.load(name, tmp_path / "x")
    bank.use("a")  # a is now the most recently used
    bank.load("c", tmp_path / "x")
    assert set(bank.names()) == {"a", "c"}
    assert not any(".b." in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("damage", ["missing", "no_config", "bad_json", "bad_weights",
                                    "wrong_shapes"])
def test_a_bad_adapter_folder_names_the_adapter_and_the_path(tmp_path: Path, damage: str) -> None:
    src = AdapterBank(from_config(llama_config(hidden_size=32, intermediate_size=64), seed=0)
                      if damage == "wrong_shapes" else _model())
    _trained(src, "x", 7)
    folder = tmp_path / "ad"
    src.save("x", folder)
    if damage == "missing":
        folder = tmp_path / "nope"
    elif damage == "no_config":
        (folder / CONFIG_FILE).unlink()
    elif damage == "bad_json":
        (folder / CONFIG_FILE).write_text("{")
    elif damage == "bad_weights":
        (folder / WEIGHTS_FILE).write_bytes(b"\x00" * 40)
    model = _model()
    base = _logits(model)
    bank = AdapterBank(model)
    with pytest.raises(ConfigError, match=f"(?s)'mine'.*{folder}.*(ADAPTER|base model)"):
        bank.load("internal", folder, label="mine")
    assert bank.names() == ()
    assert torch.equal(_logits(model), base)


def test_target_modules_the_model_lacks_are_listed() -> None:
    model = _model()
    assert linear_names(model) == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj",
                                   "q_proj", "up_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"no linear layer named qkv_proj.*q_proj, up_proj"):
        check_targets(model, ("q_proj", "qkv_proj"))
    bank = AdapterBank(model)
    with pytest.raises(ConfigError, match="qkv_proj"):
        bank.add_trainable("t", rank=2, alpha=4, target_modules=("qkv_proj",))
    assert bank.names() == ()
    _trained(bank, "t", 1)
    assert linear_names(model)[-1] == "v_proj"  # wrapped layers still count by their name
    check_targets(model, ("self_attn.q_proj",))


def test_the_same_seed_gives_the_same_fresh_adapter() -> None:
    a = AdapterBank(_model()).add_trainable("t", rank=2, alpha=4, target_modules=("q_proj",),
                                            seed=9)
    b = AdapterBank(_model()).add_trainable("t", rank=2, alpha=4, target_modules=("q_proj",),
                                            seed=9)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(float(p.detach().abs().max()) > 0 for p in a)


def test_saving_replaces_a_folder_atomically(tmp_path: Path) -> None:
    bank = AdapterBank(_model())
    _trained(bank, "t", 1)
    target = tmp_path / "ad"
    first = bank.save("t", target)
    _randomize(bank.parameters("t"), 2)
    second = bank.save("t", target)
    assert first != second == file_digest(target / WEIGHTS_FILE)
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # no temporary folder left


def test_a_failed_save_leaves_the_previous_adapter(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from llmsql.engine.finetune import serve

    bank = AdapterBank(_model())
    _trained(bank, "t", 1)
    target = tmp_path / "ad"
    first = bank.save("t", target)
    _randomize(bank.parameters("t"), 2)

    def disk_full(path: Path) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(serve, "fsync_path", disk_full)  # the write fails as on a full disk
    with pytest.raises(ExecutionError, match=f"writing adapter 't' to {target}.*free disk"):
        bank.save("t", target)
    assert file_digest(target / WEIGHTS_FILE) == first
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # the temporary folder is gone


def test_a_fresh_adapter_changes_nothing_and_standalone_save_works(tmp_path: Path) -> None:
    model = _model()
    base = _logits(model)
    bank = AdapterBank(model)
    bank.add_trainable("t", rank=2, alpha=4, target_modules=("q_proj",))
    bank.use("t")
    assert torch.equal(_logits(model), base)  # B is zero
    assert save_adapter(model, "t", tmp_path / "a") == file_digest(tmp_path / "a" / WEIGHTS_FILE)


def test_an_adapter_saved_by_plain_peft_loads_and_runs_as_in_peft(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_model(), LoraConfig(r=2, lora_alpha=4,
                                                     target_modules=["k_proj", "up_proj"]))
    _randomize([p for n, p in peft_model.named_parameters() if "lora_" in n], 11)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    want = _logits(peft_model)
    model = _model()
    bank = AdapterBank(model)
    bank.load("p", tmp_path / "peft")
    bank.use("p")
    assert torch.allclose(_logits(model), want, atol=1e-6)
