"""The S3 adapter registry and a server's replica of it, against moto's S3 server on the loopback address: the
layout, atomic publishing and its conflicts, tampered objects, an unreachable store, the byte-bounded cache."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from conftest import random_lora_adapter, run_cli
from s3 import CREDENTIALS, S3, make_bucket

from loraswap.adapters.base import BaseRef, resolve_base
from loraswap.adapters.manifest import MANIFEST_FILE, WEIGHTS_FILE, AdapterError, AdapterNotFound, sha256_of
from loraswap.adapters.registry import (
    AdapterRefused,
    Registry,
    RegistryConflict,
    RegistryUnavailable,
    RegistryURI,
    fetch,
    publish,
)
from loraswap.adapters.replica import Replica


@pytest.fixture
def registry(s3: S3, request: pytest.FixtureRequest) -> Registry:
    bucket = f"reg-{abs(hash(request.node.name)) % 10**8}"
    make_bucket(bucket)
    return Registry(f"s3://{bucket}/team/adapters-v1", timeout=2)


@pytest.fixture(scope="module")
def folders(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    store = tmp_path_factory.mktemp("registry-src")
    return {n: random_lora_adapter(tiny_base, store, n, seed=i) for i, n in enumerate(("one", "two"), start=1)}


@pytest.fixture(scope="module")
def ref(tiny_base: Path) -> BaseRef:
    return resolve_base(str(tiny_base))


def keys(reg: Registry) -> list[str]:
    out = boto3.session.Session().client("s3").list_objects_v2(Bucket=reg.uri.bucket)
    return sorted(o["Key"] for o in out.get("Contents", []))


def test_uri_parsing() -> None:
    assert str(RegistryURI.parse("s3://my-bucket/a/b/")) == "s3://my-bucket/a/b"
    assert RegistryURI.parse("s3://my-bucket").key("adapters", "x.json") == "adapters/x.json"
    for bad in ("my-bucket/a", "s3://", "s3://UPPER/x", "gs://b/x"):
        with pytest.raises(ValueError, match="s3://BUCKET"):
            RegistryURI.parse(bad)


def test_layout_blobs_by_digest_and_one_record(registry: Registry, folders: dict[str, Path], ref: BaseRef) -> None:
    record = publish(registry, folders["one"], "one", ref, max_rank=64)
    weights = sha256_of(folders["one"] / WEIGHTS_FILE)
    assert record.files[WEIGHTS_FILE]["sha256"] == weights
    prefix = "team/adapters-v1"
    assert keys(registry) == sorted(
        [f"{prefix}/adapters/one.json"] + [f"{prefix}/blobs/{f['sha256']}" for f in record.files.values()]
    )
    assert registry.list() == {"one": record.etag}
    read = registry.record("one")
    assert read.adapter.weights_sha256 == weights and read.adapter.name == "one"
    # The same weights under another name add a record, not another copy of the weights.
    publish(registry, folders["one"], "alias", ref, max_rank=64)
    assert len([k for k in keys(registry) if k.endswith(weights)]) == 1


def test_publish_refuses_an_invalid_adapter_and_writes_nothing(
    registry: Registry, folders: dict[str, Path], ref: BaseRef, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folders["one"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 512}))
    with pytest.raises(AdapterError, match="rank"):
        publish(registry, bad, "bad", ref, max_rank=64)
    assert keys(registry) == []


def test_concurrent_publishers_of_one_name_one_wins(registry: Registry, folders: dict[str, Path], ref: BaseRef) -> None:
    def go(i: int) -> str:
        try:
            publish(registry, folders["one" if i % 2 else "two"], "race", ref, max_rank=64)
            return "won"
        except RegistryConflict:
            return "conflict"

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(go, range(6)))
    assert results.count("won") == 1 and results.count("conflict") == 5
    record = registry.record("race")  # complete: its weights are one of the two, whole
    assert record.files[WEIGHTS_FILE]["sha256"] in {sha256_of(f / WEIGHTS_FILE) for f in folders.values()}


def test_overwrite_replaces_and_a_stale_replace_loses(
    registry: Registry, folders: dict[str, Path], ref: BaseRef
) -> None:
    first = publish(registry, folders["one"], "x", ref, max_rank=64)
    with pytest.raises(RegistryConflict, match="exists"):
        publish(registry, folders["two"], "x", ref, max_rank=64)
    second = publish(registry, folders["two"], "x", ref, max_rank=64, overwrite=True)
    assert second.etag != first.etag
    assert registry.record("x").files[WEIGHTS_FILE]["sha256"] == sha256_of(folders["two"] / WEIGHTS_FILE)
    # A replace based on what it read before someone else replaced it loses (If-Match on the old ETag).
    stale = registry._head(registry._record_key("x"))
    publish(registry, folders["one"], "x", ref, max_rank=64, overwrite=True)
    client = registry.client
    with pytest.raises(Exception, match=r"PreconditionFailed|412"):
        client.put_object(Bucket=registry.uri.bucket, Key=registry._record_key("x"), Body=b"{}", IfMatch=stale)


def test_remove_unpublishes(registry: Registry, folders: dict[str, Path], ref: BaseRef) -> None:
    publish(registry, folders["one"], "gone", ref, max_rank=64)
    registry.remove("gone")
    assert registry.list() == {}
    with pytest.raises(AdapterNotFound):
        registry.remove("gone")
    with pytest.raises(AdapterNotFound):
        registry.record("gone")


def test_tampered_blob_is_refused(registry: Registry, folders: dict[str, Path], ref: BaseRef, tmp_path: Path) -> None:
    record = publish(registry, folders["one"], "t", ref, max_rank=64)
    key = registry._blob_key(record.files[WEIGHTS_FILE]["sha256"])
    data = bytearray(registry.client.get_object(Bucket=registry.uri.bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF  # one bit of the weights flipped, same size
    registry.client.put_object(Bucket=registry.uri.bucket, Key=key, Body=bytes(data))
    dest = tmp_path / "pulled"
    dest.mkdir()
    with pytest.raises(AdapterRefused, match="does not match the digest"):
        fetch(registry, registry.record("t"), dest, ref, max_rank=64)


def test_a_record_that_lies_about_its_manifest_is_refused(
    registry: Registry, folders: dict[str, Path], ref: BaseRef, tmp_path: Path
) -> None:
    """Blobs that match their digests but a manifest naming other weights: refused by the validation."""
    one = publish(registry, folders["one"], "liar", ref, max_rank=64)
    two = publish(registry, folders["two"], "other", ref, max_rank=64)
    files = {**one.files, MANIFEST_FILE: two.files[MANIFEST_FILE]}
    body = json.loads(one.body())
    registry.client.put_object(
        Bucket=registry.uri.bucket, Key=registry._record_key("liar"), Body=json.dumps({**body, "files": files})
    )
    dest = tmp_path / "pulled"
    dest.mkdir()
    with pytest.raises(AdapterRefused):
        fetch(registry, registry.record("liar"), dest, ref, max_rank=64)


def test_unreachable_store_fails_fast_without_credentials(folders: dict[str, Path], ref: BaseRef, s3: S3) -> None:
    from loraswap.bench.launch import free_port

    dead = Registry("s3://nowhere/x", timeout=1)
    dead._client = boto3.session.Session().client("s3", endpoint_url=f"http://127.0.0.1:{free_port()}")
    for call in (dead.list, lambda: publish(dead, folders["one"], "a", ref, 64), lambda: dead.record("a")):
        start = time.monotonic()
        with pytest.raises(RegistryUnavailable) as info:
            call()
        assert time.monotonic() - start < 10
        message = str(info.value)
        assert "s3://nowhere/x" in message
        assert not any(secret in message for secret in CREDENTIALS.values() if len(secret) > 12)
    missing = Registry("s3://no-such-bucket-here/x", timeout=2)
    with pytest.raises(RegistryUnavailable, match="NoSuchBucket"):
        missing.list()


def test_replica_pulls_verifies_follows_deletes_and_bounds_its_cache(
    registry: Registry, folders: dict[str, Path], ref: BaseRef, tmp_path: Path
) -> None:
    size = sum(f.stat().st_size for f in folders["one"].iterdir())
    replica = Replica(registry, tmp_path / "cache", lambda: ref, 64, max_bytes=int(size * 1.5), poll_seconds=60)
    assert replica.ensure("one") is False  # not published: not a registry adapter
    publish(registry, folders["one"], "one", ref, max_rank=64)
    publish(registry, folders["two"], "two", ref, max_rank=64)
    assert replica.ensure("one") is False  # absent when asked a moment ago: not asked again within poll_seconds
    replica.sync()
    assert replica.ensure("one") is True and replica.ready("one")
    cached = tmp_path / "cache" / "one"
    assert sha256_of(cached / WEIGHTS_FILE) == sha256_of(folders["one"] / WEIGHTS_FILE)
    assert replica.ensure("two") is True  # over the byte bound: the least recently used copy goes
    assert not cached.exists() and replica.cached("two") and not replica.cached("one")
    # Replaced in the registry: pulled again on the next request after the listing.
    publish(registry, folders["one"], "two", ref, max_rank=64, overwrite=True)
    replica.sync()
    assert not replica.ready("two") and replica.ensure("two")
    assert sha256_of(tmp_path / "cache" / "two" / WEIGHTS_FILE) == sha256_of(folders["one"] / WEIGHTS_FILE)
    # Deleted: the listing drops the copy.
    registry.remove("two")
    replica.sync()
    assert not (tmp_path / "cache" / "two").exists() and replica.ensure("two") is False
    # A new replica on the same folder finds what is cached (after a restart).
    replica.ensure("one")
    again = Replica(registry, tmp_path / "cache", lambda: ref, 64, max_bytes=1 << 30)
    assert again.cached("one") and not any(p.name.startswith(".") for p in (tmp_path / "cache").iterdir())


def test_a_name_published_after_the_listing_answers_at_once_and_an_absent_one_is_asked_once_per_interval(
    registry: Registry, folders: dict[str, Path], ref: BaseRef, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter uploaded through one replica answers on the next replica asked, before its next listing."""
    replica = Replica(registry, tmp_path / "cache", lambda: ref, 64, max_bytes=1 << 30, poll_seconds=60)
    replica.sync()
    publish(registry, folders["one"], "new", ref, max_rank=64)
    assert replica.ensure("new") is True and replica.ready("new")  # no listing in between
    assert sha256_of(tmp_path / "cache" / "new" / WEIGHTS_FILE) == sha256_of(folders["one"] / WEIGHTS_FILE)
    asked: list[str] = []
    record = registry.record
    monkeypatch.setattr(registry, "record", lambda name: asked.append(name) or record(name))
    assert replica.ensure("missing") is False and replica.ensure("missing") is False
    assert asked == ["missing"]  # a name the registry lacks costs one read per poll interval, not one per request


