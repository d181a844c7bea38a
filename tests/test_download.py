"""Download stage: resumable HTTP fetches against a real loopback server, safe extraction,
whole-source downloads and the source descriptions in resources/sources/."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import stat
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from cytopretrain.core.errors import (
    ChecksumError,
    CredentialsRequired,
    DownloadError,
    ManualDownloadRequired,
    ResourceError,
    TransportUnavailable,
    UnsafeArchiveError,
)
from cytopretrain.curation import resources as dl
from cytopretrain.curation.archives import safe_extract
from cytopretrain.curation.download import download_source
from cytopretrain.curation.fetch import fetch
from cytopretrain.curation.resources import load_resource, resource_from_config

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FAST = {"backoff": 0.001, "timeout": 5, "chunk_size": 4096}


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# A loopback HTTP server whose misbehaviour each test controls, path by path.


class Behaviour:
    """What the server does for one path: counters are consumed one request at a time."""

    def __init__(
        self, fail_500: int = 0, drop: int = 0, ignore_range: bool = False, stall: int = 0, status: int | None = None
    ):
        self.fail_500 = fail_500
        self.drop = drop
        self.ignore_range = ignore_range
        self.stall = stall
        self.status = status


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        server: LoopbackServer = self.server  # type: ignore[assignment]
        path = self.path.split("?")[0]
        requested = self.headers.get("Range")
        entry = {"path": path, "range": requested, "status": None}
        with server.lock:
            server.log.append(entry)
            rule = server.rules.setdefault(path, Behaviour())
            stall = rule.stall > 0
            fail = rule.fail_500 > 0
            drop = not fail and not stall and rule.drop > 0
            rule.stall -= stall
            rule.fail_500 -= fail
            rule.drop -= drop
        if stall:
            time.sleep(0.6)
        if path not in server.files or rule.status:
            return self._reply(entry, rule.status or 404, b"not here")
        if fail:
            return self._reply(entry, 500, b"try later")
        body = server.files[path]
        start = 0
        if requested and not rule.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1))
            if start >= len(body):
                return self._reply(entry, 416, b"", {"Content-Range": f"bytes */{len(body)}"})
        part = body[start:]
        status = 206 if start or (requested and not rule.ignore_range) else 200
        headers = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"} if status == 206 else {}
        self._send_head(entry, status, len(part), headers)
        if drop:
            # Full Content-Length announced, half the bytes sent, then the socket closes.
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.close_connection = True
            return
        self.wfile.write(part)

    def _send_head(self, entry: dict, status: int, length: int, headers: dict) -> None:
        entry["status"] = status
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _reply(self, entry: dict, status: int, body: bytes, headers: dict | None = None) -> None:
        self._send_head(entry, status, len(body), headers or {})
        self.wfile.write(body)


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.rules: dict[str, Behaviour] = {}
        self.log: list[dict] = []
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:
        pass  # a client that timed out leaves a broken pipe behind; that is the point

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def requests_for(self, path: str) -> list[dict]:
        return [entry for entry in self.log if entry["path"] == path]


@pytest.fixture
def server():
    srv = LoopbackServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


# ---------------------------------------------------------------------------------------------
# fetch


def test_plain_download_matches_bytes_and_sha256(server, tmp_path):
    data = payload(300_000)
    server.files["/a.bin"] = data
    dest = fetch(server.url("/a.bin"), tmp_path / "a.bin", sha256=sha(data), **FAST)
    assert dest.read_bytes() == data
    assert not (tmp_path / "a.bin.part").exists()
    assert [e["range"] for e in server.requests_for("/a.bin")] == [None]


def test_server_error_then_success_is_retried(server, tmp_path):
    data = payload(50_000, seed=1)
    server.files["/flaky.bin"] = data
    server.rules["/flaky.bin"] = Behaviour(fail_500=1)
    dest = fetch(server.url("/flaky.bin"), tmp_path / "flaky.bin", sha256=sha(data), **FAST)
    assert dest.read_bytes() == data
    assert [e["status"] for e in server.requests_for("/flaky.bin")] == [500, 200]


def test_dropped_connection_resumes_with_range_from_the_byte_it_stopped(server, tmp_path):
    data = payload(200_001, seed=2)
    server.files["/drop.bin"] = data
    server.rules["/drop.bin"] = Behaviour(drop=2)
    dest = fetch(server.url("/drop.bin"), tmp_path / "drop.bin", sha256=sha(data), **FAST)
    assert dest.read_bytes() == data
    first_stop = len(data) // 2  # the first answer carried half the file
    second_stop = first_stop + (len(data) - first_stop) // 2  # the second, half of the rest
    seen = [(e["range"], e["status"]) for e in server.requests_for("/drop.bin")]
    assert seen == [(None, 200), (f"bytes={first_stop}-", 206), (f"bytes={second_stop}-", 206)]


def test_part_left_by_an_interrupted_run_is_continued(server, tmp_path):
    data = payload(80_000, seed=3)
    server.files["/resume.bin"] = data
    (tmp_path / "resume.bin.part").write_bytes(data[:12_345])
    dest = fetch(server.url("/resume.bin"), tmp_path / "resume.bin", sha256=sha(data), **FAST)
    assert dest.read_bytes() == data
    assert [e["range"] for e in server.requests_for("/resume.bin")] == ["bytes=12345-"]


def test_complete_part_answered_with_416_is_kept(server, tmp_path):
    data = payload(10_000, seed=4)
    server.files["/done.bin"] = data
    (tmp_path / "done.bin.part").write_bytes(data)
    dest = fetch(server.url("/done.bin"), tmp_path / "done.bin", sha256=sha(data), **FAST)
    assert dest.read_bytes() == data
    assert [e["status"] for e in server.requests_for("/done.bin")] == [416]


def test_server_ignoring_range_still_yields_the_right_file(server, tmp_path):
    data = payload(120_000, seed=5)
    server.files["/norange.bin"] = data
    server.rules["/norange.bin"] = Behaviour(drop=1, ignore_range=True)
    dest = fetch(server.url("/norange.bin"), tmp_path / "norange.bin", sha256=sha(data), **FAST)
    assert dest.read_bytes() == data
    seen = [(e["range"], e["status"]) for e in server.requests_for("/norange.bin")]
    assert seen == [(None, 200), (f"bytes={len(data) // 2}-", 200)]


def test_checksum_mismatch_raises_and_leaves_no_file(server, tmp_path):
    data = payload(20_000, seed=6)
    server.files["/bad.bin"] = data
    wrong = sha(b"something else")
    with pytest.raises(ChecksumError) as err:
        fetch(server.url("/bad.bin"), tmp_path / "bad.bin", sha256=wrong, **FAST)
    message = str(err.value)
    assert server.url("/bad.bin") in message and wrong in message and sha(data) in message
    assert list(tmp_path.iterdir()) == []


def test_404_fails_at_once_naming_url_and_status(server, tmp_path):
    with pytest.raises(DownloadError) as err:
        fetch(server.url("/missing.bin"), tmp_path / "missing.bin", **FAST)
    assert server.url("/missing.bin") in str(err.value) and "404" in str(err.value)
    assert len(server.requests_for("/missing.bin")) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("status", [408, 429])
def test_408_and_429_are_retried(server, tmp_path, status):
    data = payload(1000, seed=7)
    server.files["/busy.bin"] = data
    server.rules["/busy.bin"] = Behaviour(status=status)
    with pytest.raises(DownloadError, match="giving up after 3"):
        fetch(server.url("/busy.bin"), tmp_path / "busy.bin", retries=2, **FAST)
    assert len(server.requests_for("/busy.bin")) == 3


def test_persistent_server_errors_give_up_after_retries(server, tmp_path):
    server.files["/down.bin"] = payload(1000)
    server.rules["/down.bin"] = Behaviour(fail_500=100)
    with pytest.raises(DownloadError, match="HTTP 500"):
        fetch(server.url("/down.bin"), tmp_path / "down.bin", retries=3, **FAST)
    assert len(server.requests_for("/down.bin")) == 4


def test_timeout_is_retried(server, tmp_path):
    data = payload(5000, seed=8)
    server.files["/slow.bin"] = data
    server.rules["/slow.bin"] = Behaviour(stall=1)
    dest = fetch(server.url("/slow.bin"), tmp_path / "slow.bin", retries=2, backoff=0.001, timeout=0.2)
    assert dest.read_bytes() == data
    assert len(server.requests_for("/slow.bin")) == 2


def test_connection_refused_is_retried_then_reported(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match="connection failed"):
        fetch(f"http://127.0.0.1:{port}/x", tmp_path / "x", retries=1, **FAST)


def test_file_url_and_local_path_are_copied_and_checked(tmp_path):
    data = payload(70_000, seed=9)
    source = tmp_path / "src dir" / "data.bin"
    source.parent.mkdir()
    source.write_bytes(data)
    copied = fetch(source.as_uri(), tmp_path / "out" / "a.bin", sha256=sha(data))
    assert copied.read_bytes() == data
    assert fetch(str(source), tmp_path / "out" / "b.bin").read_bytes() == data
    with pytest.raises(ChecksumError):
        fetch(source.as_uri(), tmp_path / "out" / "c.bin", sha256=sha(b"x"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.bin", "b.bin"]
    with pytest.raises(DownloadError, match="not found"):
        fetch((tmp_path / "nope.bin").as_uri(), tmp_path / "out" / "d.bin")


# ---------------------------------------------------------------------------------------------
# safe_extract


def make_zip(path: Path, entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as handle:
        for name, data in entries.items():
            handle.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            handle.writestr(info, target)
    return path


def make_tar(path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as handle:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                handle.addfile(entry)
            else:
                name, data = entry
                info = tarfile.TarInfo(name)
                info.size = len(data)
                handle.addfile(info, io.BytesIO(data))
    return path


def tar_link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def tar_device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


UNSAFE_ZIPS = {
    "dotdot": ({"ok.txt": b"fine", "../evil.txt": b"pwned"}, {}, "../evil.txt"),
    "nested_dotdot": ({"a/../../evil.txt": b"pwned"}, {}, "a/../../evil.txt"),
    "absolute": ({"/tmp/evil_abs.txt": b"pwned"}, {}, "/tmp/evil_abs.txt"),
    "drive": ({"C:/evil.txt": b"pwned"}, {}, "C:/evil.txt"),
    "backslash_dotdot": ({"..\\evil.txt": b"pwned"}, {}, "..\\evil.txt"),
    "symlink": ({"ok.txt": b"fine"}, {"link": "/etc/passwd"}, "link"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_ZIPS))
def test_unsafe_zip_entries_are_refused_and_nothing_is_written(tmp_path, case):
    entries, links, bad = UNSAFE_ZIPS[case]
    archive = make_zip(tmp_path / "bad.zip", entries, links)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, work / "target")
    assert str(archive) in str(err.value) and repr(bad) in str(err.value)
    assert list(work.iterdir()) == []  # no target files, no staging folder left behind
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil_abs.txt").exists()


UNSAFE_TARS = {
    "dotdot": ([("ok.txt", b"fine"), ("../evil.txt", b"pwned")], "../evil.txt"),
    "absolute": ([("/tmp/evil_abs.txt", b"pwned")], "/tmp/evil_abs.txt"),
    "symlink": ([("ok.txt", b"fine"), tar_link("link", tarfile.SYMTYPE, "/etc/passwd")], "link"),
    "hardlink": ([("ok.txt", b"fine"), tar_link("hard", tarfile.LNKTYPE, "ok.txt")], "hard"),
    "device": ([tar_device("dev")], "dev"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_TARS))
def test_unsafe_tar_entries_are_refused_and_nothing_is_written(tmp_path, case):
    entries, bad = UNSAFE_TARS[case]
    archive = make_tar(tmp_path / "bad.tar.gz", entries)
    work = tmp_path / "work"
    work.mkdir()
    target = work / "target"
    target.mkdir()
    (target / "kept.txt").write_bytes(b"already here")
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, target)
    assert str(archive) in str(err.value) and repr(bad) in str(err.value)
    # Good entries before the bad one were staged, then discarded: the target is untouched.
    assert [p.name for p in work.iterdir()] == ["target"]
    assert [p.name for p in target.iterdir()] == ["kept.txt"]
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil_abs.txt").exists()


def test_good_zip_extracts_and_merges_into_existing_folder(tmp_path):
    entries = {"plate1/a.tif": payload(100), "plate1/sub/b.tif": payload(200, 1), "top.csv": b"x,y\n1,2\n"}
    archive = make_zip(tmp_path / "good.zip", {"plate1/": b"", **entries})
    target = tmp_path / "target"
    (target / "plate1").mkdir(parents=True)
    (target / "plate1" / "old.tif").write_bytes(b"old")
    (target / "top.csv").write_bytes(b"stale")
    extracted = safe_extract(archive, target)
    assert extracted == sorted(target / name for name in entries)
    for name, data in entries.items():
        assert (target / name).read_bytes() == data
    assert (target / "plate1" / "old.tif").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "mode, suffix, kind",
    [("w", ".tar", None), ("w:gz", ".tar.gz", None), ("w:bz2", ".tbz", "tar.bz2"), ("w:xz", ".tar.xz", None)],
)
def test_good_tar_variants_extract(tmp_path, mode, suffix, kind):
    entries = [("d/one.png", payload(300)), ("d/two.png", payload(400, 2)), ("./three.txt", b"3")]
    archive = make_tar(tmp_path / f"good{suffix}", entries, mode)
    extracted = safe_extract(archive, tmp_path / "out", kind)
    assert extracted == sorted(tmp_path / "out" / n for n in ("d/one.png", "d/two.png", "three.txt"))
    assert (tmp_path / "out" / "d" / "two.png").read_bytes() == entries[1][1]


def test_corrupt_archive_is_reported(tmp_path):
    archive = tmp_path / "broken.zip"
    archive.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(DownloadError, match="broken.zip"):
        safe_extract(archive, tmp_path / "out")
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(gzip.compress(b"not a tar at all" * 10)[:-8])
    with pytest.raises(DownloadError, match="broken.tar.gz"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# download_source


def https_resource(server: LoopbackServer, files: list[dict]) -> dict:
    return {
        "name": "demo",
        "title": "demo",
        "database": "test",
        "adapter": "folder",
        "licence": "CC0",
        "homepage": server.url("/"),
        "citation": "none",
        "transport": "https",
        "files": [dl._validate_file_entry(f, dl._Where("test", False), "files") for f in files],
    }


def test_download_source_end_to_end_writes_manifest_and_is_idempotent(server, tmp_path):
    images = {f"Week1_22123/img_{k}.tif": payload(5000 + k, k) for k in range(5)}
    zip_bytes = make_zip(tmp_path / "plate.zip", images).read_bytes()
    csv_bytes = b"plate,well\nWeek1_22123,B02\n"
    server.files["/bbbc/plate.zip"] = zip_bytes
    server.files["/bbbc/meta.csv"] = csv_bytes
    server.rules["/bbbc/plate.zip"] = Behaviour(drop=1)
    resource = https_resource(
        server,
        [
            {"url": server.url("/bbbc/meta.csv"), "sha256": sha(csv_bytes), "archive": "none"},
            {"url": server.url("/bbbc/plate.zip"), "archive": "zip", "dest": "images"},
        ],
    )
    target = tmp_path / "download" / "demo"
    manifest = download_source(resource, target, fetch_options=FAST)

    on_disk = json.loads((target / "download_manifest.json").read_text())
    assert on_disk == manifest
    files = {entry["url"]: entry for entry in manifest["files"]}
    assert files[server.url("/bbbc/plate.zip")]["sha256"] == sha(zip_bytes)
    assert files[server.url("/bbbc/plate.zip")]["bytes"] == len(zip_bytes)
    assert files[server.url("/bbbc/plate.zip")]["extracted_files"] == len(images)
    assert files[server.url("/bbbc/meta.csv")]["sha256"] == sha(csv_bytes)
    assert files[server.url("/bbbc/meta.csv")]["extracted_files"] == 1
    assert (target / "meta.csv").read_bytes() == csv_bytes
    for name, data in images.items():
        assert (target / "images" / name).read_bytes() == data

    n_requests = len(server.log)
    assert download_source(resource, target) == manifest
    assert len(server.log) == n_requests  # nothing fetched again

    # Without the manifest, the verified archives in the cache are reused, not fetched.
    (target / "download_manifest.json").unlink()
    (target / "images" / "Week1_22123" / "img_0.tif").unlink()
    assert download_source(resource, target) == manifest
    assert len(server.log) == n_requests
    assert (target / "images" / "Week1_22123" / "img_0.tif").read_bytes() == images["Week1_22123/img_0.tif"]

    # With the manifest, even a deleted cache is not fetched again (archives may be dropped).
    shutil.rmtree(target / ".downloads")
    assert download_source(resource, target) == manifest
    assert len(server.log) == n_requests


def test_download_source_uses_cache_dir_and_refetches_a_changed_checksum(server, tmp_path):
    data = b"a,b\n1,2\n"
    server.files["/t.csv"] = data
    resource = https_resource(server, [{"url": server.url("/t.csv"), "sha256": sha(data)}])
    cache = tmp_path / "cache"
    download_source(resource, tmp_path / "target", cache_dir=cache)
    assert (cache / "demo" / "t.csv").read_bytes() == data
    assert not (tmp_path / "target" / ".downloads").exists()
    server.files["/t.csv"] = b"a,b\n3,4\n"
    (cache / "demo" / "t.csv").write_bytes(b"corrupted")
    changed = https_resource(server, [{"url": server.url("/t.csv"), "sha256": sha(b"a,b\n3,4\n")}])
    download_source(changed, tmp_path / "target", cache_dir=cache)
    assert (tmp_path / "target" / "t.csv").read_bytes() == b"a,b\n3,4\n"
    assert len(server.requests_for("/t.csv")) == 2


def test_download_source_checksum_failure_writes_no_manifest(server, tmp_path):
    server.files["/z.csv"] = b"1\n"
    resource = https_resource(server, [{"url": server.url("/z.csv"), "sha256": sha(b"2\n")}])
    with pytest.raises(ChecksumError):
        download_source(resource, tmp_path / "target")
    assert not (tmp_path / "target" / "download_manifest.json").exists()
    assert not (tmp_path / "target" / "z.csv").exists()


def test_inline_config_source_over_file_url(tmp_path):
    archive = make_zip(tmp_path / "demo.zip", {"cells/a.png": b"a", "cells/b.png": b"b"})
    resource = resource_from_config(
        "demo", {"url": archive.as_uri(), "sha256": sha(archive.read_bytes()), "archive": "zip", "adapter": "folder"}
    )
    manifest = download_source(resource, tmp_path / "out")
    assert manifest["files"][0]["extracted_files"] == 2
    assert (tmp_path / "out" / "cells" / "b.png").read_bytes() == b"b"


def clear_kaggle_credentials(monkeypatch, home: Path) -> None:
    monkeypatch.setenv("HOME", str(home))
    for key in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(key, raising=False)


def test_kaggle_without_credentials_says_what_to_provide(monkeypatch, tmp_path):
    clear_kaggle_credentials(monkeypatch, tmp_path)
    with pytest.raises(CredentialsRequired) as err:
        download_source(load_resource("hpa"), tmp_path / "hpa")
    message = str(err.value)
    for needle in (
        "kaggle.json",
        "pip install kaggle",
        "KAGGLE_USERNAME",
        "KAGGLE_KEY",
        "chmod 600",
        "human-protein-atlas-image-classification",
        "path:",
    ):
        assert needle in message
    assert not (tmp_path / "hpa").exists()


def fake_tool(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(f"#!{sys.executable}\nimport sys, os, json, zipfile\n{body}\n")
    script.chmod(0o755)


def test_kaggle_with_cli_and_credentials_downloads_and_extracts(monkeypatch, tmp_path):
    clear_kaggle_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123")
    argv_log = tmp_path / "argv.json"
    fake_tool(
        tmp_path / "bin",
        "kaggle",
        (
            f"json.dump(sys.argv[1:], open({str(argv_log)!r}, 'w'))\n"
            "out = sys.argv[sys.argv.index('-p') + 1]\n"
            "with zipfile.ZipFile(os.path.join(out, 'comp.zip'), 'w') as z:\n"
            "    z.writestr('train.csv', 'Id,Target\\nabc,0 1\\n')\n"
            "    z.writestr('train/abc_green.png', 'png')\n"
        ),
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    target = tmp_path / "hpa"
    manifest = download_source(load_resource("hpa"), target)
    args = json.loads(argv_log.read_text())
    assert args == [
        "competitions",
        "download",
        "-c",
        "human-protein-atlas-image-classification",
        "-p",
        str(target / ".downloads"),
    ]
    assert (target / "train" / "abc_green.png").read_text() == "png"
    assert manifest["files"][0]["extracted_files"] == 2
    assert manifest["files"][0]["sha256"] == sha((target / ".downloads" / "comp.zip").read_bytes())


def test_kaggle_cli_failure_is_reported(monkeypatch, tmp_path):
    clear_kaggle_credentials(monkeypatch, tmp_path)
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    fake_tool(tmp_path / "bin", "kaggle", "sys.stderr.write('403 - Forbidden\\n'); sys.exit(1)")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(DownloadError, match="accept the rules"):
        download_source(load_resource("hpa"), tmp_path / "hpa")


def test_aspera_without_ascp_raises_transport_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TransportUnavailable) as err:
        download_source(load_resource("idr0017"), tmp_path / "idr")
    assert "ascp" in str(err.value) and "path:" in str(err.value)


def test_aspera_with_ascp_runs_it(monkeypatch, tmp_path):
    key = tmp_path / "key.openssh"
    key.write_text("key")
    monkeypatch.setenv("ASPERA_KEY", str(key))
    argv_log = tmp_path / "argv.json"
    fake_tool(
        tmp_path / "bin",
        "ascp",
        (
            f"json.dump(sys.argv[1:], open({str(argv_log)!r}, 'w'))\n"
            "os.makedirs(os.path.join(sys.argv[-1], 'screenA'), exist_ok=True)\n"
            "open(os.path.join(sys.argv[-1], 'screenA', 'p1.tif'), 'wb').write(b'1234')\n"
        ),
    )
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    manifest = download_source(load_resource("idr0017"), tmp_path / "idr")
    args = json.loads(argv_log.read_text())
    assert args[args.index("-P") + 1] == "33001" and args[args.index("-i") + 1] == str(key)
    assert args[-2:] == ["idr0017@fasp.ebi.ac.uk:.", str(tmp_path / "idr")]
    assert manifest["files"][0]["extracted_files"] == 1 and manifest["files"][0]["bytes"] == 4


@pytest.mark.parametrize("name", ["cyclops", "coos7"])
def test_manual_sources_raise_their_instructions(tmp_path, name):
    resource = load_resource(name)
    with pytest.raises(ManualDownloadRequired) as err:
        download_source(resource, tmp_path / name)
    assert resource["instructions"].strip() in str(err.value) and "path:" in str(err.value)


def test_local_path_source(tmp_path):
    (tmp_path / "mine").mkdir()
    manifest = download_source(resource_from_config("mine", {"path": str(tmp_path / "mine")}), tmp_path / "out")
    assert manifest["path"] == str((tmp_path / "mine").resolve())
    with pytest.raises(DownloadError, match="not a folder"):
        download_source(resource_from_config("gone", {"path": str(tmp_path / "gone")}), tmp_path / "out2")


# ---------------------------------------------------------------------------------------------
# Source descriptions


YAMLS = sorted((Path(__file__).resolve().parents[1] / "resources" / "sources").glob("*.yaml"))


def test_there_are_source_descriptions():
    names = {p.stem for p in YAMLS}
    assert {"bbbc021", "rxrx1", "hpa", "cyclops", "coos7", "idr0017"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_every_source_description_loads(path):
    by_path = load_resource(path)
    assert by_path == load_resource(path.stem)
    assert by_path["name"] == path.stem
    for item in by_path.get("files", []):
        assert item["url"].startswith("https://")


def test_bbbc021_lists_every_plate_of_the_image_table():
    table = SHARED_DATA / "bbbc021" / "BBBC021_v1_image.csv.gz"
    if not table.is_file():
        pytest.skip(f"shared data not found: {table}")
    folders = pd.read_csv(table, usecols=["Image_PathName_DAPI"])["Image_PathName_DAPI"]
    plates = {folder.rsplit("/", 1)[-1] for folder in folders}
    files = load_resource("bbbc021")["files"]
    zips = {f["filename"] for f in files if f["archive"] == "zip"}
    assert zips == {f"BBBC021_v1_images_{plate}.zip" for plate in plates}
    assert len(zips) == 55
    csvs = {f["filename"] for f in files if f["archive"] == "none"}
    assert csvs == {"BBBC021_v1_image.csv", "BBBC021_v1_compound.csv", "BBBC021_v1_moa.csv"}
    assert all(f["url"] == "https://data.broadinstitute.org/bbbc/BBBC021/" + f["filename"] for f in files)


GOOD_YAML = """\
name: {name}
title: t
database: d
adapter: folder
licence: l
homepage: h
citation: c
transport: https
files:
  - url: https://example.org/a.zip
