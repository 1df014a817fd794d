"""Installing adapter archives: good ones land whole, hostile or broken ones leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile import BAD_NAMES, HOSTILE, Case, tar_gz, zip_bytes

from loraswap.adapters.archive import install_archive
from loraswap.adapters.base import BaseRef, resolve_base
from loraswap.adapters.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, AdapterError, read_manifest
from loraswap.adapters.store import AdapterStore
from loraswap.adapters.validate import validate_adapter
from loraswap.train.trainer import TrainConfig, train_many


@pytest.fixture(scope="module")
def adapter(tiny_base: Path, qa_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("src")
    train_many(
        str(tiny_base),
        str(qa_csv),
        ["symptoms"],
        out,
        TrainConfig(max_steps=1, eval_examples=0, quant="none"),
        progress=False,
    )
    return out / "symptoms"


@pytest.fixture(scope="module")
def ref(tiny_base: Path) -> BaseRef:
    return resolve_base(str(tiny_base))


def adapter_files(folder: Path, prefix: str = "", manifest: bool = True) -> dict[str, bytes]:
    names = [CONFIG_FILE, WEIGHTS_FILE] + ([MANIFEST_FILE] if manifest else [])
    return {prefix + n: (folder / n).read_bytes() for n in names}


def leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir()) if store.exists() else []


def test_tar_gz_at_root_installs(adapter: Path, ref: BaseRef, tmp_path: Path) -> None:
    path = install_archive(tar_gz(adapter_files(adapter)), "mine", tmp_path, ref)
    assert path == tmp_path / "mine"
    m = read_manifest(path)
    assert m.name == "mine" and m.qtype == "symptoms"
    assert AdapterStore(tmp_path, shipped_dir=None).names() == ["mine"]
    assert leftovers(tmp_path) == ["mine"]


def test_zip_in_one_folder_without_manifest_installs(adapter: Path, ref: BaseRef, tmp_path: Path) -> None:
    path = install_archive(zip_bytes(adapter_files(adapter, "symptoms/", manifest=False)), "zipped", tmp_path, ref)
    m = read_manifest(path)
    assert m.base_fingerprint == ref.fingerprint and m.data_source == "upload" and m.rank == 8
    assert m.target_modules == ["q_proj", "v_proj"]


def test_existing_name_needs_overwrite(adapter: Path, ref: BaseRef, tmp_path: Path) -> None:
    data = tar_gz(adapter_files(adapter))
    install_archive(data, "a", tmp_path, ref)
    with pytest.raises(FileExistsError, match="already exists"):
        install_archive(data, "a", tmp_path, ref)
    install_archive(data, "a", tmp_path, ref, overwrite=True)
    assert leftovers(tmp_path) == ["a"]


@pytest.mark.parametrize("case", HOSTILE, ids=[c.id for c in HOSTILE])
def test_hostile_and_broken_archives_leave_nothing(case: Case, adapter: Path, ref: BaseRef, tmp_path: Path) -> None:
    data = case.build(adapter_files(adapter))
    limit = {"max_bytes": case.max_bytes} if case.max_bytes else {}
    with pytest.raises(AdapterError, match=case.message) as refused:
        install_archive(data, "x", tmp_path, ref, **limit)
    assert leftovers(tmp_path) == []
    assert ".tmp-" not in str(refused.value) and str(tmp_path) not in str(refused.value)


def test_decompression_bomb_stops_before_expanding(adapter: Path, ref: BaseRef, tmp_path: Path) -> None:
    """The declared size is refused on the member's header: the bomb is never decompressed."""
    bomb = tar_gz({**adapter_files(adapter), "README.md": b"\0" * (64 << 20)})
    assert len(bomb) < 256 << 10  # small archive, large content
    with pytest.raises(AdapterError, match="expands to more than"):
        install_archive(bomb, "x", tmp_path, ref, max_bytes=1 << 20)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n) for n in BAD_NAMES])
def test_bad_names_are_refused(name: str, adapter: Path, ref: BaseRef, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="invalid adapter name"):
        install_archive(tar_gz(adapter_files(adapter)), name, tmp_path / "store", ref)
    assert (leftovers(tmp_path / "store") == [] and leftovers(tmp_path) == ["store"]) or leftovers(tmp_path) == []


def test_base_mismatch_is_refused(adapter: Path, tmp_path: Path) -> None:
    other = BaseRef("other", "other-model", "/nowhere", "w", {"model_type": "llama"})
    with pytest.raises(AdapterError, match="other-model"):
        install_archive(tar_gz(adapter_files(adapter)), "x", tmp_path, other)
    assert leftovers(tmp_path) == []


