"""The OSF side of the download: which addresses may be fetched, one HTTP request with BitMar's rules, and the
listing of the release's folder.

The listing comes from the OSF API v2 (JSON:API): the osfstorage root of the project lists the folder,
the folder's `relationships.files.links.related.href` lists its files page by page (`links.next`),
and every file carries `attributes.name`, `attributes.size` and `links.download`.

Only `https://` links are followed (listing pages, download links, redirects); plain `http://` is accepted for
loopback hosts only (127.0.0.1, ::1, localhost: the tests' fake OSF server). A listing with duplicate names, or names
with NUL bytes, control characters or path separators, is refused before anything is written. Transient failures
(timeouts, dropped connections, HTTP 408/425/429/5xx) raise `TransientError`, which the callers retry a bounded
number of times; everything else is a `DownloadError` naming the URL, the status and what to do.
Standard library only (urllib).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from bitmar.data import layout
from bitmar.data.errors import DataError

USER_AGENT = "bitmar-babylm-downloader/0.1 (+https://osf.io/ad7qg/)"
MAX_LISTING_PAGES = 1000  # guards against a `links.next` that never ends
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
HASH_ALGORITHMS = {"sha256": 64, "md5": 32}  # OSF's attributes.extra.hashes: name -> hex length
LOOPBACK_HOSTS = frozenset({"localhost"})
OSF_PROJECT_URL = f"https://osf.io/{layout.OSF_PROJECT}/"


class DownloadError(DataError):
    """A download that failed (network, server or size mismatch); the message says what happened and what to do."""


class TransientError(Exception):
    """A failure worth retrying (timeout, dropped connection, 5xx); never escapes the download (it is retried or
    becomes a DownloadError)."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of the OSF listing."""

    name: str
    size: int | None  # bytes as listed by OSF (None when the listing does not say)
    url: str  # links.download
    hashes: dict[str, str] = field(default_factory=dict)  # lowercase hex digests by algorithm (sha256, md5)


def log(message: str) -> None:
    # tqdm.write keeps messages from tearing an active progress bar.
    tqdm.write(message, file=sys.stderr)


def human_size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "size unknown"
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _http_error_message(url: str, code: int, reason: str, what: str) -> str:
    if code == 404:
        hint = (
            f"The file or folder is not (or no longer) at this address: open {OSF_PROJECT_URL} to check the release, "
            "and run `python download_babylm_data.py --list` to see the current listing."
        )
    elif code in (401, 403):
        hint = f"OSF refused access; check that {OSF_PROJECT_URL} is public and reachable from this network (proxy?)."
    elif code == 429:
        hint = "OSF is rate-limiting this address; wait a few minutes and rerun the same command (it resumes)."
    elif code >= 500:
        hint = "The server failed; wait a few minutes and rerun the same command (downloads resume from .part files)."
    else:
        hint = "Check the address, then rerun the same command."
    return f"HTTP {code} {reason} while {what}: {url}\n{hint}"


