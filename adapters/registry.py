"""The adapter registry: one S3 bucket prefix that any number of loraswap servers share.

    s3://BUCKET/PREFIX/blobs/<sha256>          the bytes of one file, named by their sha256 (written first)
    s3://BUCKET/PREFIX/adapters/<name>.json    one record per adapter: its files' digests and sizes, and its
                                               loraswap.json (written last)

S3 has no rename, so publishing is made atomic by order: the content-addressed blobs go up first (a blob that is
already there is skipped; two publishers of the same bytes write the same object), and the small record last, in
one PUT. Readers only follow records, so nobody ever sees half an adapter: a publisher killed before its record is
written leaves unreferenced blobs and no adapter. Overwrite = a new record, delete = the record removed; blobs are
never changed (an adapter removed or replaced leaves its blobs behind; they cost storage, never correctness).

Concurrent publishers of one name: the record is written with a conditional PUT (`If-None-Match: *` to create,
`If-Match: <etag>` to replace what was read), so exactly one wins and the others get `RegistryConflict`. AWS S3, MinIO
and moto honour both; for a store that does not, `conditional_writes=False` checks first and then writes, and two
racing publishers of one name end with the last one's record (both complete, never a mix).

A pull checks every blob's sha256 and size against the record while it downloads; the caller then runs the full
adapter validation (`fetch`). Any mismatch is `AdapterRefused`: the adapter never reaches a model. boto3 finds
credentials in the standard chain and honours AWS_ENDPOINT_URL (MinIO, Ceph, R2, GCS interoperability); no error
or log line of this module carries a credential.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraswap.adapters.manifest import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    AdapterError,
    AdapterManifest,
    AdapterNotFound,
    check_name,
    read_manifest,
    sha256_of,
)

if TYPE_CHECKING:
    from loraswap.adapters.base import BaseRef

RECORD_SCHEMA = 1
PUSHED_FILES = (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE, "loss.json", "loss.png", "README.md")
"""The files of an adapter folder that go to the registry (the first three are required)."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class RegistryError(Exception):
    """The registry could not do what was asked; the message says why (never with credentials)."""


class RegistryUnavailable(RegistryError):
    """The store did not answer, or refused the request (network, timeout, credentials, no such bucket)."""


class RegistryConflict(RegistryError, FileExistsError):
    """A publish lost: the name exists (without overwrite), or another publisher changed it meanwhile."""


class AdapterRefused(AdapterError):
    """An adapter in the registry that must not be served: a blob that does not match its digest, a malformed
    record, or an adapter that fails validation."""