def test_replica_refuses_a_tampered_adapter_until_it_is_published_again(
    registry: Registry, folders: dict[str, Path], ref: BaseRef, tmp_path: Path
) -> None:
    record = publish(registry, folders["one"], "t", ref, max_rank=64)
    key = registry._blob_key(record.files[WEIGHTS_FILE]["sha256"])
    registry.client.put_object(Bucket=registry.uri.bucket, Key=key, Body=b"not safetensors")
    replica = Replica(registry, tmp_path / "cache", lambda: ref, 64, max_bytes=1 << 30)
    replica.sync()
    for _ in range(2):  # the second time without downloading again
        with pytest.raises(AdapterRefused):
            replica.ensure("t")
    assert not (tmp_path / "cache" / "t").exists()
    assert [p for p in (tmp_path / "cache").iterdir()] == []
    publish(registry, folders["two"], "t", ref, max_rank=64, overwrite=True)  # a new record, other blobs
    replica.sync()
    assert replica.ensure("t") is True


def test_replica_keeps_serving_its_cache_while_the_registry_is_down(
    s3: S3, registry: Registry, folders: dict[str, Path], ref: BaseRef, tmp_path: Path
) -> None:
    publish(registry, folders["one"], "kept", ref, max_rank=64)
    publish(registry, folders["two"], "uncached", ref, max_rank=64)
    replica = Replica(registry, tmp_path / "cache", lambda: ref, 64, max_bytes=1 << 30)
    replica.sync()
    assert replica.ensure("kept")
    s3.stop()
    try:
        replica.sync()
        assert replica.error is not None and not replica.healthy
        assert replica.ensure("kept") is True  # cached: answers
        with pytest.raises(RegistryUnavailable, match="not cached here"):
            replica.ensure("uncached")
        assert replica.listing is not None and "uncached" in replica.listing  # the last listing is kept
    finally:
        s3.start()


