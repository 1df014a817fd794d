"""The worker process's pieces apart from the engine's parity tests: what its modules import, how a job fails
(`failures.py`: an ErrorKind and one message, never an HTTP status), the running batch's bookkeeping (`batch.py`),
detokenising (`sampling.py`), and the LitServe API taking a Job from the queue."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PARITY_QUESTIONS as QUESTIONS
from conftest import random_lora_adapter
from litserve.specs.base import LitSpec

from loraswap.adapters.base import load_base
from loraswap.adapters.manifest import AdapterNotFound
from loraswap.adapters.prompt import prompt_ids
from loraswap.adapters.store import AdapterStore
from loraswap.server.jobs import BASE, Job, JobEvent
from loraswap.server.settings import Settings
from loraswap.server.worker.batch import Batch, Row
from loraswap.server.worker.engine import Engine
from loraswap.server.worker.failures import InvalidJob, failure_kind, forward_failed
from loraswap.server.worker.sampling import new_text

WORKER = Path(__file__).resolve().parents[1] / "server" / "worker"
API_SIDE = ("spec", "app", "protocol", "metrics", "playground", "api")
"""Modules (and the package) of the API process under loraswap.server."""


def imported_after(module: str) -> set[str]:
    """The modules a fresh interpreter has loaded after importing `module`."""
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_settings_import_no_torch_and_no_worker_code() -> None:
    loaded = imported_after("loraswap.server.settings")
    assert "torch" not in loaded
    assert not {m for m in loaded if m.startswith("loraswap.server.worker")}


def test_the_worker_api_imports_no_torch_and_nothing_of_the_api_process() -> None:
    """The API process imports the worker's LitAPI to build the server: no torch there until a worker's setup."""
    loaded = imported_after("loraswap.server.worker.api")
    assert "torch" not in loaded
    assert not {m for m in loaded for side in API_SIDE if m == f"loraswap.server.{side}"}


def test_worker_modules_import_nothing_of_the_api_side_and_no_private_names() -> None:
    for path in sorted(WORKER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("loraswap."):
                parts = node.module.split(".")
                assert not (parts[:2] == ["loraswap", "server"] and len(parts) > 2 and parts[2] in API_SIDE), (
                    path.name,
                    node.module,
                )
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__future__"]
                assert not private, (path.name, node.module, private)


def test_each_failure_has_its_kind_and_a_failed_forward_one_message() -> None:
    assert failure_kind(AdapterNotFound("adapter 'x' not found")) == "adapter_not_found"
    assert failure_kind(InvalidJob("empty prompt")) == "invalid_job"
    assert failure_kind(ValueError("prefix of shape [3, 4] does not fit this base")) == "generation_failed"
    assert forward_failed(RuntimeError("simulated device error\nmore")) == (
        "generation failed: RuntimeError: simulated device error"
    )
    assert forward_failed(MemoryError()) == "generation failed: MemoryError"


class CharTokenizer:
    """Token i is the character chr(i); 0 decodes to an incomplete UTF-8 character."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("\ufffd" if i == 0 else chr(i) for i in ids)


def row_of(text: str, stop: tuple[str, ...] = ()) -> Row:
    return Row(Job("r", [1], None, stop=stop), BASE, None, generated=[ord(c) for c in text])


def test_new_text_holds_back_what_may_still_change() -> None:
    tok = CharTokenizer()
    row = row_of("Hello wo", stop=("world",))
    assert new_text(tok, row, final=False) == ("Hello ", False)  # "wo" may start the stop string
    row.generated += [ord("r"), ord("l"), ord("d"), ord("!")]
    assert new_text(tok, row, final=False) == ("", True)  # the stop string ends the text before it
    row = row_of("ab")
    row.generated.append(0)
    assert new_text(tok, row, final=False) == ("ab", False)  # an incomplete character waits
    assert new_text(tok, row, final=True) == ("\ufffd", False)


def batch_of(n: int, columns: list[int]) -> Batch:
    """A batch of `n` rows whose row i has its real tokens in its last `columns[i]` cache columns; cache entries
    hold the row's number."""
    from transformers import DynamicCache

    width = max(columns)
    batch = Batch(torch.device("cpu"), n)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, c in enumerate(columns):
        mask[i, width - c :] = 1
    keys = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 2, width, 4).clone()
    cache = DynamicCache()
    cache.update(keys, keys.clone(), 0)
    rows = [Row(Job(f"r{i}", [1], None), BASE, None) for i in range(n)]
    batch.join(rows, cache, mask)
    return batch


