"""Storage URIs: a local path or ``s3://bucket/prefix`` through boto3.

The S3 endpoint is configurable with ``KUBERANK_S3_ENDPOINT_URL`` (or boto3's own
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``), so MinIO, Ceph or a loopback test server work
the same as AWS. Local writes are atomic: work goes to a temporary sibling and is renamed
into place, so a failed step never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kuberank.errors import StorageError, StorageNotFound

S3_SCHEME = "s3://"


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = uri[len(S3_SCHEME) :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an S3 URI needs a bucket, as in s3://bucket/prefix")
    return bucket, key.strip("/")


def s3_client():
    import boto3  # local: boto3/botocore/pyarrow are heavy, only s3:// URIs need them
    from botocore.config import Config

    endpoint = os.environ.get("KUBERANK_S3_ENDPOINT_URL") or None
    config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3})
    return boto3.client("s3", endpoint_url=endpoint, config=config)


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        raise StorageError(f"{uri}: {exc.response.get('Error', {}).get('Message') or exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"{uri}: {exc}") from exc


def _s3_keys(client, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def check_writable(uri: str | os.PathLike) -> None:
    """Fail fast with a clear error when ``uri`` cannot take writes (bucket missing, endpoint
    unreachable, read-only directory)."""
    uri = str(uri)
    if not is_s3(uri):
        path = Path(uri)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{uri}: cannot create directory: {exc.strerror}") from exc
        if not os.access(path, os.W_OK):
            raise StorageError(f"{uri}: directory is not writable")
        return
    bucket, _ = split_s3(uri)
    with _s3_errors(uri):
        s3_client().head_bucket(Bucket=bucket)


def arrow_filesystem(uri: str):
    """(pyarrow filesystem, path) for ``uri``: what Ray Train's checkpoint storage takes, with
    the same S3 endpoint and credentials as boto3."""
    if not is_s3(uri):
        return None, str(Path(uri).resolve())
    import boto3
    from pyarrow import fs

    credentials = boto3.Session().get_credentials()
    frozen = credentials.get_frozen_credentials() if credentials else None
    endpoint = (
        os.environ.get("KUBERANK_S3_ENDPOINT_URL")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    options = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if frozen:
        options.update(
            access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token
        )
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        options.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    bucket, key = split_s3(uri)
    return fs.S3FileSystem(**options), f"{bucket}/{key}".rstrip("/")


def cache_dir() -> Path:
    """Where downloads go: ``$KUBERANK_CACHE``, else ``$XDG_CACHE_HOME/kuberank``, else
    ``~/.cache/kuberank``; where that cannot be written (a read-only root filesystem with no
    cache variable set), ``kuberank-cache-UID`` in the temporary directory (``$TMPDIR``)."""
    override = os.environ.get("KUBERANK_CACHE")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg else Path.home() / ".cache"
    wanted = root / "kuberank"
    try:
        wanted.mkdir(parents=True, exist_ok=True)
        if os.access(wanted, os.W_OK):
            return wanted
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"kuberank-cache-{os.getuid()}"


def _cache_root() -> Path:
    root = cache_dir() / "s3"
    root.mkdir(parents=True, exist_ok=True)
    return root


def materialize(uri: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """Return a local path holding ``uri``: the path itself (only read), or a fresh download of
    an S3 object (a file) or prefix (a directory) under ``cache`` (default: :func:`cache_dir`,
    where every download of ``uri`` replaces the previous one)."""
    uri = str(uri)
    if not is_s3(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise StorageNotFound(f"{uri}: no such file or directory")
        return path
    bucket, key = split_s3(uri)
    client = s3_client()
    root = Path(cache) if cache is not None else _cache_root()
    dest_root = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    with _s3_errors(uri):
        if key:
            try:
                client.head_object(Bucket=bucket, Key=key)
                dest = dest_root / Path(key).name
                with atomic_file(dest) as tmp:
                    client.download_file(bucket, key, str(tmp))
                return dest
            except Exception as exc:  # not an object: fall through to a prefix
                if not _is_not_found(exc):
                    raise
        prefix = f"{key}/" if key else ""
        keys = [k for k in _s3_keys(client, bucket, prefix) if not k.endswith("/")]
        if not keys:
            raise StorageNotFound(f"{uri}: no object or prefix with that name")
        with atomic_dir(dest_root / "tree") as tmp:
            for k in keys:
                local = tmp / k[len(prefix) :]
                local.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, k, str(local))
        return dest_root / "tree"


def materialize_if_present(
    uri: str | os.PathLike, cache: str | os.PathLike | None = None
) -> Path | None:
    """:func:`materialize`, or None when ``uri`` is absent (an optional part of a store). Only
    "not found" means absent: any other error (access denied, an unreachable endpoint) still
    raises, so a store that cannot be read is refused rather than served without that part."""
    try:
        return materialize(uri, cache)
    except StorageNotFound:
        return None


def _is_not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in {
        "404",
        "NoSuchKey",
        "NotFound",
    }


def publish(local: str | os.PathLike, uri: str | os.PathLike) -> str:
    """Copy a local file or directory to ``uri`` (a local path or an S3 prefix)."""
    local, uri = Path(local), str(uri)
    if not is_s3(uri):
        dest = Path(uri)
        if local.resolve() == dest.resolve():
            return uri
        if local.is_dir():
            with atomic_dir(dest) as tmp:
                shutil.copytree(local, tmp, dirs_exist_ok=True)
        else:
            with atomic_file(dest) as tmp:
                shutil.copyfile(local, tmp)
        return uri
    bucket, key = split_s3(uri)
    client = s3_client()
    files = [p for p in sorted(local.rglob("*")) if p.is_file()] if local.is_dir() else [local]
    with _s3_errors(uri):
        for path in files:
            rel = path.relative_to(local).as_posix() if local.is_dir() else ""
            target = "/".join(part for part in (key, rel) if part)
            client.upload_file(str(path), bucket, target)
    return uri


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is renamed over ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_files(paths: list[Path]) -> str:
    """One content hash over several files (names and bytes), order-independent."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