@dataclass(frozen=True)
class RegistryURI:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> RegistryURI:
        m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", uri.strip())
        if not m:
            raise ValueError(f"registry {uri!r} is not s3://BUCKET[/PREFIX] (a valid S3 bucket name)")
        return cls(m.group(1), (m.group(2) or "").strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class Record:
    """One published adapter: the record object's content and its ETag (which changes with every publish)."""

    name: str
    etag: str
    files: dict[str, dict[str, Any]]
    """file name -> {"sha256", "size"}"""
    adapter: AdapterManifest
    published_at: str

    @property
    def size_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())

    @classmethod
    def parse(cls, name: str, etag: str, raw: bytes) -> Record:
        """A record as read from the store; AdapterRefused when it is not a well-formed record of `name`."""
        try:
            data = json.loads(raw)
            if data.get("schema") != RECORD_SCHEMA or data.get("name") != name:
                raise ValueError(f"schema {data.get('schema')!r}, name {data.get('name')!r}")
            files = data["files"]
            for fname, f in files.items():
                if fname not in PUSHED_FILES or not _SHA256.match(str(f["sha256"])) or int(f["size"]) < 0:
                    raise ValueError(f"file entry {fname!r}")
            for required in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE):
                if required not in files:
                    raise ValueError(f"no {required}")
            adapter = AdapterManifest.model_validate(data["adapter"])
            return cls(name, etag, files, adapter, str(data.get("published_at", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise AdapterRefused(f"adapter {name!r}: its registry record is malformed ({e})") from None

    def body(self) -> bytes:
        data = {
            "schema": RECORD_SCHEMA,
            "name": self.name,
            "files": self.files,
            "adapter": self.adapter.model_dump(mode="json"),
            "published_at": self.published_at,
        }
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def scrub(message: str) -> str:
    """`message` without what could be a secret: URL query strings (presigned signatures) and user info, and
    anything shaped like an access key id."""
    message = re.sub(r"(https?://)[^/@\s\"']*@", r"\1", message)
    message = re.sub(r"\?[^\s\"']*", "", message)
    return re.sub(r"\b(A[KS]IA|ASIA)[A-Z0-9]{12,}\b", "<key>", message)


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _status(e: Exception) -> int:
    return int(getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


class Registry:
    """One registry (`s3://BUCKET/PREFIX`). Thread-safe; the boto3 client is made on first use in each process
    (a pickled Registry carries no client and no connection)."""

    def __init__(self, uri: str, conditional_writes: bool = True, timeout: float = 5.0) -> None:
        self.uri = RegistryURI.parse(uri)
        self.conditional_writes = conditional_writes
        self.timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "conditional_writes": self.conditional_writes, "timeout": self.timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _client=None, _lock=threading.Lock())

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                config = Config(
                    connect_timeout=self.timeout,
                    read_timeout=self.timeout,
                    retries={"max_attempts": 2, "mode": "standard"},
                )
                self._client = boto3.session.Session().client("s3", config=config)
            return self._client

    def _fail(self, e: Exception, what: str) -> RegistryError:
        """The registry error a boto3/botocore exception stands for."""
        code = _code(e)
        detail = f"{code}: HTTP {_status(e)}" if code else f"{type(e).__name__}: {e}"
        return RegistryUnavailable(scrub(f"registry {self.uri}: {what} failed ({detail})"))

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        """`fn(**kwargs)`; botocore's own failures (no connection, a timeout, no credentials) become
        RegistryUnavailable, the store's answers (ClientError) are left to the caller."""
        from botocore.exceptions import BotoCoreError

        try:
            return fn(**kwargs)
        except BotoCoreError as e:
            raise self._fail(e, what) from None

    def list(self) -> dict[str, str]:
        """name -> ETag of every published adapter (one LIST request per 1000 adapters)."""
        from botocore.exceptions import ClientError

        prefix = self.uri.key("adapters") + "/"
        out: dict[str, str] = {}
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.uri.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            try:
                page = self._call("listing the adapters", self.client.list_objects_v2, **kwargs)
            except ClientError as e:
                raise self._fail(e, "listing the adapters") from None
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix) :].removesuffix(".json")
                if obj["Key"].endswith(".json") and "/" not in name:
                    out[name] = str(obj["ETag"])
            if not page.get("IsTruncated"):
                return out
            token = page.get("NextContinuationToken")

    def record(self, name: str) -> Record:
        """The record of `name` (AdapterNotFound when none is published)."""
        from botocore.exceptions import ClientError

        check_name(name)
        try:
            obj = self._call(
                f"reading {name!r}", self.client.get_object, Bucket=self.uri.bucket, Key=self._record_key(name)
            )
            raw = obj["Body"].read()
        except ClientError as e:
            if _code(e) in ("NoSuchKey", "404", "NotFound"):
                raise AdapterNotFound(f"adapter {name!r} is not in the registry {self.uri}") from None
            raise self._fail(e, f"reading {name!r}") from None
        return Record.parse(name, str(obj["ETag"]), raw)

    def _record_key(self, name: str) -> str:
        return self.uri.key("adapters", f"{name}.json")

    def _blob_key(self, sha256: str) -> str:
        return self.uri.key("blobs", sha256)

    def _head(self, key: str) -> str | None:
        """The ETag of `key`, None when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            return str(self._call("a HEAD", self.client.head_object, Bucket=self.uri.bucket, Key=key)["ETag"])
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(e, "a HEAD") from None

    def push(self, folder: Path, name: str, overwrite: bool = False) -> Record:
        """Publish the adapter folder `folder` as `name`: blobs first, the record last (conditional). The folder
        must already be validated (`publish` does both). RegistryConflict when the name exists (without
        `overwrite`) or another publisher changed it meanwhile."""
        from botocore.exceptions import ClientError

        check_name(name)
        adapter = read_manifest(folder).model_copy(update={"name": name})
        files: dict[str, dict[str, Any]] = {}
        for fname in PUSHED_FILES:
            path = folder / fname
            if path.is_file():
                files[fname] = {"sha256": sha256_of(path), "size": path.stat().st_size}
        # The record's adapter manifest is the one pushed as loraswap.json (with this name).
        body_manifest = (adapter.model_dump_json(indent=2) + "\n").encode()
        files[MANIFEST_FILE] = {"sha256": hashlib.sha256(body_manifest).hexdigest(), "size": len(body_manifest)}
        for fname, f in files.items():
            key = self._blob_key(f["sha256"])
            if self._head(key) is not None:
                continue  # content-addressed: the same bytes are there already
            data = body_manifest if fname == MANIFEST_FILE else (folder / fname).read_bytes()
            try:
                self._call(f"uploading {fname}", self.client.put_object, Bucket=self.uri.bucket, Key=key, Body=data)
            except ClientError as e:
                raise self._fail(e, f"uploading {fname}") from None
        published_at = datetime.now(UTC).isoformat(timespec="seconds")
        record = Record(name, "", files, adapter, published_at)
        return self._put_record(record, overwrite)

    def _put_record(self, record: Record, overwrite: bool) -> Record:
        from botocore.exceptions import ClientError

        name = record.name
        current = self._head(self._record_key(name))
        if current is not None and not overwrite:
            raise RegistryConflict(f"adapter {name!r} exists in the registry; send overwrite=true to replace it")
        kwargs: dict[str, Any] = {"Bucket": self.uri.bucket, "Key": self._record_key(name), "Body": record.body()}
        kwargs["ContentType"] = "application/json"
        if self.conditional_writes:
            if current is None:
                kwargs["IfNoneMatch"] = "*"
            else:
                kwargs["IfMatch"] = current
        try:
            out = self._call(f"publishing {name!r}", self.client.put_object, **kwargs)
        except ClientError as e:
            if _code(e) in ("PreconditionFailed", "ConditionalRequestConflict") or _status(e) in (409, 412):
                lost = "was published" if current is None else "was changed"
                raise RegistryConflict(
                    f"adapter {name!r} {lost} by another publisher at the same moment; that one won"
                    + ("" if current is None and not overwrite else " (retry to replace it)")
                ) from None
            raise self._fail(e, f"publishing {name!r}") from None
        return Record(name, str(out.get("ETag", "")), record.files, record.adapter, record.published_at)

    def remove(self, name: str) -> None:
        """Unpublish `name` (its record goes; requests running on it elsewhere finish). AdapterNotFound if absent."""
        from botocore.exceptions import ClientError

        check_name(name)
        if self._head(self._record_key(name)) is None:
            raise AdapterNotFound(f"adapter {name!r} is not in the registry {self.uri}")
        try:
            self._call(
                f"removing {name!r}", self.client.delete_object, Bucket=self.uri.bucket, Key=self._record_key(name)
            )
        except ClientError as e:
            raise self._fail(e, f"removing {name!r}") from None

    def download(self, record: Record, dest: Path) -> None:
        """Write `record`'s files into the empty folder `dest`, each checked against its sha256 and size while it
        streams; AdapterRefused on any mismatch (what was written stays for the caller to remove)."""
        from botocore.exceptions import ClientError

        for fname, f in sorted(record.files.items()):
            try:
                obj = self._call(
                    f"downloading {fname}",
                    self.client.get_object,
                    Bucket=self.uri.bucket,
                    Key=self._blob_key(f["sha256"]),
                )
            except ClientError as e:
                if _code(e) in ("NoSuchKey", "404", "NotFound"):
                    raise AdapterRefused(f"adapter {record.name!r}: the registry has no blob for its {fname}") from None
                raise self._fail(e, f"downloading {fname}") from None
            h = hashlib.sha256()
            size = 0
            with (dest / fname).open("wb") as out:
                while chunk := obj["Body"].read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    if size > int(f["size"]):
                        break
                    out.write(chunk)
            if size != int(f["size"]) or h.hexdigest() != f["sha256"]:
                raise AdapterRefused(
                    f"adapter {record.name!r}: its {fname} in the registry does not match the digest its record names "
                    "(corrupt or tampered); refused"
                )


def publish(
    registry: Registry, folder: Path, name: str, ref: BaseRef, max_rank: int, overwrite: bool = False
) -> Record:
    """Validate the adapter folder `folder` (a loraswap or a plain PEFT folder) for `ref` exactly as an upload is
    validated, then push it as `name`; nothing is written to the registry when it fails (AdapterError)."""
    import tempfile

    from loraswap.adapters.archive import prepare_folder

    with tempfile.TemporaryDirectory(prefix="loraswap-push-") as tmp:
        staged = Path(tmp)
        prepare_folder(folder, name, staged, ref, max_rank)
        return registry.push(staged, name, overwrite=overwrite)


def fetch(registry: Registry, record: Record, dest: Path, ref: BaseRef, max_rank: int) -> None:
    """Download `record` into the empty folder `dest` and run the full validation for `ref`; AdapterRefused
    when a blob or the adapter is bad (the caller removes `dest`)."""
    from loraswap.adapters.validate import validate_adapter

    registry.download(record, dest)
    manifest = read_manifest(dest)
    if manifest.name != record.name or manifest.weights_sha256 != record.files[WEIGHTS_FILE]["sha256"]:
        raise AdapterRefused(f"adapter {record.name!r}: its {MANIFEST_FILE} does not describe the published weights")
    problems = validate_adapter(dest, ref, max_rank=max_rank, weights_sha256=record.files[WEIGHTS_FILE]["sha256"])
    if problems:
        raise AdapterRefused(f"adapter {record.name!r} from the registry fails validation: " + "; ".join(problems))