def test_background_listing_sees_a_publish_within_the_interval(
    registry: Registry, folders: dict[str, Path], ref: BaseRef, tmp_path: Path
) -> None:
    replica = Replica(registry, tmp_path / "cache", lambda: ref, 64, max_bytes=1 << 30, poll_seconds=0.2)
    replica.start()
    try:
        publish(registry, folders["one"], "late", ref, max_rank=64)
        deadline = time.monotonic() + 10
        while "late" not in (replica.listing or {}) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "late" in (replica.listing or {})
    finally:
        replica.stop()


def test_cli_push_list_pull_remove_and_train_push(
    registry: Registry,
    folders: dict[str, Path],
    tiny_base: Path,
    qa_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri, base = str(registry.uri), str(tiny_base)
    code, out, err = run_cli(["adapters", "push", str(folders["one"]), "--registry", uri, "--base", base], capsys)
    assert code == 0 and "pushed one" in out, err
    code, _, err = run_cli(
        ["adapters", "push", str(folders["two"]), "--name", "one", "--registry", uri, "--base", base], capsys
    )
    assert code == 2 and "exists in the registry" in err
    code, out, _ = run_cli(["adapters", "list", "--registry", uri, "--json"], capsys)
    assert [d["name"] for d in json.loads(out)] == ["one"] and json.loads(out)[0]["source"] == "registry"
    store = tmp_path / "store"
    code, out, err = run_cli(
        ["adapters", "pull", "one", "--registry", uri, "--adapters-dir", str(store), "--base", base], capsys
    )
    assert code == 0, err
    assert sha256_of(store / "one" / WEIGHTS_FILE) == sha256_of(folders["one"] / WEIGHTS_FILE)
    code, _, err = run_cli(
        ["adapters", "pull", "nope", "--registry", uri, "--adapters-dir", str(store), "--base", base], capsys
    )
    assert code == 2 and "not in the registry" in err and not any(p.name.startswith(".") for p in store.iterdir())
    code, out, _ = run_cli(["adapters", "remove", "one", "--registry", uri], capsys)
    assert code == 0 and registry.list() == {}
    code, _, err = run_cli(["adapters", "list", "--registry", "not-s3"], capsys)
    assert code == 2 and "s3://BUCKET" in err
    train = ["train", "--qtype", "symptoms", "--data", str(qa_csv), "--out", str(tmp_path / "trained"), "--base", base]
    train += ["--max-steps", "2", "--no-quant", "--eval-examples", "1", "--push", "--registry", uri]
    code, out, err = run_cli(train, capsys)
    assert code == 0 and "pushed symptoms" in out, err
    assert registry.record("symptoms").adapter.qtype == "symptoms"


def test_without_conditional_writes_a_check_guards_the_name(
    registry: Registry, folders: dict[str, Path], ref: BaseRef
) -> None:
    """For stores without If-None-Match/If-Match: the name is checked first, the record written plainly."""
    plain = Registry(str(registry.uri), conditional_writes=False, timeout=2)
    first = publish(plain, folders["one"], "plain", ref, max_rank=64)
    with pytest.raises(RegistryConflict, match="exists"):
        publish(plain, folders["two"], "plain", ref, max_rank=64)
    second = publish(plain, folders["two"], "plain", ref, max_rank=64, overwrite=True)
    assert second.etag != first.etag and plain.record("plain").etag == second.etag
