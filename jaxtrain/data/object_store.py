"""Files in object storage under one URL prefix (``s3://`` through boto3, ``gs://`` through
gcsfs), and downloads retried where a retry can help: what remote datasets, remote checkpoints
and Hugging Face folders in buckets are read and written through."""

from __future__ import annotations

import os
import threading
import time

from jaxtrain.config.schema import ConfigError

DEFAULT_DOWNLOAD_RETRY = 2
DEFAULT_PREDOWNLOAD_ROWS = 256
# First wait between download attempts; it doubles after each failure.
RETRY_BASE_SECONDS = 0.5
# An S3 endpoint that accepts a connection and never answers fails an attempt after this long
# (botocore's own default, 60 s with three attempts inside each of ours, kept a run silent for
# about ten minutes); a store that answers at all answers each read well within it.
S3_CONNECT_SECONDS = 10.0
S3_READ_SECONDS = 20.0
# The schemes ObjectStore reads: s3:// through boto3, gs:// through gcsfs, both tested; any other
# scheme fsspec has an implementation for (az://, hdfs://, ...) is passed to fsspec as it is, its
# package installed by the user. A scheme fsspec does not know is refused before anything loads.
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


def store_url_problem(url: str, local: str = "a local path") -> str | None:
    """Why ``url`` cannot be an ``ObjectStore`` (an unknown scheme, no bucket), or None;
    ``local`` says where a local path would go instead."""
    scheme, _, rest = url.partition("://")
    if scheme not in _BUCKET_SCHEMES:
        try:
            import fsspec

            known = scheme in fsspec.available_protocols()
        except ImportError:
            known = False
        if not known:
            return f"{scheme}:// is not a storage scheme jaxtrain can read; use s3://BUCKET/PATH, gs://BUCKET/PATH or {local}"
    if scheme in _BUCKET_SCHEMES and not rest.split("/", 1)[0]:
        return f"no bucket in the URL; write {scheme}://BUCKET/PATH"
    return None


class ObjectStore:
    """Files under one URL prefix: boto3 for ``s3://``, fsspec for any other scheme."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        scheme, _, rest = self.url.partition("://")
        self.scheme = scheme
        problem = store_url_problem(url)
        if problem:
            raise ConfigError(f"{url}: {problem}")
        self.bucket = rest.partition("/")[0] if scheme in _BUCKET_SCHEMES else ""
        self.endpoint = None
        if scheme == "s3":
            try:
                import boto3
            except ImportError:
                raise ConfigError(f"reading {url} needs boto3: pip install boto3") from None
            self.bucket, _, self.prefix = rest.partition("/")
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL") or None
            self.endpoint = endpoint
            from botocore.config import Config

            self._s3 = boto3.session.Session().client("s3", endpoint_url=endpoint, config=Config(
                connect_timeout=S3_CONNECT_SECONDS, read_timeout=S3_READ_SECONDS,
                retries={"mode": "standard", "total_max_attempts": 1}))  # retried here, with a message at the end
        else:
            try:
                import fsspec
            except ImportError:
                raise ConfigError(f"reading {url} needs fsspec: pip install fsspec") from None
            try:
                self._fs, self.prefix = fsspec.core.url_to_fs(self.url)
            except ImportError as err:  # the scheme's own package (gcsfs for gs://, ...) is not installed
                install = "pip install 'jaxtrain[gcs]'" if scheme in ("gs", "gcs") else "install it"
                raise ConfigError(f"{url} needs a package that is not installed ({describe_error(err)}); {install}") from None
            except ValueError as err:  # fsspec: "Protocol not known"
                raise ConfigError(f"{url}: {describe_error(err)}; use s3://, gs:// or a local path") from None
            except Exception as err:  # noqa: BLE001 - the scheme's package failed to start (hdfs:// without a JVM)
                raise ConfigError(f"{url}: cannot open its storage ({describe_error(err)}); use s3://, gs:// or a "
                                  f"local path, or set up what that scheme needs") from None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def get(self, name: str, path: str) -> None:
        """Download ``name`` to the local ``path`` (written beside it, then renamed into place)."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        partial = f"{path}.part-{os.getpid()}-{threading.get_ident()}"
        try:
            if self.scheme == "s3":
                self._s3.download_file(self.bucket, self._key(name), partial)
            else:
                self._fs.get_file(self._key(name), partial)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    def put(self, path: str, name: str) -> None:
        if self.scheme == "s3":
            self._s3.upload_file(path, self.bucket, self._key(name))
        else:
            parent = self._key(name).rsplit("/", 1)[0]
            self._fs.makedirs(parent, exist_ok=True)
            self._fs.put_file(path, self._key(name))

    def list(self, under: str = "", *, retries: int = 2) -> list[str]:
        """Names (relative to the prefix) of every file under ``under``; a listing that still fails
        after ``retries`` further attempts (0.5 s, 1 s, ... apart) is a one-line ``ConfigError``."""
        return sorted(self.describe(under, retries=retries))

    def describe(self, under: str = "", *, retries: int = 2) -> dict[str, str]:
        """``{name: "size:version"}`` of every file under ``under`` (names relative to the prefix), the
        version being what the store keeps to tell one upload from another (S3's ETag, GCS's etag
        or generation, else a modification time): a file written again differs. Failures are
        retried and reported as ``list``'s are."""
        for attempt in range(retries + 1):
            try:
                return self._describe(under)
            except Exception as error:  # noqa: BLE001 - credentials, network, throttling: each store its own types
                if attempt == retries or _not_transient(error):
                    raise ConfigError(f"cannot list {self.where(under) if under else self.url} ({describe_error(error)}); "
                                      f"check the URL, the endpoint and credentials") from None
                time.sleep(RETRY_BASE_SECONDS * 2 ** attempt)
        raise AssertionError("unreachable")

    def _describe(self, under: str) -> dict[str, str]:
        base = self._key(under).rstrip("/")
        strip = len(self.prefix) + 1 if self.prefix else 0
        described = {}
        if self.scheme == "s3":
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{base}/" if base else "")
            for page in pages:
                for item in page.get("Contents", []):
                    described[item["Key"][strip:]] = f"{item['Size']}:{item.get('ETag', '').strip(chr(34))}"
        else:
            self._fs.invalidate_cache()
            found = self._fs.find(base, detail=True) if self._fs.exists(base) else {}
            for name, info in found.items():
                version = next((info[key] for key in ("ETag", "etag", "md5Hash", "generation", "mtime",
                                                      "LastModified", "created") if info.get(key)), "")
                described[name[strip:]] = f"{info.get('size')}:{version}"
        return described

    def missing_bucket(self) -> str | None:
        """``no such bucket 'NAME'`` (with the endpoint asked) when the store says the URL's bucket
        does not exist; None when it exists, or when that cannot be told (no permission, no bucket)."""
        if not self.bucket:
            return None
        try:
            if self.scheme == "s3":
                self._s3.head_bucket(Bucket=self.bucket)
            else:
                self._fs.info(self.bucket)  # not exists(), which says False for a bucket it may not read either
        except Exception as error:  # noqa: BLE001 - each store its own error types
            if failure_kind(error) == "missing":
                return f"no such bucket {self.bucket!r}" + (f" at {self.endpoint}" if self.endpoint else "")
        return None

    def delete(self, names: list[str]) -> None:
        if self.scheme == "s3":
            for start in range(0, len(names), 1000):
                chunk = [{"Key": self._key(name)} for name in names[start:start + 1000]]
                self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk})
        else:
            for name in names:
                self._fs.rm_file(self._key(name))


