"""The item store's shared remote: entries on S3 or an S3-compatible server, through s3fs.

`open_store(root, url, endpoint_url)` is how the runner builds the store from params.yaml's `store`
section: a local `ItemStore` when `store.url` is null, else one whose `RemoteStore` holds the
entries at `s3://<bucket>/<prefix>/<kind>/<key[:2]>/<key><suffix>` (the local layout).

Credentials are never in params.yaml: botocore reads them where it always does
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, an instance role), on the
machine that uses the store. The endpoint is `store.endpoint_url`, else AWS_ENDPOINT_URL, else
AWS. The s3fs filesystem is made on first use, in the process that uses it, and is not pickled:
a store sent to a worker (another process or machine) connects there with that machine's
credentials.

An S3 PUT (multipart uploads included) makes an object appear whole or not at all, so a key is
complete or absent; an entry of several files is complete once its last file is there (the
stages write e.g. the `.png`, then the `.json`), exactly as in the local folder.

A wrong URL or endpoint, missing or refused credentials, a missing bucket or an endpoint that
does not answer raise `InputError` naming `store.url` or `store.endpoint_url`.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit
from typing import TYPE_CHECKING, Any

from loraforge.errors import InputError
from loraforge.store.items import ItemStore

if TYPE_CHECKING:
    import s3fs

ENDPOINT_ENV = "AWS_ENDPOINT_URL"
# Three tries in all, with botocore's standard backoff: a down endpoint fails in ~2 s, not ~8 s.
BOTO_CONFIG: dict[str, Any] = {
    "connect_timeout": 10,
    "read_timeout": 60,
    "retries": {"total_max_attempts": 3, "mode": "standard"},
}


S3_URL = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>[^?#]*))?$")


def parse_store_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix` (the prefix may be empty).

    Args:
        url: the `store.url` value.

    Raises:
        ValueError: the URL is not `s3://` with a valid bucket name.
    """
    found = S3_URL.match(url)
    if found is None:
        raise ValueError(
            "expected s3://bucket/prefix (bucket: 3-63 lowercase letters, digits, dots, dashes; "
            "only S3 and S3-compatible servers are supported)"
        )
    return found["bucket"], (found["prefix"] or "").strip("/")


