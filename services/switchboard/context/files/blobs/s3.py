"""The blob store on an S3-compatible object store, for deployments of several replicas.

Every replica sees the same bucket, so an upload staged through one replica can
be finished through another, and a blob published by one is read by all. The
bucket holds four kinds of thing:

- ``blobs/<sha256>``: published blobs, the only keys a reader ever asks for.
  A key appears there only whole and checked: by a single PUT of bytes whose
  hash was checked first, by completing a multipart upload whose hash was
  checked first, or by a server-side copy of a checked staging object. S3
  makes each of those visible atomically.
- ``staging/<upload>/<offset>``: a resumable upload, one object per appended
  chunk, keyed by its offset (zero-padded, so the listing is in offset order).
  A chunk is durable once its PUT returns, so any replica can take the upload
  over; an append retried at the same offset replaces its object.
- ``streams/<id>``: a streamed upload (UploadFile) once its multipart upload
  is complete and its hash checked, for the moment before it is copied to its
  blob key. Its parts are never visible before: an incomplete multipart upload
  has no object.
- Incomplete multipart uploads (a replica killed mid-commit or mid-stream)
  are invisible to readers; ``collect`` aborts those left untouched.
- ``collecting/<sha256>/<id>``: a collector about to delete that blob. It puts
  the marker before its last look at the blob (a HEAD: published again since it
  was listed?) and deletes it after the delete; a publish, once its blob has
  landed, lists the markers of its hash, waits while there are any, and lands
  the blob again if it is gone (``_settle``). S3 is strongly consistent, so one
  of the two sees the other: a publish that returned has its blob, on whichever
  replica the collector runs. A collector never deletes later than
  ``COLLECT_LIMIT_S`` after its marker, so a publish waits only for markers
  younger than that plus the requests' own time (a dead collector's marker is
  ignored, and removed by a later collection).

Every call to S3 is blocking (boto3) and runs on a bounded thread pool of the
store's own, never on the event loop; each has connect and read timeouts and a
bounded number of retries, so a dead or hung backend becomes BlobUnavailable in
bounded time instead of a hang. Memory stays flat: a commit or a streamed
upload holds at most one part (``PART_SIZE``), a read at most one chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import HTTPError as Urllib3Error

from switchboard.context.files.blobs.port import (
    BlobMismatch,
    BlobNotFound,
    BlobUnavailable,
    Published,
    ReferencedCheck,
    settle,
)
from switchboard.context.files.settings import FileSettings
from switchboard.platform.config import ConfigError

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

_T = TypeVar("_T")

MiB: Final = 1024 * 1024
#: What a read yields at a time (the port's bound).
CHUNK_SIZE: Final = 1 * MiB
#: A multipart upload's part. S3 wants at least 5 MiB for every part but the last;
#: larger parts mean fewer requests, and one part is all an upload holds in memory.
PART_SIZE: Final = 8 * MiB
#: A read asks for this much per ranged GET: a long download does not hold one
#: connection (and its pool slot) for its whole length.
READ_WINDOW: Final = 16 * MiB
#: Largest object one CopyObject may copy; above it the copy is done in parts.
MAX_COPY_SIZE: Final = 5 * 1024 * MiB
#: Attempts per call, the first included (botocore's "standard" retry mode backs off
#: with jitter and retries throttling, 5xx and connection errors).
MAX_ATTEMPTS: Final = 3
#: Keys one DeleteObjects call may name, and hashes or uploads asked of the
#: database at once by ``collect``.
BATCH: Final = 1000
#: Threads (and pooled connections) per store.
DEFAULT_WORKERS: Final = 16

#: A collector gives up on a blob (does not delete it) once this long has passed
#: since it put its marker; see the module doc.
COLLECT_LIMIT_S: Final = 15.0
#: How often a publish looks again while a collector's marker names its blob.
_SETTLE_POLL_S: Final = (0.01, 0.5)

_UPLOAD_ID = re.compile(r"[a-z0-9-]{1,128}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_OFFSET_DIGITS: Final = 20
_NOT_FOUND_CODES: Final = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchUpload"})
_BUCKET_MISSING_CODES: Final = frozenset({"NoSuchBucket", "NotFound", "404"})
_BUCKET_OURS_CODES: Final = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})


def _blob_key(sha256: str) -> str:
    # A name that cannot be a blob's names none (as in the directory store).
    if not _SHA256.fullmatch(sha256):
        raise BlobNotFound(sha256)
    return f"blobs/{sha256}"


def _staging_prefix(upload: str) -> str:
    if not _UPLOAD_ID.fullmatch(upload):
        raise BlobNotFound(upload)
    return f"staging/{upload}/"


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class _Missing(Exception):
    """A key or upload the backend does not have (turned into BlobNotFound or skipped)."""


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, ClientError) and (
        _code(exc) in _NOT_FOUND_CODES or (_status(exc) == 404 and _code(exc) != "NoSuchBucket")
    ):
        return _Missing(_code(exc))
    # Anything else the backend says (5xx after retries, access denied, a missing
    # bucket) is the store failing, never the client's request.
    code = _code(exc) if isinstance(exc, ClientError) else ""
    return BlobUnavailable(f"object store: {type(exc).__name__} {code}".strip())


def _close(source: Generator[bytes]) -> None:
    """Close a generator of staged bytes (its open response with it)."""
    # ValueError: still running on a thread, the task awaiting it was cancelled; its
    # response is closed when the generator is collected.
    with contextlib.suppress(ValueError):
        source.close()


@dataclass(frozen=True)
class _Staged:
    offset: int
    key: str
    size: int


class S3BlobStore:
    """Blobs in one bucket of an S3-compatible store (AWS S3, SeaweedFS, Ceph, ...)."""

    kind = "s3"

    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        region: str,
        access_key_id: str,
        secret_access_key: str,
        timeout_s: float,
        workers: int = DEFAULT_WORKERS,
        read_window: int = READ_WINDOW,
        max_copy_size: int = MAX_COPY_SIZE,
    ) -> None:
        config = Config(
            region_name=region,
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
            max_pool_connections=workers,
            tcp_keepalive=True,
            signature_version="s3v4",
            # Path-style addressing works on every S3-compatible server; virtual hosts
            # need DNS for each bucket.
            s3={"addressing_style": "path"},
            # Newer botocore adds CRC checksums to every upload by default, which not
            # every S3-compatible server accepts; the store checks SHA-256 itself.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session of our own: boto3's default session is shared and not thread-safe
        # to create clients from; the client itself is safe to share between threads.
        session = boto3.session.Session(
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret_access_key or None,
            region_name=region,
        )
        self._client: S3Client = session.client("s3", endpoint_url=endpoint, config=config)
        self._bucket = bucket
        self._read_window = read_window
        self._max_copy_size = max_copy_size
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-blobs")
        self._bucket_ready = False
        self._bucket_lock = asyncio.Lock()
        self._closed = False
        # A marker younger than this may belong to a collector still at work: its own
        # limit, and its delete's attempts (each as long as a request may take).
        self._marker_life_s = COLLECT_LIMIT_S + 2 * MAX_ATTEMPTS * timeout_s + 60.0

    @classmethod
    def from_settings(cls, settings: FileSettings, *, dev_mode: bool) -> S3BlobStore:
        """The store ``SWITCHBOARD_CONTEXT_S3_*`` describe (FileSettings checked their
        shape). Outside dev mode the credentials are required: an empty pair would fall
        back on whatever the AWS SDK finds in the environment, which a deployment must
        choose, not inherit by accident."""
        key_id = settings.context_s3_access_key_id.get_secret_value()
        secret = settings.context_s3_secret_access_key.get_secret_value()
        if not dev_mode and not (key_id and secret):
            raise ConfigError(
                "SWITCHBOARD_CONTEXT_S3_ACCESS_KEY_ID and SWITCHBOARD_CONTEXT_S3_SECRET_ACCESS_KEY "
                "are required with SWITCHBOARD_CONTEXT_BLOB_STORE=s3 outside dev mode"
            )
        return cls(
            endpoint=settings.context_s3_endpoint,
            bucket=settings.context_s3_bucket,
            region=settings.context_s3_region,
            access_key_id=key_id,
            secret_access_key=secret,
            timeout_s=settings.context_s3_timeout_s,
        )

    # -- plumbing ---------------------------------------------------------------------

    async def _run(self, function: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """``function(*args, **kwargs)`` on the store's threads; backend errors translated."""
        if self._closed:
            raise BlobUnavailable("the blob store is closed")
        loop = asyncio.get_running_loop()
        try:
            pending = loop.run_in_executor(self._executor, partial(function, *args, **kwargs))
        except RuntimeError as exc:
            # The executor refuses work once shut down (close() raced this call).
            raise BlobUnavailable("the blob store is closed") from exc
        try:
            return await pending
        except (BotoCoreError, ClientError, Urllib3Error, OSError) as exc:
            raise _translate(exc) from exc

    async def _call(self, function: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """Like ``_run`` once the bucket is known to exist; a missing key is BlobNotFound."""
        await self.ensure_bucket()
        try:
            return await self._run(function, *args, **kwargs)
        except _Missing as exc:
            raise BlobNotFound(str(exc)) from None

    async def ensure_bucket(self) -> None:
        """Create the bucket if it is missing; once per store (replicas race harmlessly)."""
        # An uncontended asyncio lock is taken without yielding: cheap on every call.
        async with self._bucket_lock:
            if self._bucket_ready:
                return
            try:
                await self._run(self._ensure_bucket_sync)
            except _Missing as exc:
                raise BlobUnavailable(f"object store: bucket {self._bucket}: {exc}") from None
            self._bucket_ready = True

    def _ensure_bucket_sync(self) -> None:
        try:
            self._client.head_bucket(Bucket=self._bucket)
            return
        except ClientError as exc:
            if _code(exc) not in _BUCKET_MISSING_CODES and _status(exc) != 404:
                raise
        region = self._client.meta.region_name
        try:
            if region and region != "us-east-1":
                self._client.create_bucket(
                    Bucket=self._bucket,
                    CreateBucketConfiguration={"LocationConstraint": region},  # type: ignore[typeddict-item]
                )
            else:
                self._client.create_bucket(Bucket=self._bucket)
            log.info("created the blob store's bucket %s", self._bucket)
        except ClientError as exc:
            # Another replica created it between our HEAD and our CREATE.
            if _code(exc) not in _BUCKET_OURS_CODES:
                raise

    # -- resumable uploads ------------------------------------------------------------

    async def stage(self, upload: str, offset: int, data: bytes) -> None:
        if offset < 0:
            raise ValueError("offset must not be negative")
        key = f"{_staging_prefix(upload)}{offset:0{_OFFSET_DIGITS}d}"
        await self._call(self._client.put_object, Bucket=self._bucket, Key=key, Body=data)

    def _list_staged(self, upload: str) -> list[_Staged]:
        """Every chunk object of ``upload``, in offset order (bounded by the upload's size
        limit: the domain never stages more than a file may hold)."""
        prefix = _staging_prefix(upload)
        staged: list[_Staged] = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self._bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix) :]
                if name.isdigit():
                    staged.append(_Staged(int(name), item["Key"], item["Size"]))
        staged.sort(key=lambda chunk: chunk.offset)
        return staged

    async def commit(self, upload: str, size: int, sha256: str) -> Published:
        if size < 0:
            raise ValueError("size must not be negative")
        await self._publish_staged(upload, size, sha256)
        # The staged chunks stay: the caller discards them once the file's row is
        # stored, and a second commit meanwhile publishes the same blob again.
        await self._settle(sha256, lambda: self._publish_staged(upload, size, sha256))
        return Published(sha256=sha256, size=size)

    async def _publish_staged(self, upload: str, size: int, sha256: str) -> None:
        staged = await self._call(self._list_staged, upload)
        if not staged:
            raise BlobNotFound(f"nothing staged for {upload}")
        chunks = self._contiguous(staged, size)
        target = f"blobs/{sha256}"
        if size <= PART_SIZE or not _SHA256.fullmatch(sha256):
            # (A name that is no SHA-256 matches no content: hashing tells it, nothing
            # is uploaded.)
            await self._commit_small(chunks, target, size, sha256)
        else:
            await self._commit_multipart(chunks, target, size, sha256)

    @staticmethod
    def _contiguous(staged: list[_Staged], size: int) -> list[_Staged]:
        """The chunks that make up the first ``size`` bytes, in order; where they do not
        (a gap, an overlap, too few bytes), as many as do: the hash then tells."""
        chunks: list[_Staged] = []
        expected = 0
        for chunk in staged:
            if expected >= size and chunks:
                break
            if chunk.offset != expected:
                break
            chunks.append(chunk)
            expected += chunk.size
        return chunks

    def _chunks(self, chunks: list[_Staged], size: int) -> Generator[bytes]:
        """The staged bytes, at most ``size`` of them, in pieces of at most CHUNK_SIZE
        (blocking: called on the store's threads)."""
        left = size
        for chunk in chunks:
            if left <= 0:
                return
            body = self._client.get_object(Bucket=self._bucket, Key=chunk.key)["Body"]
            try:
                while left > 0:
                    piece = body.read(min(CHUNK_SIZE, left))
                    if not piece:
                        break
                    left -= len(piece)
                    yield piece
            finally:
                body.close()

    def _read_part(self, source: Generator[bytes], hasher: Any) -> tuple[bytes, int]:
        """Up to PART_SIZE bytes from ``source``, hashed; (part, bytes read)."""
        pieces: list[bytes] = []
        length = 0
        for piece in source:
            hasher.update(piece)
            pieces.append(piece)
            length += len(piece)
            if length >= PART_SIZE:
                break
        return b"".join(pieces), length

    async def _commit_small(
        self, chunks: list[_Staged], target: str, size: int, sha256: str
    ) -> Published:
        hasher = hashlib.sha256()
        source = self._chunks(chunks, size)
        length = 0
        try:
            # One round unless the name is no SHA-256 and the size over a part: then
            # the rest is only hashed, a part at a time, to say what it is.
            while True:
                data, read = await self._call(self._read_part, source, hasher)
                length += read
                if not read or length >= size:
                    break
        finally:
            _close(source)
        digest = hasher.hexdigest()
        if length != size or digest != sha256:
            raise BlobMismatch(size=length, sha256=digest)
        await self._call(self._client.put_object, Bucket=self._bucket, Key=target, Body=data)
        return Published(sha256=sha256, size=size)

    async def _commit_multipart(
        self, chunks: list[_Staged], target: str, size: int, sha256: str
    ) -> Published:
        hasher = hashlib.sha256()
        source = self._chunks(chunks, size)
        created = await self._call(
            self._client.create_multipart_upload, Bucket=self._bucket, Key=target
        )
        upload_id = created["UploadId"]
        parts: list[CompletedPartTypeDef] = []
        total = 0
        completed = False
        try:
            while True:
                data, length = await self._call(self._read_part, source, hasher)
                if not length:
                    break
                total += length
                number = len(parts) + 1
                answer = await self._call(
                    self._client.upload_part,
                    Bucket=self._bucket,
                    Key=target,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                )
                del data
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            digest = hasher.hexdigest()
            if total != size or digest != sha256:
                raise BlobMismatch(size=total, sha256=digest)
            await self._call(
                self._client.complete_multipart_upload,
                Bucket=self._bucket,
                Key=target,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
            completed = True
        finally:
            _close(source)
            if not completed:
                await self._abort(target, upload_id)
        return Published(sha256=sha256, size=size)

    async def _abort(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload; a failure is left to ``collect`` (it is invisible)."""
        try:
            await self._call(
                self._client.abort_multipart_upload,
                Bucket=self._bucket,
                Key=key,
                UploadId=upload_id,
            )
        except (BlobUnavailable, BlobNotFound) as exc:
            log.warning("could not abort a multipart upload (collect will): %s", exc)

    async def discard(self, upload: str) -> None:
        staged = await self._call(self._list_staged, upload)
        await self._delete_keys([chunk.key for chunk in staged])

    async def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), BATCH):
            batch = keys[start : start + BATCH]
            await self._call(
                self._client.delete_objects,
                Bucket=self._bucket,
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )

    # -- streamed uploads -------------------------------------------------------------

    def open_writer(self) -> S3BlobWriter:
        return S3BlobWriter(self)

    # -- reading ----------------------------------------------------------------------

    async def read(self, sha256: str, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must not be negative")
        key = _blob_key(sha256)
        position = offset
        end: int | None = offset + limit if limit else None
        while end is None or position < end:
            window_end = position + self._read_window
            last = window_end if end is None else min(window_end, end)
            window = await self._get_range(key, position, last - 1)
            if window is None:
                return  # the offset is at or past the end
            body, total = window
            if end is None or end > total:
                end = total
            try:
                while True:
                    piece = await self._call(body.read, CHUNK_SIZE)
                    if not piece:
                        break
                    position += len(piece)
                    yield piece
            finally:
                body.close()
            if position >= total:
                return

    async def _get_range(self, key: str, first: int, last: int) -> tuple[Any, int] | None:
        """A streaming body of bytes ``first..last`` and the blob's size; None when
        ``first`` is past its end (S3 answers 416 to such a range)."""
        try:
            answer = await self._call(
                self._client.get_object, Bucket=self._bucket, Key=key, Range=f"bytes={first}-{last}"
            )
        except BlobUnavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and (
                _code(cause) == "InvalidRange" or _status(cause) == 416
            ):
                if await self.exists(key.removeprefix("blobs/")):
                    return None
                raise BlobNotFound(key) from None
            raise
        content_range = answer.get("ContentRange", "")
        total = (
            int(content_range.rsplit("/", 1)[1])
            if "/" in content_range
            else first + answer["ContentLength"]
        )
        return answer["Body"], total

    async def exists(self, sha256: str) -> bool:
        return await self._modified(sha256) is not None

    async def _modified(self, sha256: str) -> float | None:
        """When the blob was last published, or None if it is not."""
        try:
            answer = await self._call(
                self._client.head_object, Bucket=self._bucket, Key=_blob_key(sha256)
            )
        except BlobNotFound:
            return None
        return answer["LastModified"].timestamp()

    async def delete(self, sha256: str) -> None:
        if not _SHA256.fullmatch(sha256):
            return
        await self._call(self._client.delete_object, Bucket=self._bucket, Key=_blob_key(sha256))

    # -- collection -------------------------------------------------------------------

    async def collect(self, referenced: ReferencedCheck, *, grace_s: float) -> int:
        # LastModified is the server's clock; a skew between it and ours shifts the
        # grace period by as much, which is why the grace is far longer than any skew.
        cutoff = time.time() - grace_s
        removed = await self._collect_blobs(referenced, cutoff)
        removed += await self._collect_staging(referenced, cutoff)
        removed += await self._collect_streams(cutoff)
        removed += await self._collect_multipart(cutoff)
        await self._collect_markers(cutoff)
        return removed

    async def _pages(self, prefix: str) -> AsyncIterator[list[tuple[str, float]]]:
        """(key, last modified) of every object under ``prefix``, a page at a time."""
        token: str | None = None
        while True:
            arguments: dict[str, Any] = {"Bucket": self._bucket, "Prefix": prefix}
            if token:
                arguments["ContinuationToken"] = token
            page = await self._call(self._client.list_objects_v2, **arguments)
            yield [
                (item["Key"], item["LastModified"].timestamp()) for item in page.get("Contents", [])
            ]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    async def _collect_blobs(self, referenced: ReferencedCheck, cutoff: float) -> int:
        removed = 0
        async for page in self._pages("blobs/"):
            old = [key[len("blobs/") :] for key, modified in page if modified < cutoff]
            old = [sha for sha in old if _SHA256.fullmatch(sha)]
            if not old:
                continue
            kept = await referenced.blobs(old)
            for sha in old:
                if sha not in kept:
                    removed += await self._collect_blob(sha, cutoff)
        return removed

    async def _collect_blob(self, sha256: str, cutoff: float) -> int:
        """Delete the blob if it is still untouched since ``cutoff``, under a marker that
        publishes of the same hash wait for (see the module doc)."""
        marker = f"collecting/{sha256}/{uuid.uuid4().hex}"
        await self._call(self._client.put_object, Bucket=self._bucket, Key=marker, Body=b"")
        made = time.monotonic()
        try:
            # The last look, after the marker: a publish that landed before it shows
            # here (published again since it was listed: not an orphan); one that lands
            # after it sees the marker.
            modified = await self._modified(sha256)
            if modified is None or modified >= cutoff:
                return 0
            if time.monotonic() - made > COLLECT_LIMIT_S:
                return 0  # publishes may have stopped waiting for this marker
            await self.delete(sha256)
            return 1
        finally:
            try:
                await self._call(self._client.delete_object, Bucket=self._bucket, Key=marker)
            except (BlobUnavailable, BlobNotFound) as exc:
                # Publishes of this hash wait for it until it is older than their
                # patience; the next collection removes it.
                log.warning("could not delete a collector's marker: %s", exc)

    async def _collect_markers(self, cutoff: float) -> int:
        """Markers of collectors that died between putting them and deleting them."""
        old: list[str] = []
        async for page in self._pages("collecting/"):
            old += [key for key, modified in page if modified < cutoff]
        await self._delete_keys(old)
        return 0  # markers name blobs; they are not what was collected

    async def _being_collected(self, sha256: str) -> bool:
        """Whether a live collector's marker names the blob ``sha256``."""
        alive = time.time() - self._marker_life_s
        async for page in self._pages(f"collecting/{sha256}/"):
            if any(modified > alive for _, modified in page):
                return True
        return False

    async def _settle(self, sha256: str, republish: Callable[[], Awaitable[None]]) -> None:
        """After a publish landed: wait while a collector is at its blob, and land it
        again (``republish``) if that collector deleted it (``blobs.settle``)."""

        async def landed() -> bool:
            return await self._modified(sha256) is not None

        async def again() -> None:
            log.info("a blob was collected as it was published again; publishing it again")
            await republish()

        await settle(partial(self._being_collected, sha256), landed, again, poll_s=_SETTLE_POLL_S)

    async def _collect_staging(self, referenced: ReferencedCheck, cutoff: float) -> int:
        # The listing is in key order, so an upload's chunks come together; an upload is
        # untouched when its newest chunk is. Only (upload, newest) pairs are kept, a
        # batch at a time.
        newest: dict[str, float] = {}
        removed = 0

        async def judge(uploads: dict[str, float]) -> int:
            old = [upload for upload, modified in uploads.items() if modified < cutoff]
            if not old:
                return 0
            live = await referenced.uploads(old)
            dead = [upload for upload in old if upload not in live]
            for upload in dead:
                await self.discard(upload)
            return len(dead)

        async for page in self._pages("staging/"):
            for key, modified in page:
                upload = key[len("staging/") :].split("/", 1)[0]
                if not _UPLOAD_ID.fullmatch(upload):
                    continue
                if upload not in newest and len(newest) >= BATCH:
                    # A new upload in a listing in key order: every one before it has
                    # been seen whole.
                    removed += await judge(newest)
                    newest = {}
                newest[upload] = max(modified, newest.get(upload, 0.0))
        removed += await judge(newest)
        return removed

    async def _collect_streams(self, cutoff: float) -> int:
        # A completed stream object lives only between its hash check and its copy;
        # an old one is a replica that died in between.
        removed = 0
        async for page in self._pages("streams/"):
            old = [key for key, modified in page if modified < cutoff]
            await self._delete_keys(old)
            removed += len(old)
        return removed

    async def _collect_multipart(self, cutoff: float) -> int:
        removed = 0
        key_marker = ""
        upload_marker = ""
        while True:
            arguments: dict[str, Any] = {"Bucket": self._bucket}
            if key_marker:
                arguments["KeyMarker"] = key_marker
                arguments["UploadIdMarker"] = upload_marker
            page = await self._call(self._client.list_multipart_uploads, **arguments)
            for item in page.get("Uploads", []):
                if item["Initiated"].timestamp() >= cutoff:
                    continue
                # Started long ago, but parts may still be arriving (a long stream).
                if await self._last_part_time(item["Key"], item["UploadId"]) >= cutoff:
                    continue
                await self._abort(item["Key"], item["UploadId"])
                removed += 1
            if not page.get("IsTruncated"):
                return removed
            key_marker = page.get("NextKeyMarker", "")
            upload_marker = page.get("NextUploadIdMarker", "")
            if not key_marker:
                return removed

    async def _last_part_time(self, key: str, upload_id: str) -> float:
        try:
            page = await self._call(
                self._client.list_parts, Bucket=self._bucket, Key=key, UploadId=upload_id
            )
        except BlobNotFound:
            return float("inf")  # finished or aborted meanwhile: nothing to do
        times = [part["LastModified"].timestamp() for part in page.get("Parts", [])]
        return max(times, default=0.0)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Calls in flight finish on their threads (their timeouts bound them); no new one
        # starts. Waiting would block the loop, so the threads are left to end.
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()


class S3BlobWriter:
    """A streamed upload: parts of a multipart upload to ``streams/<id>``, hashed on the
    way; published by completing it and copying it to its blob key, server-side.

    A stream that ends within one part never starts a multipart upload: its bytes go
    straight to the blob key in one PUT once their hash is checked.
    """

    def __init__(self, store: S3BlobStore) -> None:
        self._store = store
        self._key = f"streams/{uuid.uuid4().hex}"
        # Chunks not yet sent, at most a part's worth (plus one chunk).
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._hasher = hashlib.sha256()
        self._size = 0
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        self._staged_object = False
        self._done = False

    @property
    def size(self) -> int:
        return self._size

    async def write(self, data: bytes) -> None:
        if self._done:
            raise BlobUnavailable("the writer was published or discarded")
        self._pending.append(bytes(data))
        self._pending_size += len(data)
        self._size += len(data)
        if self._pending_size >= PART_SIZE:
            # A part need not be exactly PART_SIZE, only at least 5 MiB: what is pending
            # goes whole, one copy, and the chunks are released.
            part = self._take_pending()
            if self._upload_id is None:
                store = self._store
                created = await store._call(
                    store._client.create_multipart_upload, Bucket=store._bucket, Key=self._key
                )
                self._upload_id = created["UploadId"]
            await self._upload_part(self._upload_id, part)

    def _take_pending(self) -> bytes:
        part = b"".join(self._pending)
        self._pending = []
        self._pending_size = 0
        return part

    def _hash_sync(self, data: bytes) -> None:
        # On the store's threads: hashlib releases the interpreter for large inputs.
        self._hasher.update(data)

    def _upload_part_sync(self, upload_id: str, number: int, part: bytes) -> str:
        self._hasher.update(part)
        answer = self._store._client.upload_part(
            Bucket=self._store._bucket,
            Key=self._key,
            UploadId=upload_id,
            PartNumber=number,
            Body=part,
        )
        return answer["ETag"]

    async def _upload_part(self, upload_id: str, part: bytes) -> None:
        number = len(self._parts) + 1
        etag = await self._store._call(self._upload_part_sync, upload_id, number, part)
        self._parts.append({"PartNumber": number, "ETag": etag})

    async def publish(self, sha256: str) -> Published:
        if self._done:
            raise BlobUnavailable("the writer was published or discarded")
        try:
            await self._publish(sha256)
        except BaseException:
            await self.discard()
            raise
        self._done = True
        return Published(sha256=sha256, size=self._size)

    async def _publish(self, sha256: str) -> None:
        store = self._store
        tail = self._take_pending()
        if self._upload_id is None:
            await store._call(self._hash_sync, tail)
        elif tail:
            await self._upload_part(self._upload_id, tail)
        digest = self._hasher.hexdigest()
        if digest != sha256:
            raise BlobMismatch(size=self._size, sha256=digest)
        target = _blob_key(sha256)
        if self._upload_id is None:

            async def put() -> None:
                await store._call(
                    store._client.put_object, Bucket=store._bucket, Key=target, Body=tail
                )

            await put()
            await store._settle(sha256, put)
        else:
            await self._publish_multipart(sha256, target)

    async def _publish_multipart(self, sha256: str, target: str) -> None:
        store = self._store
        await store._call(
            store._client.complete_multipart_upload,
            Bucket=store._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )
        self._upload_id = None
        self._staged_object = True
        await self._copy(target)
        # The stream object is the copy's source until the blob is settled.
        await store._settle(sha256, lambda: self._copy(target))
        await store._call(store._client.delete_object, Bucket=store._bucket, Key=self._key)
        self._staged_object = False

    async def _copy(self, target: str) -> None:
        """Copy the checked stream object to its blob key, server-side: the blob appears
        whole (a copy is atomic), and no byte passes through this process."""
        store = self._store
        source = {"Bucket": store._bucket, "Key": self._key}
        piece = store._max_copy_size
        if self._size <= piece:
            await store._call(
                store._client.copy_object, Bucket=store._bucket, Key=target, CopySource=source
            )
            return
        created = await store._call(
            store._client.create_multipart_upload, Bucket=store._bucket, Key=target
        )
        upload_id = created["UploadId"]
        parts: list[CompletedPartTypeDef] = []
        try:
            for number, first in enumerate(range(0, self._size, piece), start=1):
                last = min(first + piece, self._size) - 1
                answer = await store._call(
                    store._client.upload_part_copy,
                    Bucket=store._bucket,
                    Key=target,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=source,
                    CopySourceRange=f"bytes={first}-{last}",
                )
                parts.append({"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]})
            await store._call(
                store._client.complete_multipart_upload,
                Bucket=store._bucket,
                Key=target,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            await store._abort(target, upload_id)
            raise

    async def discard(self) -> None:
        # Safe after publish and twice; a failure is logged, not raised: discard runs on
        # error paths, and what it could not remove is invisible and collected later.
        self._done = True
        self._take_pending()
        store = self._store
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            await store._abort(self._key, upload_id)
        if self._staged_object:
            self._staged_object = False
            try:
                await store._call(store._client.delete_object, Bucket=store._bucket, Key=self._key)
            except (BlobUnavailable, BlobNotFound) as exc:
                log.warning("could not delete a stream's staging object (collect will): %s", exc)