def describe_error(error: BaseException) -> str:
    """``Type: first line`` of a storage error (these never carry the credentials themselves); a first
    line that only announces the next (``Parameter validation failed:``) is quoted with it."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return f"{type(error).__name__}: {line[:200]}"


# Error codes of S3 (and of stores speaking its protocol) for a missing object or bucket, and for
# requests the credentials may not make. A HEAD request (boto3's download_file starts with one)
# has no body, so its error code is the bare HTTP status.
_MISSING_CODES = ("404", "NoSuchKey", "NoSuchBucket", "NotFound")
_DENIED_CODES = ("403", "AccessDenied", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId",
                 "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken")


def failure_kind(error: BaseException) -> str | None:
    """``"missing"`` for an object or bucket that does not exist, ``"denied"`` for a request the
    credentials may not make, None for anything else (network, throttling, a server error)."""
    response = getattr(error, "response", None)
    code = str(((response.get("Error") or {}) if isinstance(response, dict) else {}).get("Code", ""))
    status = getattr(error, "code", None)  # gcsfs's HttpError
    if isinstance(error, FileNotFoundError) or code in _MISSING_CODES or status == 404:
        return "missing"
    if isinstance(error, PermissionError) or code in _DENIED_CODES or status == 403:
        return "denied"
    return None


def _not_transient(error: BaseException) -> bool:
    """Errors no retry can fix: no credentials, access denied, a missing bucket."""
    name = type(error).__name__
    return name in ("NoCredentialsError", "PartialCredentialsError", "PermissionError", "FileNotFoundError") or any(
        code in str(error) for code in ("AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch")
    ) or failure_kind(error) == "denied"


class RemoteMissing(ConfigError):
    """An object (or its bucket) that the store says does not exist; ``url`` names it, ``error``
    describes the store's answer."""

    def __init__(self, message: str, url: str, error: str):
        super().__init__(message)
        self.url, self.error = url, error


class RemoteDenied(ConfigError):
    """A download the credentials may not make (or no credentials at all)."""

    def __init__(self, message: str, url: str, error: str):
        super().__init__(message)
        self.url, self.error = url, error


def download_with_retry(store: ObjectStore, name: str, path: str, *, retries: int, what: str,
                        retry_missing: bool = False) -> None:
    """``store.get`` with up to ``retries`` further attempts after failures, waiting 0.5 s, 1 s, 2 s, ...

    Failures no wait can mend are not retried: a missing object or bucket (``RemoteMissing``),
    unless ``retry_missing`` (an object that should be there, which an upload may still be
    writing), and access denied or no credentials (``RemoteDenied``)."""
    url = store.where(name)
    for attempt in range(retries + 1):
        try:
            store.get(name, path)
            return
        except Exception as error:  # noqa: BLE001 - network, throttling, a missing object: each store its own types
            kind = failure_kind(error)
            if kind == "missing":
                if not retry_missing:
                    raise RemoteMissing(f"{what}: {url} does not exist ({describe_error(error)}); check the URL",
                                        url, describe_error(error)) from None
            elif kind == "denied" or _not_transient(error):
                raise RemoteDenied(f"{what}: cannot download {url} ({describe_error(error)}): access denied or no "
                                   f"credentials; check the credentials, the endpoint and the bucket's permissions",
                                   url, describe_error(error)) from None
            if attempt == retries:
                raise ConfigError(f"{what}: could not download {url} after {retries + 1} attempts "
                                  f"({describe_error(error)}); check the URL, the endpoint and credentials, or raise "
                                  f"extra.download_retry") from None
            time.sleep(RETRY_BASE_SECONDS * 2 ** attempt)