def check_endpoint_url(url: str) -> str:
    """`url` if it is an `http(s)://host[:port]` endpoint.

    Args:
        url: the endpoint (`store.endpoint_url` or `AWS_ENDPOINT_URL`).

    Raises:
        ValueError: no http/https scheme or no host.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected http(s)://host[:port], e.g. http://127.0.0.1:8333")
    return url


class RemoteStore:
    """Entries under `s3://bucket/prefix`, fetched and uploaded one file at a time.

    Args:
        url: `s3://bucket/prefix` (`store.url`).
        endpoint_url: the S3 endpoint (`store.endpoint_url`); None = AWS_ENDPOINT_URL, else AWS.
    """

    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        try:
            self.bucket, self.prefix = parse_store_url(url)
        except ValueError as e:
            raise InputError(f"`store.url` = {url!r}: {e}") from None
        try:
            if endpoint_url is not None:
                check_endpoint_url(endpoint_url)
        except ValueError as e:
            raise InputError(f"`store.endpoint_url` = {endpoint_url!r}: {e}") from None
        self.url = url
        self.endpoint_url = endpoint_url
        self._fs: s3fs.S3FileSystem | None = None
        self._fs_pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_fs_pid": None}  # connect again where unpickled

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r}, endpoint_url={self.endpoint_url!r})"

    def endpoint(self) -> str | None:
        """The endpoint in use: `store.endpoint_url`, else AWS_ENDPOINT_URL, else None (AWS)."""
        if self.endpoint_url is not None:
            return self.endpoint_url
        from_env = os.environ.get(ENDPOINT_ENV) or None
        if from_env is not None:
            try:
                check_endpoint_url(from_env)
            except ValueError as e:
                raise InputError(f"{ENDPOINT_ENV} (used for `store.endpoint_url`) = {from_env!r}: {e}") from None
        return from_env

    def filesystem(self) -> s3fs.S3FileSystem:
        """The s3fs filesystem, made on first use in this process (after a fork, made again)."""
        if self._fs is None or self._fs_pid != os.getpid():
            import s3fs

            self._fs = s3fs.S3FileSystem(
                endpoint_url=self.endpoint(), skip_instance_cache=True, config_kwargs=copy.deepcopy(BOTO_CONFIG)
            )  # a copy: botocore edits the retries dict it is given
            self._fs_pid = os.getpid()
        return self._fs

    def fetch(self, rel: str, dest: Path) -> bool:
        """Download entry file `rel` to `dest`; False when the remote does not have it.

        Args:
            rel: the file's path in the store (`<kind>/<key[:2]>/<key><suffix>`).
            dest: the local file to write (a temp file the store renames into place).
        """
        with self.errors():
            try:
                self.filesystem().get_file(self._key(rel), str(dest))
            except FileNotFoundError:
                return False
        return True

    def upload(self, src: Path, rel: str) -> None:
        """Upload `src` as entry file `rel` (one PUT, or a multipart upload for big files: the
        object appears whole or not at all).

        Args:
            src: the local file.
            rel: the file's path in the store.
        """
        with self.errors():
            try:
                self.filesystem().put_file(str(src), self._key(rel))
            except FileNotFoundError:
                raise InputError(f"`store.url` {self.url}: bucket `{self.bucket}` does not exist") from None

    def check(self) -> None:
        """One request before any work: the endpoint answers, the credentials are accepted and
        the bucket exists (HEAD bucket; needs s3:ListBucket on it, as a DVC remote does)."""
        with self.errors():
            try:
                self.filesystem().call_s3("head_bucket", Bucket=self.bucket)
            except FileNotFoundError:
                raise InputError(
                    f"`store.url` {self.url}: bucket `{self.bucket}` does not exist at {self._where()}"
                ) from None

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Turn what a user can fix (credentials, endpoint) into `InputError`s naming the setting."""
        from botocore.exceptions import ConnectionError, HTTPClientError, NoCredentialsError, PartialCredentialsError

        try:
            yield
        except (NoCredentialsError, PartialCredentialsError) as e:
            raise InputError(
                f"`store.url` {self.url}: no S3 credentials ({e}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY in the environment (or AWS_PROFILE), never in params.yaml"
            ) from None
        except PermissionError as e:
            raise InputError(
                f"`store.url` {self.url}: access refused by {self._where()} ({e}); check AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY and the bucket's permissions"
            ) from None
        except (ConnectionError, HTTPClientError) as e:
            raise InputError(f"{self._endpoint_key()} {self._where()}: the S3 endpoint does not answer ({e})") from None

    def _key(self, rel: str) -> str:
        return "/".join(part for part in (self.bucket, self.prefix, rel) if part)

    def _where(self) -> str:
        return self.endpoint() or "AWS S3"

    def _endpoint_key(self) -> str:
        if self.endpoint_url is None and os.environ.get(ENDPOINT_ENV):
            return f"`store.endpoint_url` (from {ENDPOINT_ENV})"
        return "`store.endpoint_url`"


def open_store(root: Path, url: str | None, endpoint_url: str | None = None) -> ItemStore:
    """The item store the runner hands to stages: `root` alone, or `root` as the local copy of
    the shared store at `store.url` (checked with one request, so a bad setting stops the run
    before any work).

    Args:
        root: the local folder (`<project>/.loraforge/store`).
        url: `store.url`: None for a store of this machine only, else `s3://bucket/prefix`.
        endpoint_url: `store.endpoint_url` (None: `AWS_ENDPOINT_URL` or AWS itself).
    """
    if url is None:
        return ItemStore(root)
    remote = RemoteStore(url, endpoint_url)
    remote.check()
    return ItemStore(root, remote)