def test_a_batch_keeps_rows_cache_and_mask_in_step() -> None:
    batch = batch_of(4, [5, 2, 3, 5])
    batch.retire([batch.rows[0], batch.rows[3]])  # the rows with the widest prompts leave
    assert [r.req.uid for r in batch.rows] == ["r2", "r1"]  # the last remaining row fills the gap
    assert batch.mask is not None and batch.mask.tolist() == [[1, 1, 1], [0, 1, 1]]  # all-padding columns go
    assert batch.cache.layers[0].keys[:, 0, 0, 0].tolist() == [2.0, 1.0]
    assert batch.cache.layers[0].keys.shape[2] == 3
    batch.reorder([1, 0])
    assert [r.req.uid for r in batch.rows] == ["r1", "r2"]
    assert batch.mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert batch.cache.layers[0].keys[:, 0, 0, 0].tolist() == [1.0, 2.0]
    batch.retire(list(batch.rows))
    assert batch.rows == [] and batch.cache is None and batch.mask is None


@pytest.fixture(scope="module")
def store_dir(lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("worker-store")
    random_lora_adapter(lively_base, out, "symptoms", seed=1)
    random_lora_adapter(lively_base, out, "treatment", seed=2)
    return out


def events_of(engine: Engine) -> dict[str, list[JobEvent]]:
    events: dict[str, list[JobEvent]] = {}
    for _ in range(100):
        if not engine.has_work():
            break
        for e in engine.step():
            events.setdefault(e.uid, []).append(e)
    return events


def test_a_failed_forward_fails_its_jobs_with_one_kind_and_message(
    lively_base: Path, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefill or decode: the jobs it ran end with kind generation_failed and the same message."""
    base = load_base(str(lively_base), quant="none")
    engine = Engine(base.model, base.tokenizer, AdapterStore(store_dir, shipped_dir=None).get)
    ids = prompt_ids(base.tokenizer, QUESTIONS[0])

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated device error")

    engine.submit(Job("decoding", ids, "symptoms", max_tokens=8, ignore_eos=True))
    engine.step()  # its prefill
    monkeypatch.setattr(base.model.lm_head, "forward", boom)
    engine.submit(Job("prefilling", ids, None, max_tokens=8))
    events = events_of(engine)
    for uid in ("decoding", "prefilling"):
        last = events[uid][-1]
        assert (last.finish_reason, last.error_kind) == ("error", "generation_failed"), last
        assert last.error == "generation failed: RuntimeError: simulated device error"


def test_an_adapter_gone_after_its_job_was_queued_fails_it_as_not_found(lively_base: Path, tmp_path: Path) -> None:
    random_lora_adapter(lively_base, tmp_path, "leaving", seed=3)
    store = AdapterStore(tmp_path, shipped_dir=None)
    base = load_base(str(lively_base), quant="none")
    engine = Engine(base.model, base.tokenizer, store.get)
    engine.submit(Job("late", prompt_ids(base.tokenizer, QUESTIONS[0]), "leaving", max_tokens=4))
    shutil.rmtree(tmp_path / "leaving")
    (last,) = events_of(engine)["late"]
    assert (last.finish_reason, last.error_kind) == ("error", "adapter_not_found")
    assert "'leaving' not found" in (last.error or "")


class StreamingSpec(LitSpec):
    """The least spec a worker runs under: it streams (the API process hands the worker its real one)."""

    @property
    def stream(self) -> bool:
        return True


def test_the_worker_takes_jobs_and_answers_with_events_on_the_wire(lively_base: Path, store_dir: Path) -> None:
    from loraswap.server.worker.api import LoraswapAPI

    settings = Settings(base=str(lively_base), quant="none", adapters_dir=store_dir)
    api = LoraswapAPI(settings, StreamingSpec())
    api.setup("cpu")
    ids = prompt_ids(api.engine.tokenizer, QUESTIONS[0])
    api.add_request("ok", Job("ok", ids, "treatment", max_tokens=3))
    api.add_request("typo", Job("typo", ids, "treatmnt", max_tokens=3))
    api.add_request("long", Job("long", list(range(1, 5000)), None))
    api.add_request("dict", {"prompt_ids": ids, "adapter": None})
    finished: dict[str, JobEvent] = {}
    for _ in range(20):
        for out in api.step(None):
            if isinstance(out.output, dict):
                event = JobEvent.from_wire(out.output)
                if event.finish_reason:
                    finished[event.uid] = event
        if not api.has_active_requests():
            break
    assert finished["ok"].finish_reason in ("stop", "length") and finished["ok"].error is None
    assert finished["typo"].error_kind == "adapter_not_found" and "did you mean 'treatment'" in str(
        finished["typo"].error
    )
    assert finished["long"].error_kind == "invalid_job" and "context holds" in str(finished["long"].error)
    assert finished["dict"].error_kind == "invalid_job" and "jobs.Job" in str(finished["dict"].error)
    assert api.uids == {}  # nothing left behind for a job that finished or never started