def backoff_sleep(attempt: int, backoff: float) -> None:
    if backoff > 0:
        time.sleep(min(backoff * 2 ** (attempt - 1), 60.0))


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, what: str) -> str:
    """`url` if it may be fetched: https anywhere, http only on a loopback host; a DownloadError otherwise."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "https" and parts.hostname:
        return url
    if scheme == "http" and _is_loopback(parts.hostname):
        return url  # a server on this machine (the tests' fake OSF): nothing crosses a network
    if scheme == "http":
        why = "plain http:// can be read and changed on the way; only https:// is followed (http only on loopback)"
    elif scheme in ("", "file") or not parts.hostname:
        why = "it is not a web address; a download link must not read files of this machine"
    else:
        why = f"the {scheme}:// scheme is not supported; only https:// is followed"
    raise DownloadError(
        f"refusing {what}: {url!r}: {why}. The OSF API serves https:// links only; check --base_url "
        f"(default {layout.OSF_API_BASE}) and {OSF_PROJECT_URL}."
    )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an address `check_url` accepts (no https -> http or file:// downgrade)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        check_url(newurl, f"the redirect from {req.full_url}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_CheckedRedirects())


# Exceptions that mean "the connection went wrong", as opposed to a definite answer from the server.
NETWORK_ERRORS = (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException, urllib.error.URLError)


def open_url(url: str, headers: dict[str, str], timeout: float, what: str) -> http.client.HTTPResponse:
    """urlopen that raises DownloadError for definite HTTP failures and TransientError for retryable ones."""
    check_url(url, what)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    try:
        return _OPENER.open(request, timeout=timeout)
    except DownloadError:
        raise  # a refused redirect
    except urllib.error.HTTPError as err:
        err.close()
        message = _http_error_message(url, err.code, str(err.reason), what)
        if err.code in TRANSIENT_HTTP:
            raise TransientError(message) from err
        if err.code == 416:
            raise  # the caller knows what an unsatisfiable range means for its file
        raise DownloadError(message) from err
    except NETWORK_ERRORS as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        raise TransientError(
            f"could not reach {url} while {what}: {reason}. Check the internet connection (and HTTPS_PROXY)."
        ) from err


def _get_json(url: str, *, timeout: float, retries: int, backoff: float) -> dict[str, Any]:
    for attempt in range(retries + 1):
        try:
            with open_url(
                url, {"Accept": "application/vnd.api+json, application/json"}, timeout, "listing OSF"
            ) as resp:
                body = resp.read()
            break
        except (TransientError, *NETWORK_ERRORS) as err:
            if attempt == retries:
                raise DownloadError(f"{err}\nGave up after {retries + 1} attempts.") from err
            log(f"retrying ({attempt + 1}/{retries}): {err}")
            backoff_sleep(attempt + 1, backoff)
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DownloadError(f"the OSF API answered {url} with non-JSON ({err}); try again later.") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise DownloadError(f"unexpected OSF API answer from {url}: no `data` list (is the base URL an OSF API?).")
    return payload


def _next_link(payload: dict[str, Any]) -> str | None:
    nxt = (payload.get("links") or {}).get("next")
    if isinstance(nxt, dict):  # JSON:API allows a link object instead of a string
        nxt = nxt.get("href")
    return nxt or None


def _iter_entries(url: str, *, timeout: float, retries: int, backoff: float) -> list[dict[str, Any]]:
    """All entries of a paginated OSF listing."""
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    next_url: str | None = url
    while next_url is not None:
        if next_url in seen or len(seen) >= MAX_LISTING_PAGES:
            raise DownloadError(f"the OSF listing at {url} paginates without end (page {next_url} repeats).")
        seen.add(next_url)
        payload = _get_json(next_url, timeout=timeout, retries=retries, backoff=backoff)
        entries.extend(e for e in payload["data"] if isinstance(e, dict))
        next_url = _next_link(payload)
    return entries


def _dig(entry: dict[str, Any], *keys: str) -> Any:
    value: Any = entry
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def list_remote_files(
    base_url: str = layout.OSF_API_BASE,
    project: str = layout.OSF_PROJECT,
    folder: str = layout.OSF_FOLDER,
    *,
    timeout: float = 60.0,
    retries: int = 4,
    backoff: float = 2.0,
) -> list[RemoteFile]:
    """Files directly inside `folder` of the project's osfstorage, in listing order."""
    root_url = f"{base_url.rstrip('/')}/v2/nodes/{project}/files/osfstorage/"
    kw = {"timeout": timeout, "retries": retries, "backoff": backoff}
    root = _iter_entries(root_url, **kw)
    folders = [e for e in root if _dig(e, "attributes", "kind") == "folder"]
    match = [e for e in folders if _dig(e, "attributes", "name") == folder]
    if not match:
        names = ", ".join(sorted(str(_dig(e, "attributes", "name")) for e in folders)) or "none"
        raise DownloadError(
            f"OSF project {project} has no folder `{folder}` in osfstorage ({root_url}); folders there: {names}. "
            f"Check {OSF_PROJECT_URL}: the release may have moved."
        )
    files_url = _dig(match[0], "relationships", "files", "links", "related", "href")
    if not isinstance(files_url, str):
        raise DownloadError(f"the OSF entry of folder `{folder}` has no relationships.files.links.related.href.")

    check_url(files_url, f"the listing of folder `{folder}`")
    files: list[RemoteFile] = []
    seen: set[str] = set()
    for entry in _iter_entries(files_url, **kw):
        if _dig(entry, "attributes", "kind") != "file":
            continue  # sub-folders are not part of the release layout
        name, size = _dig(entry, "attributes", "name"), _dig(entry, "attributes", "size")
        url = _dig(entry, "links", "download")
        if not isinstance(name, str) or not isinstance(url, str):
            raise DownloadError(f"malformed file entry in the OSF listing {files_url}: {json.dumps(entry)[:300]}")
        check_name(name, files_url)
        if name in seen:  # two entries would write the same local file, the second over the first
            raise DownloadError(
                f"the OSF listing {files_url} names {name!r} twice; refusing to guess which one is the release. "
                f"Check {OSF_PROJECT_URL} and report it if it persists."
            )
        seen.add(name)
        check_url(url, f"the download link of {name}")
        files.append(
            RemoteFile(
                name=name,
                size=int(size) if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None,
                url=url,
                hashes=_listed_hashes(entry, name, files_url),
            )
        )
    if not files:
        raise DownloadError(f"the OSF folder `{folder}` lists no files ({files_url}).")
    return files


def check_name(name: str, listing: str) -> str:
    """A listed file name that is safe as one local file name in data_dir; a DownloadError otherwise."""
    if not name or name in (".", ".."):
        problem = "an empty or dot name"
    elif "\x00" in name:
        problem = "a NUL byte"
    elif "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        problem = "a path separator (it could write outside the data directory)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "a control character"
    else:
        return name
    raise DownloadError(f"refusing the file name {name!r} from the OSF listing {listing}: it contains {problem}.")


def _listed_hashes(entry: dict[str, Any], name: str, listing: str) -> dict[str, str]:
    """md5 / sha256 from `attributes.extra.hashes` (lowercase hex); a malformed digest is refused."""
    listed = _dig(entry, "attributes", "extra", "hashes")
    hashes: dict[str, str] = {}
    if not isinstance(listed, dict):
        return hashes
    for algorithm, length in HASH_ALGORITHMS.items():
        value = listed.get(algorithm)
        if value is None:
            continue
        if not isinstance(value, str) or not re.fullmatch(rf"[0-9a-fA-F]{{{length}}}", value):
            raise DownloadError(f"the OSF listing {listing} gives {name} a malformed {algorithm}: {value!r}")
        hashes[algorithm] = value.lower()
    return hashes