"""


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda t: t.replace("title: t\n", ""), "title"),
        (lambda t: t.replace("adapter: folder", "adapter: nope"), "adapter"),
        (lambda t: t.replace("transport: https", "transport: ftp"), "transport"),
        (lambda t: t + "    sha256: abc\n", "files[0].sha256"),
        (lambda t: t + "    archive: rar\n", "files[0].archive"),
        (lambda t: t + "    dest: ../up\n", "files[0].dest"),
        (lambda t: t + "  - url: https://example.org/sub/a.zip\n", "files[1].url"),
        (lambda t: t + "colour: blue\n", "colour"),
        (lambda t: t.replace("transport: https", "transport: kaggle"), "kaggle"),
        (lambda t: t.replace("transport: https", "transport: manual"), "instructions"),
        (lambda t: t.replace("name: bad", "name: other"), "name"),
    ],
)
def test_invalid_source_description_names_file_and_key(tmp_path, edit, key):
    path = tmp_path / "bad.yaml"
    path.write_text(edit(GOOD_YAML.format(name="bad")))
    with pytest.raises(ResourceError) as err:
        load_resource(path)
    assert str(path) in str(err.value) and f"'{key}'" in str(err.value)


def test_valid_description_gets_defaults(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD_YAML.format(name="good"))
    (item,) = load_resource(path)["files"]
    assert item == {
        "url": "https://example.org/a.zip",
        "sha256": None,
        "archive": "zip",
        "dest": ".",
        "filename": "a.zip",
    }


def test_missing_or_broken_description_is_reported(tmp_path):
    with pytest.raises(ResourceError, match="no_such_source.yaml"):
        load_resource("no_such_source")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ResourceError, match="broken.yaml"):
        load_resource(broken)


# ---------------------------------------------------------------------------------------------
# resource_from_config


def test_config_forms_become_resources():
    digest = "ab" * 32
    single = resource_from_config(
        "mine", {"url": "https://example.org/x/data.tar.gz", "sha256": digest, "adapter": "manifest"}
    )
    assert single["transport"] == "https" and single["adapter"] == "manifest"
    assert single["files"] == [
        {
            "url": "https://example.org/x/data.tar.gz",
            "sha256": digest,
            "archive": "tar.gz",
            "dest": ".",
            "filename": "data.tar.gz",
        }
    ]
    several = resource_from_config("many", {"urls": ["https://e.org/a.zip", "https://e.org/b.bin"], "archive": "none"})
    assert [f["archive"] for f in several["files"]] == ["none", "none"] and several["adapter"] == "folder"
    named = resource_from_config("bbbc021_full", {"resource": "bbbc021", "options": {"k": 1}, "role": "benchmark"})
    assert named["name"] == "bbbc021_full" and named["adapter"] == "bbbc021" and named["options"] == {"k": 1}
    assert len(named["files"]) == 58


@pytest.mark.parametrize(
    "spec, key",
    [
        ({"url": "https://e.org/a.zip", "sha256": "xyz"}, "sources.s.sha256"),
        ({"url": "https://e.org/a.zip", "archive": "rar"}, "sources.s.archive"),
        ({"url": "ftp://e.org/a.zip"}, "sources.s.url"),
        ({"urls": ["https://e.org/1/a.zip", "https://e.org/2/a.zip"]}, "sources.s.urls"),
        ({"urls": "https://e.org/a.zip"}, "sources.s.urls"),
        ({"resource": "rxrx1", "adapter": "nope"}, "sources.s.adapter"),
        ({"resource": "no_such_source"}, "sources.s.resource"),
        ({"resource": "rxrx1", "sha256": "ab" * 32}, "sources.s.sha256"),
        ({"url": "https://e.org/a.zip", "colour": 1}, "sources.s.colour"),
        ({"url": "https://e.org/a.zip", "urls": ["https://e.org/b.zip"]}, "sources.s:"),
        ({"adapter": "folder"}, "sources.s:"),
    ],
)
def test_bad_config_entries_name_the_key(spec, key):
    with pytest.raises(ResourceError) as err:
        resource_from_config("s", spec)
    assert str(err.value).startswith(key)
