"""BabyLM downloader against a fake OSF API on 127.0.0.1 (loopback only, no internet)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bitmar.data import download as dl
from bitmar.data.errors import DataError

REPO = Path(__file__).resolve().parents[1]
FOLDER_ID = "5f00folder"
ROOT_PATH = "/v2/nodes/ad7qg/files/osfstorage/"
FOLDER_PATH = f"/v2/nodes/ad7qg/files/osfstorage/{FOLDER_ID}/"


def _content(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed * 7 + (i >> 8)) % 251 for i in range(n))


@dataclass
class FakeOSF:
    """Serves a two-page OSF listing and the files; `behavior[name]` picks how a download misbehaves."""

    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    listed_size: dict[str, int | None] = field(default_factory=dict)  # overrides the size in the listing
    listed_hashes: dict[str, dict | None] = field(default_factory=dict)  # overrides attributes.extra.hashes
    links: dict[str, str] = field(default_factory=dict)  # overrides links.download
    extra_entries: list[dict] = field(default_factory=list)  # raw entries appended to the last listing page
    # ok | ignore_range | close_early | status:<code> | no_length (no Content-Length: the close ends the body)
    # | cut_no_length (sends half, no Content-Length: a truncation nothing but a hash can reveal)
    behavior: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    body_bytes: dict[str, int] = field(default_factory=dict)  # file bytes sent per name
    redirect: bool = False  # /download/<name> answers 302 -> /blob/<name>, like OSF -> its storage backend
    redirect_base: str = ""  # where the redirect points (default: this server)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def entry(self, name: str) -> dict:
        size = self.listed_size.get(name, len(self.files[name]))
        data = self.files[name]
        hashes = self.listed_hashes.get(
            name, {"md5": hashlib.md5(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest()}
        )
        return {
            "id": f"id-{name}",
            "type": "files",
            "attributes": {
                "kind": "file",
                "name": name,
                "size": size,
                "materialized_path": f"/multimodal_data/{name}",
                "extra": {"hashes": hashes} if hashes is not None else {},
            },
            "links": {"download": self.links.get(name, f"{self.base}/download/{name}")},
        }

    def folder(self, name: str, fid: str) -> dict:
        href = f"{self.base}/v2/nodes/ad7qg/files/osfstorage/{fid}/"
        return {
            "id": fid,
            "type": "files",
            "attributes": {"kind": "folder", "name": name, "size": None},
            "relationships": {"files": {"links": {"related": {"href": href, "meta": {}}}}},
        }


def _make_handler(osf: FakeOSF) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def _json(self, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.api+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            rng = self.headers.get("Range")
            with osf.lock:
                osf.requests.append((self.path, rng))
            if self.path == ROOT_PATH:
                other = osf.folder("other_data", "5f00other")
                self._json({"data": [other, osf.folder("multimodal_data", FOLDER_ID)], "links": {"next": None}})
            elif self.path in (FOLDER_PATH, FOLDER_PATH + "?page=2"):
                names = list(osf.files)
                sub = osf.folder("nested", "5f00nested")
                if self.path == FOLDER_PATH:  # page 1: first two files plus a sub-folder, link to page 2
                    data, nxt = [osf.entry(n) for n in names[:2]] + [sub], f"{osf.base}{FOLDER_PATH}?page=2"
                else:
                    data, nxt = [osf.entry(n) for n in names[2:]] + osf.extra_entries, None
                self._json({"data": data, "links": {"first": None, "next": nxt, "meta": {"total": len(names)}}})
            elif self.path.startswith("/download/") and osf.redirect:
                self.send_response(302)
                target = osf.redirect_base or osf.base
                self.send_header("Location", f"{target}/blob/{self.path.removeprefix('/download/')}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path.startswith(("/download/", "/blob/")):
                self._download(self.path.split("/", 2)[2], rng)
            else:
                self.send_error(404)

        def _download(self, name: str, rng: str | None) -> None:
            mode = osf.behavior.get(name, "ok")
            if mode.startswith("status:"):
                self.send_error(int(mode.split(":")[1]))
                return
            data = osf.files[name]
            start = 0
            if rng and mode != "ignore_range":
                start = int(rng.removeprefix("bytes=").rstrip("-"))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            if mode not in ("no_length", "cut_no_length"):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if mode in ("close_early", "cut_no_length"):  # sends half and hangs up (HTTP/1.0 closes)
                body = body[: max(len(body) // 2, 1)]
            # Counted before the bytes leave: the client can finish (and the test assert) the moment they arrive.
            with osf.lock:
                osf.body_bytes[name] = osf.body_bytes.get(name, 0) + len(body)
            self.wfile.write(body)

    return Handler


@pytest.fixture
def osf() -> Iterator[FakeOSF]:
    fake = FakeOSF(
        files={
            "train_50M.zip": _content(5000, 1),
            "cc_3M_captions.json": _content(3000, 2),
            "cc_3M_dino_v2_states_1of2.npy": _content(4096, 3),  # on page 2 of the listing
        }
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(fake))
    fake.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _get(osf: FakeOSF, data_dir: Path, only: list[str] | None = None, retries: int = 2) -> list[Path]:
    return dl.download_dataset(data_dir, only, base_url=osf.base, timeout=5, retries=retries, backoff=0, progress=False)


def _downloads(osf: FakeOSF, name: str) -> list[str | None]:
    return [rng for path, rng in osf.requests if path == f"/download/{name}"]


def test_listing_follows_folder_and_pagination(osf: FakeOSF) -> None:
    files = dl.list_remote_files(osf.base, timeout=5, retries=0, backoff=0)
    assert [f.name for f in files] == list(osf.files)  # page 2 included, sub-folder skipped
    assert [f.size for f in files] == [len(b) for b in osf.files.values()]
    assert files[0].url == f"{osf.base}/download/train_50M.zip"


def test_full_download(osf: FakeOSF, tmp_path: Path) -> None:
    paths = _get(osf, tmp_path)
    assert [p.name for p in paths] == list(osf.files)
    for name, data in osf.files.items():
        assert (tmp_path / name).read_bytes() == data
    assert not list(tmp_path.glob("*.part"))
    # A second run finds everything complete and downloads nothing.
    osf.requests.clear()
    _get(osf, tmp_path)
    assert not [p for p, _ in osf.requests if p.startswith("/download/")]


def test_resume_requests_only_the_rest(osf: FakeOSF, tmp_path: Path) -> None:
    name = "train_50M.zip"
    data = osf.files[name]
    (tmp_path / f"{name}.part").write_bytes(data[:2000])
    _get(osf, tmp_path, only=[name])
    assert _downloads(osf, name) == ["bytes=2000-"]
    assert osf.body_bytes[name] == len(data) - 2000
    assert (tmp_path / name).read_bytes() == data
    assert not (tmp_path / f"{name}.part").exists()


def test_resume_through_a_redirect_keeps_the_range(osf: FakeOSF, tmp_path: Path) -> None:
    name = "train_50M.zip"
    data = osf.files[name]
    osf.redirect = True
    (tmp_path / f"{name}.part").write_bytes(data[:1234])
    _get(osf, tmp_path, only=[name])
    assert _downloads(osf, name) == ["bytes=1234-"]
    assert [rng for path, rng in osf.requests if path == f"/blob/{name}"] == ["bytes=1234-"]
    assert (tmp_path / name).read_bytes() == data


def test_server_ignoring_range_restarts_the_file(osf: FakeOSF, tmp_path: Path) -> None:
    name = "cc_3M_captions.json"
    data = osf.files[name]
    osf.behavior[name] = "ignore_range"
    (tmp_path / f"{name}.part").write_bytes(b"\xff" * 1000)  # wrong bytes: appending would corrupt the file
    _get(osf, tmp_path, only=[name])
    assert _downloads(osf, name) == ["bytes=1000-"]
    assert (tmp_path / name).read_bytes() == data


def test_part_larger_than_listing_starts_over(osf: FakeOSF, tmp_path: Path) -> None:
    name = "cc_3M_captions.json"
    (tmp_path / f"{name}.part").write_bytes(b"x" * 9999)
    _get(osf, tmp_path, only=[name])
    assert _downloads(osf, name) == [None]
    assert (tmp_path / name).read_bytes() == osf.files[name]


def test_connection_closed_early_is_retried_then_fails_clearly(osf: FakeOSF, tmp_path: Path) -> None:
    name = "train_50M.zip"
    data = osf.files[name]
    osf.behavior[name] = "close_early"
    with pytest.raises(dl.DownloadError) as exc:
        _get(osf, tmp_path, only=[name], retries=2)
    msg = str(exc.value)
    assert name in msg and "3 attempts" in msg and "rerun" in msg
    # Every retry resumed where the previous one stopped: 2500, then 1250 of the rest, then 625.
    assert _downloads(osf, name) == [None, "bytes=2500-", "bytes=3750-"]
    assert not (tmp_path / name).exists()
    part = (tmp_path / f"{name}.part").read_bytes()
    assert len(part) == 4375 and part == data[:4375]  # kept for the next run
    # The next run (server healthy again) resumes and completes.
    osf.behavior[name] = "ok"
    _get(osf, tmp_path, only=[name])
    assert (tmp_path / name).read_bytes() == data


def test_server_file_shorter_than_listing_fails(osf: FakeOSF, tmp_path: Path) -> None:
    name = "cc_3M_captions.json"
    osf.listed_size[name] = 3500  # listing promises 500 bytes the server does not have
    with pytest.raises(dl.DownloadError) as exc:
        _get(osf, tmp_path, only=[name])
    msg = str(exc.value)
    assert name in msg and "3500" in msg and "shorter than listed" in msg
    assert _downloads(osf, name) == [None, "bytes=3000-"]  # second request gets 416
    assert not (tmp_path / name).exists()
    assert (tmp_path / f"{name}.part").stat().st_size == 3000


def test_http_500_is_retried_then_names_url_and_status(osf: FakeOSF, tmp_path: Path) -> None:
    name = "train_50M.zip"
    osf.behavior[name] = "status:500"
    with pytest.raises(dl.DownloadError) as exc:
        _get(osf, tmp_path, only=[name], retries=2)
    msg = str(exc.value)
    assert "HTTP 500" in msg and f"{osf.base}/download/{name}" in msg and "rerun" in msg
    assert len(_downloads(osf, name)) == 3
    assert not (tmp_path / name).exists()


def test_http_404_fails_at_once(osf: FakeOSF, tmp_path: Path) -> None:
    name = "train_50M.zip"
    osf.behavior[name] = "status:404"
    with pytest.raises(dl.DownloadError) as exc:
        _get(osf, tmp_path, only=[name], retries=3)
    msg = str(exc.value)
    assert "HTTP 404" in msg and f"{osf.base}/download/{name}" in msg and "--list" in msg
    assert len(_downloads(osf, name)) == 1  # a definite answer is not retried
    assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.part").exists()


def test_listing_404_names_url(osf: FakeOSF, tmp_path: Path) -> None:
    with pytest.raises(dl.DownloadError) as exc:
        dl.list_remote_files(osf.base, project="nope1", timeout=5, retries=0, backoff=0)
    assert "HTTP 404" in str(exc.value) and "/v2/nodes/nope1/files/osfstorage/" in str(exc.value)


def test_missing_folder_lists_available(osf: FakeOSF) -> None:
    with pytest.raises(dl.DownloadError, match="no folder `elsewhere`.*multimodal_data"):
        dl.list_remote_files(osf.base, folder="elsewhere", timeout=5, retries=0, backoff=0)


def test_unknown_only_name_lists_available(osf: FakeOSF, tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        _get(osf, tmp_path, only=["train_50M.zip", "train_100M.zip"])
    msg = str(exc.value)
    assert "train_100M.zip" in msg and "Available: train_50M.zip, cc_3M_captions.json" in msg
    assert not isinstance(exc.value, dl.DownloadError)  # a usage error (exit 2), not a network failure
    assert not [p for p, _ in osf.requests if p.startswith("/download/")]


def test_cli_exit_codes_and_messages(osf: FakeOSF, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--data_dir", str(tmp_path), "--base_url", osf.base, "--timeout", "5", "--backoff", "0", "--no_progress"]
    assert dl.main([*base, "--list"]) == 0
    out = capsys.readouterr().out
    assert "cc_3M_dino_v2_states_1of2.npy" in out and "4.1 KB" in out and "total" in out

    osf.behavior["train_50M.zip"] = "status:503"
    assert dl.main([*base, "--retries", "0", "--only", "train_50M.zip"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 503" in err and "Traceback" not in err

    assert dl.main([*base, "--only", "cc_3M_captions.json"]) == 0
    assert (tmp_path / "cc_3M_captions.json").read_bytes() == osf.files["cc_3M_captions.json"]
    assert "test_dataset_compatibility.py" in capsys.readouterr().out


def test_script_unknown_name_exits_2_without_traceback(osf: FakeOSF, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "download_babylm_data.py"),
            "--data_dir",
            str(tmp_path),
            "--base_url",
            osf.base,
            "--only",
            "nope.zip",
            "--timeout",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "nope.zip" in proc.stderr and "Available:" in proc.stderr and "Traceback" not in proc.stderr


def test_data_dir_that_is_a_file_is_a_usage_error(osf: FakeOSF, tmp_path: Path, capsys) -> None:
    target = tmp_path / "afile"
    target.write_text("x")
    assert dl.main(["--data_dir", str(target), "--base_url", osf.base, "--backoff", "0", "--no_progress"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_cli_test_writes_a_sample_that_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bitmar.data import layout
    from bitmar.data.verify import verify_dataset

    small = ["--num_cc3m", "40", "--num_local_narratives", "10", "--num_text_lines", "60", "--num_novel_episodes", "4"]
    data_dir = tmp_path / "sample"
    assert dl.main(["--data_dir", str(data_dir), "--test", "--feature_dim", "32", *small]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in layout.ALL_FILES) and "test_dataset_compatibility.py" in out
    report = verify_dataset(data_dir, feature_dim=32, require_local_narratives=True)
    assert report.usable and not report.warnings
    assert sum(r.rows for r in report.rows if r.source == "cc3m features") == 40
    # Rerunning over a sample world is allowed; over a real download it is refused unless --overwrite.
    assert dl.main(["--data_dir", str(data_dir), "--test", "--feature_dim", "32", *small]) == 0
    real = tmp_path / "real"
    real.mkdir()
    (real / layout.CC3M_CAPTIONS).write_text('["a real caption"]')
    assert dl.main(["--data_dir", str(real), "--test", *small]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (real / layout.CC3M_CAPTIONS).read_text() == '["a real caption"]'
    assert dl.main(["--data_dir", str(real), "--test", "--overwrite", *small]) == 0
    assert (real / layout.CC3M_CAPTIONS).read_text() != '["a real caption"]'


@pytest.mark.parametrize(
    "args", [["--test", "--only", "x.zip"], ["--overwrite"], ["--list", "--test"], ["--retries", "-1"]]
)
def test_cli_rejects_contradictory_flags(args: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        dl.main(["--data_dir", str(tmp_path), *args])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------------------------
# Downloads are what the server says they are
# ---------------------------------------------------------------------------------------------------------------


def test_listing_carries_the_osf_hashes(osf: FakeOSF) -> None:
    files = dl.list_remote_files(osf.base, timeout=5, retries=0, backoff=0)
    data = osf.files["train_50M.zip"]
    assert files[0].hashes == {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}


def test_hash_mismatch_after_download_is_refused_and_not_kept(osf: FakeOSF, tmp_path: Path) -> None:
    name = "cc_3M_captions.json"
    osf.listed_hashes[name] = {"sha256": "0" * 64}
    with pytest.raises(dl.DownloadError) as exc:
        _get(osf, tmp_path, only=[name])
    msg = str(exc.value)
    assert "does not match the hash" in msg and "sha256" in msg and "deleted" in msg
    assert f"python download_babylm_data.py --data_dir {tmp_path} --only {name}" in msg
    assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.part").exists()
    osf.listed_hashes[name] = {"md5": "f" * 32}  # md5 alone is checked too
    with pytest.raises(dl.DownloadError, match="md5"):
        _get(osf, tmp_path, only=[name])


def test_same_size_file_with_other_content_is_not_complete(osf: FakeOSF, tmp_path: Path) -> None:
    name = "train_50M.zip"
    data = osf.files[name]
    (tmp_path / name).write_bytes(bytes(len(data)))  # right size, wrong bytes
    _get(osf, tmp_path, only=[name])
    assert _downloads(osf, name) == [None]  # downloaded again, from the start
    assert (tmp_path / name).read_bytes() == data
    assert not (tmp_path / f"{name}.corrupt").exists()  # the bad copy is gone once the new one verified
    osf.requests.clear()
    _get(osf, tmp_path, only=[name])  # now it is complete: verified and skipped
    assert _downloads(osf, name) == []


def test_bad_existing_file_is_moved_aside_when_the_new_download_fails(osf: FakeOSF, tmp_path: Path) -> None:
    name = "train_50M.zip"
    bad = bytes(len(osf.files[name]))
    (tmp_path / name).write_bytes(bad)
    osf.behavior[name] = "status:404"
    with pytest.raises(dl.DownloadError):
        _get(osf, tmp_path, only=[name])
    assert not (tmp_path / name).exists()  # never left under the final name as if complete
    assert (tmp_path / f"{name}.corrupt").read_bytes() == bad


def test_leftover_part_with_wrong_bytes_starts_over(osf: FakeOSF, tmp_path: Path) -> None:
    name = "cc_3M_captions.json"
    data = osf.files[name]
    (tmp_path / f"{name}.part").write_bytes(b"x" * len(data))  # full size from an earlier run, wrong content
    _get(osf, tmp_path, only=[name])
    assert _downloads(osf, name) == [None]
    assert (tmp_path / name).read_bytes() == data


def test_no_listed_size_and_a_truncated_body_is_not_done(osf: FakeOSF, tmp_path: Path) -> None:
    name = "train_50M.zip"
    osf.listed_size[name] = None
    osf.behavior[name] = "cut_no_length"  # half the body, no Content-Length: only the hash can tell
    with pytest.raises(dl.DownloadError, match="does not match the hash"):
        _get(osf, tmp_path, only=[name])
    assert not (tmp_path / name).exists()
    # Without a hash either, nothing can confirm completeness: refused, the bytes kept as .part only.
    osf.listed_hashes[name] = None
    with pytest.raises(dl.DownloadError, match="cannot be told from a complete one"):
        _get(osf, tmp_path, only=[name])
    assert not (tmp_path / name).exists() and (tmp_path / f"{name}.part").is_file()


def test_no_listed_size_uses_the_declared_length(osf: FakeOSF, tmp_path: Path) -> None:
    name = "train_50M.zip"
    data = osf.files[name]
    osf.listed_size[name], osf.listed_hashes[name] = None, None
    osf.behavior[name] = "close_early"  # Content-Length promises more than arrives: retried, resumed, completed
    with pytest.raises(dl.DownloadError, match="Gave up"):
        _get(osf, tmp_path, only=[name], retries=0)
    assert not (tmp_path / name).exists()
    osf.behavior[name] = "ok"
    _get(osf, tmp_path, only=[name])
    assert (tmp_path / name).read_bytes() == data
    osf.behavior[name] = "no_length"  # hash listed, no length: the hash confirms the body
    osf.listed_hashes.pop(name)
    (tmp_path / name).unlink()
    _get(osf, tmp_path, only=[name])
    assert (tmp_path / name).read_bytes() == data


@pytest.mark.parametrize(
    ("link", "why"),
    [
        ("file:///etc/hostname", "not a web address"),
        ("http://example.com/cc_3M_captions.json", "plain http://"),
        ("ftp://example.com/cc_3M_captions.json", "ftp:// scheme is not supported"),
    ],
)
def test_non_https_download_links_are_refused(osf: FakeOSF, tmp_path: Path, link: str, why: str) -> None:
    osf.links["cc_3M_captions.json"] = link
    with pytest.raises(dl.DownloadError, match=why):
        _get(osf, tmp_path)
    assert not [p for p, _ in osf.requests if p.startswith("/download/")]  # refused while listing: nothing fetched
    assert list(tmp_path.iterdir()) == []


def test_redirect_to_plain_http_is_refused(osf: FakeOSF, tmp_path: Path) -> None:
    name = "train_50M.zip"
    osf.redirect = True
    osf.redirect_base = "http://example.com"  # an https -> http downgrade in real life
    with pytest.raises(dl.DownloadError, match="redirect.*plain http://"):
        _get(osf, tmp_path, only=[name])
    assert not (tmp_path / name).exists()


def test_https_and_loopback_http_are_the_only_schemes() -> None:
    assert dl.check_url("https://files.osf.io/v1/x", "t") and dl.check_url("http://127.0.0.1:8000/x", "t")
    assert dl.check_url("http://[::1]:8000/x", "t") and dl.check_url("http://localhost/x", "t")
    for url in ("http://10.0.0.1/x", "http://127.0.0.1.example.com/x", "file:///x", "/etc/passwd", "https:///x"):
        with pytest.raises(dl.DownloadError):
            dl.check_url(url, "t")


def test_duplicate_names_in_the_listing_are_refused(osf: FakeOSF, tmp_path: Path) -> None:
    osf.extra_entries.append(osf.entry("train_50M.zip"))
    with pytest.raises(dl.DownloadError, match="names 'train_50M.zip' twice"):
        _get(osf, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["bad\x00name.zip", "../escape.zip", "sub/file.zip", "back\\slash.zip", "a\nb", ".."])
def test_unsafe_names_in_the_listing_are_refused(osf: FakeOSF, tmp_path: Path, name: str) -> None:
    entry = osf.entry("train_50M.zip")
    entry["attributes"]["name"] = name
    osf.extra_entries.append(entry)
    with pytest.raises(dl.DownloadError, match="refusing the file name"):
        _get(osf, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_unsafe_listing_exits_1_without_traceback(osf: FakeOSF, tmp_path: Path, capsys) -> None:
    entry = osf.entry("train_50M.zip")
    entry["attributes"]["name"] = "bad\x00name"
    osf.extra_entries.append(entry)
    assert dl.main(["--data_dir", str(tmp_path), "--base_url", osf.base, "--no_progress", "--backoff", "0"]) == 1
    err = capsys.readouterr().err
    assert "NUL byte" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["--timeout", "nan"],
        ["--timeout", "inf"],
        ["--timeout", "0"],
        ["--timeout", "-5"],
        ["--timeout", "soon"],
        ["--backoff", "nan"],
        ["--backoff", "inf"],
        ["--backoff", "-1"],
        ["--seed", "-1", "--test"],
        ["--data_dir", ""],
        ["--base_url", "http://api.example.org"],
        ["--base_url", "file:///tmp"],
    ],
)
def test_cli_bad_numbers_and_addresses_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        dl.main(["--no_progress", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


def test_script_timeout_nan_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "download_babylm_data.py"), "--timeout", "nan", "--list"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "--timeout" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# The sample world: its own directory, and never over a real download
# ---------------------------------------------------------------------------------------------------------------

SMALL_SAMPLE = [
    "--num_cc3m",
    "40",
    "--num_local_narratives",
    "10",
    "--num_text_lines",
    "60",
    "--num_novel_episodes",
    "4",
]


def test_bare_test_writes_into_its_own_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from bitmar.config import load_config
    from bitmar.data import layout

    work = tmp_path / "repo"
    work.mkdir()
    monkeypatch.chdir(work)
    assert dl.main(["--test", "--feature_dim", "32", *SMALL_SAMPLE]) == 0
    assert (work / dl.DEFAULT_SAMPLE_DIR / layout.CC3M_CAPTIONS).is_file()
    assert not (tmp_path / "babylm_dataset").exists()  # the release's directory stays untouched
    assert f"--data_dir {dl.DEFAULT_SAMPLE_DIR}" in capsys.readouterr().out
    tiny = load_config(REPO / "configs" / "bitmar_tiny.yaml", [])
    assert tiny.data.data_dir.rstrip("/") == dl.DEFAULT_SAMPLE_DIR  # the tiny config trains on it


def test_training_never_regenerates_the_sample_over_a_real_download(osf: FakeOSF, tmp_path: Path) -> None:
    """The reported sequence: `--test`, then a real download into the same directory, then a training run whose
    config asks for the sample world (other sizes): it must refuse, and every downloaded byte must survive."""
    from bitmar.config import load_config
    from bitmar.data import layout
    from bitmar.data.datasets import build_data
    from bitmar.data.verify import verify_dataset

    data_dir = tmp_path / "data"
    assert dl.main(["--data_dir", str(data_dir), "--test", *SMALL_SAMPLE]) == 0
    osf.files = {name: _content(3000 + 100 * i, 10 + i) for i, name in enumerate(layout.ALL_FILES)}
    assert dl.main(["--data_dir", str(data_dir), "--base_url", osf.base, "--backoff", "0", "--no_progress"]) == 0
    digests = {name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest() for name in layout.ALL_FILES}
    assert digests == {name: hashlib.sha256(data).hexdigest() for name, data in osf.files.items()}

    cfg = load_config(
        None,
        [
            f"data.data_dir={data_dir}",
            "data.sample.generate_if_missing=true",
            "data.sample.num_cc3m=50",
            "data.sample.num_text_lines=80",
        ],
    )
    with pytest.raises(DataError) as exc:
        build_data(cfg, tmp_path / "run")
    msg = str(exc.value)
    assert "refusing to overwrite 6 file(s)" in msg and "generate_if_missing=false" in msg
    assert {name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest() for name in layout.ALL_FILES} == digests
    # The verifier tells the user what the directory is.
    report = verify_dataset(data_dir, progress=False)
    assert not report.sample_world
    assert any(c.name == "sample world" and "not the files it wrote" in c.message for c in report.warnings)
