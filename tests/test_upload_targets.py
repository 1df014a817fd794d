"""An adapter's config must target the modules its weights adapt, on modules its base has.

PEFT refuses to load an adapter whose `target_modules` the base lacks, and the store lists an adapter by its
config's targets; so validation compares the config's targets with the base's modules and with the modules the
tensors adapt, and refuses a mismatch naming both lists: in `validate_adapter`, in `install_archive`, and as a 422
from the HTTP upload route."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import random_lora_adapter
from hostile import tar_gz

from loraswap.adapters.archive import install_archive
from loraswap.adapters.base import BaseRef, resolve_base
from loraswap.adapters.manifest import CONFIG_FILE, WEIGHTS_FILE, AdapterError
from loraswap.adapters.validate import validate_adapter
from loraswap.bench.launch import launch, stop

Files = dict[str, bytes]


@pytest.fixture(scope="module")
def ref(tiny_base: Path) -> BaseRef:
    return resolve_base(str(tiny_base))


@pytest.fixture(scope="module")
def good(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Files:
    """A random LoRA on q_proj and v_proj of the tiny base: config and weights, no manifest."""
    folder = random_lora_adapter(tiny_base, tmp_path_factory.mktemp("good"), "good", seed=3)
    return {n: (folder / n).read_bytes() for n in (CONFIG_FILE, WEIGHTS_FILE)}


def with_config(files: Files, **changes: Any) -> Files:
    return {**files, CONFIG_FILE: json.dumps(json.loads(files[CONFIG_FILE]) | changes).encode()}


def folder_of(files: Files, path: Path) -> Path:
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def test_config_targets_the_base_lacks_are_refused_naming_both_lists(good: Files, ref: BaseRef, tmp_path: Path) -> None:
    folder = folder_of(with_config(good, target_modules=["nonexistent_proj"]), tmp_path / "a")
    problems = validate_adapter(folder, ref, require_manifest=False)
    assert len(problems) == 1, problems
    assert "targets ['nonexistent_proj']" in problems[0]
    assert "LoRA weights for ['q_proj', 'v_proj']" in problems[0]
    assert f"base {ref.base_id!r} has no module named 'nonexistent_proj'" in problems[0]
    # Without a base, the config is compared with the tensors alone.
    (alone,) = validate_adapter(folder, require_manifest=False)
    assert "targets ['nonexistent_proj']" in alone and "['q_proj', 'v_proj']" in alone


@pytest.mark.parametrize(
    ("targets", "why"),
    [
        (["q_proj"], "weights for modules the config does not target: model.layers.0.self_attn.v_proj"),
        (["q_proj", "k_proj", "v_proj"], "no weights for targeted modules: model.layers.0.self_attn.k_proj"),
        (r".*\.q_proj", "weights for modules the config does not target"),
        (["q_proj", "v_proj", "wq"], "has no module named 'wq'"),
    ],
    ids=["fewer", "more", "regex-fewer", "one-name-too-many"],
)
def test_every_mismatch_between_config_and_weights_is_refused(
    good: Files, ref: BaseRef, tmp_path: Path, targets: Any, why: str
) -> None:
    folder = folder_of(with_config(good, target_modules=targets), tmp_path / "a")
    (problem,) = validate_adapter(folder, ref, require_manifest=False)
    assert why in problem and "LoRA weights for ['q_proj', 'v_proj']" in problem


def test_configs_that_name_the_weights_modules_pass(good: Files, ref: BaseRef, tiny_base: Path, tmp_path: Path) -> None:
    """Names, full paths and a regular expression; and a PEFT adapter on one layer only (`layers_to_transform`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for i, targets in enumerate([["v_proj", "q_proj"], r".*\.(q|v)_proj"]):
        folder = folder_of(with_config(good, target_modules=targets), tmp_path / str(i))
        assert validate_adapter(folder, ref, require_manifest=False) == []

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    config = LoraConfig(r=4, target_modules=["q_proj", "o_proj"], layers_to_transform=[1], init_lora_weights=False)
    one_layer = tmp_path / "one-layer"
    get_peft_model(model, config).save_pretrained(one_layer)
    assert validate_adapter(one_layer, ref, require_manifest=False) == []
    config_path = one_layer / CONFIG_FILE
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"layers_to_transform": [0]}))
    (problem,) = validate_adapter(one_layer, ref, require_manifest=False)
    assert "no weights for targeted modules: model.layers.0.self_attn.o_proj" in problem


def test_install_refuses_the_mismatch_and_leaves_nothing(good: Files, ref: BaseRef, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match=r"targets \['nonexistent_proj'\] .* for \['q_proj', 'v_proj'\]"):
        install_archive(tar_gz(with_config(good, target_modules=["nonexistent_proj"])), "mine", tmp_path, ref)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def server(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    store = tmp_path_factory.mktemp("targets-store")
    proc, url = launch(str(tiny_base), store, quant="none", max_batch_size=2, timeout=120)
    yield url, store
    stop(proc)


def test_upload_with_false_targets_answers_422_naming_both_lists(server: tuple[str, Path], good: Files) -> None:
    url, store = server
    bad = tar_gz(with_config(good, target_modules=["nonexistent_proj"]))
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/adapters", data={"name": "false-targets"}, files={"file": ("a.tar.gz", bad)})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_adapter" and error["param"] == "file"
        assert "targets ['nonexistent_proj']" in error["message"]
        assert "LoRA weights for ['q_proj', 'v_proj']" in error["message"]
        assert sorted(p.name for p in store.iterdir()) == []
        assert "false-targets" not in [a["name"] for a in c.get("/v1/adapters").json()["data"]]

        # The same weights with their true targets are accepted and listed with them.
        r = c.post("/v1/adapters", data={"name": "true-targets"}, files={"file": ("a.tar.gz", tar_gz(good))})
        assert r.status_code == 201, r.text
        assert r.json()["target_modules"] == ["q_proj", "v_proj"]