def test_a_crash_mid_upload_or_overwrite_is_recovered(adapter: Path, ref: BaseRef, tmp_path: Path) -> None:
    """What kill -9 can leave between the steps of install and publish, and what start-up recovery makes of it."""
    from loraswap.adapters.manifest import recover

    install_archive(tar_gz(adapter_files(adapter)), "kept", tmp_path, ref)
    install_archive(tar_gz(adapter_files(adapter)), "swapped", tmp_path, ref)
    (tmp_path / ".tmp-new-0123abcd").mkdir()  # an upload killed before its final rename
    (tmp_path / ".tmp-new-0123abcd" / CONFIG_FILE).write_text("{}")
    (tmp_path / "kept").rename(tmp_path / ".old-kept-89abcdef")  # an overwrite killed between its two renames
    (tmp_path / ".trash-gone-00000000").mkdir()  # a delete killed after its rename
    (tmp_path / ".old-swapped-11111111").mkdir()  # an overwrite killed after both renames
    assert AdapterStore(tmp_path, shipped_dir=None).names() == ["swapped"]  # hidden folders are never served
    done = recover(tmp_path)
    assert len(done) == 4 and any("restored 'kept'" in d for d in done)
    assert leftovers(tmp_path) == ["kept", "swapped"]
    assert AdapterStore(tmp_path, shipped_dir=None).problems() == {}
    assert validate_adapter(tmp_path / "kept", ref) == []


def test_an_interrupted_install_process_leaves_a_complete_adapter_or_nothing(
    adapter: Path, ref: BaseRef, tmp_path: Path
) -> None:
    """kill -9 of a process installing adapters in a loop (overwriting one name, adding others), at 10 moments:
    every visible folder is always a complete, valid adapter; recovery leaves no hidden folder."""
    import os
    import signal
    import time

    from loraswap.adapters.manifest import recover

    data = tar_gz({**adapter_files(adapter), "README.md": bytes(range(256)) * 8192})
    store = tmp_path / "store"
    install_archive(data, "same", store, ref)
    mid_install = 0
    for trial in range(10):
        pid = os.fork()  # the child starts with everything imported, so the loop is running at once
        if pid == 0:
            try:
                for i in range(10_000):
                    install_archive(data, "same" if i % 2 else f"n{trial}-{i}", store, ref, overwrite=True)
            finally:
                os._exit(0)
        time.sleep(0.02 + 0.031 * trial)  # different moments of the loop
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        visible = [p for p in store.iterdir() if not p.name.startswith(".")]
        mid_install += len(visible) < len(list(store.iterdir()))  # the kill left a hidden staging folder
        for folder in visible:
            assert validate_adapter(folder, ref) == [], (trial, folder.name)
        recover(store)
        assert all(not p.name.startswith(".") for p in store.iterdir()), trial
        assert validate_adapter(store / "same", ref) == [], trial  # the overwritten name always holds one
    assert len(list(store.iterdir())) > 10  # the loops did install adapters between the kills
    assert mid_install >= 3  # most kills land inside an install (9 of 10 when this was written)


def test_concurrent_uploads_of_one_name_have_exactly_one_winner(adapter: Path, ref: BaseRef, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    data = tar_gz(adapter_files(adapter))

    def attempt(_: int) -> str:
        try:
            install_archive(data, "same", tmp_path, ref)
            return "won"
        except FileExistsError:
            return "lost"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(8)))
    assert results.count("won") == 1 and results.count("lost") == 7
    assert leftovers(tmp_path) == ["same"]
    assert AdapterStore(tmp_path, shipped_dir=None).names() == ["same"]


def test_readers_never_miss_an_adapter_being_overwritten(adapter: Path, ref: BaseRef, tmp_path: Path) -> None:
    """Overwrites swap the folders in one step: a reader looking the name up meanwhile always finds a whole one."""
    import threading

    data = tar_gz(adapter_files(adapter))
    install_archive(data, "hot", tmp_path, ref)
    store = AdapterStore(tmp_path, shipped_dir=None)
    done = threading.Event()
    misses: list[str] = []

    def read() -> None:
        while not done.is_set():
            try:
                entry = store.get("hot")
                if not (entry.path / WEIGHTS_FILE).is_file():
                    misses.append("no weights")
            except AdapterError as e:
                misses.append(str(e))

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(30):
        install_archive(data, "hot", tmp_path, ref, overwrite=True)
    done.set()
    reader.join()
    assert misses == []
    assert leftovers(tmp_path) == ["hot"]
