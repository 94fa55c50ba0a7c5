"""``python -m bksdm_lab.data.download`` against a real HTTP server on loopback serving a small tarball."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bksdm_lab.data import download as dl
from bksdm_lab.data.folder import ImageCaptionFolder
from bksdm_lab.models.demo import byte_level_tokenizer

REPO = Path(__file__).resolve().parent.parent
NAME = "preprocessed_11k"
CAPTIONS = ["a red square", "a green circle", "a blue triangle"]


def make_folder(root: Path) -> Path:
    folder = root / NAME
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        for i, caption in enumerate(CAPTIONS):
            pixels = rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)  # noise: the tarball does not shrink to nothing
            Image.fromarray(pixels).save(folder / f"{i:05d}.png")
            writer.writerow([f"{i:05d}.png", caption])
    return folder


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> bytes:
    src = tmp_path_factory.mktemp("src")
    make_folder(src)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / NAME, arcname=NAME)
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.files``; ``server.mode``: ``range`` (honours Range), ``norange`` (always 200, whole file);
    ``server.cut_first``: the first request gets half the body (with the full Content-Length), then a closed socket;
    ``server.fail_first``: the first request gets this HTTP error status."""

    timeout = 5  # seconds per socket operation: a stuck client never hangs the server thread

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.requests.append((self.path, self.headers.get("Range")))
            srv.if_range.append(self.headers.get("If-Range"))
            first = len(srv.requests) == 1
        body = srv.files.get(self.path)
        if srv.fail_first and first:
            self.send_error(srv.fail_first)
            return
        if body is None:
            self.send_error(404, "Not Found")
            return
        rng = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-", rng or "")
        start = int(match[1]) if match and srv.mode == "range" else 0
        if start >= len(body) and start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", f'"{hashlib.md5(body).hexdigest()}"')
        self.end_headers()
        if srv.cut_first and first:
            self.wfile.write(payload[: len(payload) // 2])
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve(monkeypatch):
    """``serve(files, mode="range", cut_first=False, fail_first=0)`` starts a loopback server; returns it (``.url(path)``)."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(dl, "BACKOFF_S", 0.0)
    monkeypatch.setattr(dl, "TIMEOUT_S", 5.0)
    servers = []

    def start(files: dict[str, bytes], mode: str = "range", cut_first: bool = False, fail_first: int = 0):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.files, server.mode, server.cut_first, server.fail_first = files, mode, cut_first, fail_first
        server.requests, server.if_range, server.lock = [], [], threading.Lock()
        server.url = lambda path: f"http://127.0.0.1:{server.server_address[1]}{path}"
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = dl.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def check_folder(root: Path) -> None:
    folder = root / NAME
    assert (folder / "metadata.csv").is_file()
    assert sorted(p.name for p in folder.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    data = ImageCaptionFolder(folder, byte_level_tokenizer(), resolution=64)
    assert len(data) == 3
    sample = data[0]
    assert tuple(sample["pixel_values"].shape) == (3, 64, 64)
    assert sample["input_ids"].shape[0] == 77


def test_end_to_end_then_noop_then_force(serve, tarball, tmp_path, capsys):
    server = serve({f"/{NAME}.tar.gz": tarball})
    url = server.url(f"/{NAME}.tar.gz")
    rc, out, err = run(capsys, "11k", "--url", url, "--root", tmp_path)
    assert rc == 0, err
    check_folder(tmp_path)
    marker = tmp_path / NAME / dl.MARKER
    assert sha(tarball) in marker.read_text()
    assert not (tmp_path / f"{NAME}.tar.gz").exists()  # removed after unpacking (no --keep-archive)
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*unpacking"))
    assert len(server.requests) == 1

    rc, out, err = run(capsys, "preprocessed_11k", "--url", url, "--root", tmp_path)  # folder name works too
    assert rc == 0 and "already present" in out
    assert len(server.requests) == 1  # no-op: nothing fetched

    rc, out, err = run(capsys, "11k", "--url", url, "--root", tmp_path, "--force", "--keep-archive")
    assert rc == 0, err
    assert len(server.requests) == 2
    check_folder(tmp_path)
    assert sha((tmp_path / f"{NAME}.tar.gz").read_bytes()) == sha(tarball)


def test_module_entry_point(serve, tarball, tmp_path):
    server = serve({f"/{NAME}.tar.gz": tarball})
    env = {**os.environ, "BKSDM_DATA_DIR": str(tmp_path)}  # --root's default
    cmd = [sys.executable, "-m", "bksdm_lab.data.download", "11k", "--url", server.url(f"/{NAME}.tar.gz")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    check_folder(tmp_path)


def test_resume_after_interrupted_download(serve, tarball, tmp_path, capsys):
    server = serve({"/x.tar.gz": tarball}, cut_first=True)
    rc, out, err = run(capsys, "11k", "--url", server.url("/x.tar.gz"), "--root", tmp_path, "--no-extract")
    assert rc == 0, err
    half = len(tarball) // 2
    assert server.requests == [("/x.tar.gz", None), ("/x.tar.gz", f"bytes={half}-")]
    assert server.if_range == [None, f'"{hashlib.md5(tarball).hexdigest()}"']  # a changed file would restart
    archive = tmp_path / f"{NAME}.tar.gz"
    assert sha(archive.read_bytes()) == sha(tarball)
    assert sha(tarball) in out
    assert not (tmp_path / NAME).exists()  # --no-extract

    rc, out, err = run(capsys, "11k", "--url", server.url("/x.tar.gz"), "--root", tmp_path)  # unpack what is there
    assert rc == 0, err
    assert len(server.requests) == 2
    check_folder(tmp_path)


def test_resume_a_part_left_by_an_earlier_run(serve, tarball, tmp_path, capsys):
    server = serve({"/x.tar.gz": tarball})
    third = len(tarball) // 3
    (tmp_path / f"{NAME}.tar.gz.part").write_bytes(tarball[:third])
    rc, out, err = run(capsys, "11k", "--url", server.url("/x.tar.gz"), "--root", tmp_path)
    assert rc == 0, err
    assert server.requests == [("/x.tar.gz", f"bytes={third}-")]
    assert "resuming" in err
    check_folder(tmp_path)


def test_server_that_ignores_range_restarts_from_zero(serve, tarball, tmp_path, capsys):
    server = serve({"/x.tar.gz": tarball}, mode="norange", cut_first=True)
    rc, out, err = run(capsys, "11k", "--url", server.url("/x.tar.gz"), "--root", tmp_path, "--no-extract")
    assert rc == 0, err
    assert [r for _, r in server.requests] == [None, f"bytes={len(tarball) // 2}-"]
    assert "ignored the Range request" in err
    assert not list(tmp_path.glob("*.part*"))
    assert sha((tmp_path / f"{NAME}.tar.gz").read_bytes()) == sha(tarball)


def test_checksum_mismatch_keeps_the_part(serve, tarball, tmp_path, capsys):
    server = serve({"/x.tar.gz": tarball})
    rc, out, err = run(capsys, "11k", "--url", server.url("/x.tar.gz"), "--root", tmp_path, "--sha256", "0" * 64)
    assert rc == 2
    part = tmp_path / f"{NAME}.tar.gz.part"
    assert "sha256 mismatch" in err and sha(tarball) in err and str(part) in err and "kept" in err
    assert "Traceback" not in err
    assert part.read_bytes() == tarball and not (tmp_path / f"{NAME}.tar.gz").exists()


def test_size_mismatch_stops_and_keeps_the_part(serve, tarball, tmp_path, capsys, monkeypatch):
    server = serve({"/x.tar.gz": tarball})
    wrong = dataclasses.replace(dl.SOURCES["11k"], size=len(tarball) + 1)
    monkeypatch.setitem(dl.SOURCES, "11k", wrong)
    part = tmp_path / f"{NAME}.tar.gz.part"
    part.write_bytes(tarball[:100])
    rc, out, err = run(capsys, "11k", "--url", server.url("/x.tar.gz"), "--root", tmp_path)
    assert rc == 2
    assert "size mismatch" in err and f"{len(tarball):,}" in err and f"{len(tarball) + 1:,}" in err
    assert str(part) in err and "kept" in err
    assert part.read_bytes() == tarball[:100]


def test_http_404_names_the_url(serve, tmp_path, capsys):
    server = serve({})
    url = server.url("/missing.tar.gz")
    rc, out, err = run(capsys, "212k", "--url", url, "--root", tmp_path)
    assert rc == 2
    assert "404" in err and url in err and "Traceback" not in err
    assert len(server.requests) == 1  # a 404 is not retried


def test_no_network_names_the_url_and_the_way_out(serve, tmp_path, capsys):
    serve({})  # only for the proxy / backoff settings
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/preprocessed_212k.tar.gz"
    rc, out, err = run(capsys, "212k", "--url", url, "--root", tmp_path)
    assert rc == 2
    assert url in err and "--url" in err and str(tmp_path / "preprocessed_212k.tar.gz") in err
    assert "Traceback" not in err


def test_a_file_downloaded_by_hand_is_unpacked_offline(serve, tarball, tmp_path, capsys):
    serve({})  # only for the proxy / backoff settings
    (tmp_path / f"{NAME}.tar.gz").write_bytes(tarball)  # as the no-network message suggests
    rc, out, err = run(capsys, "11k", "--url", "http://127.0.0.1:9/unreachable", "--root", tmp_path)
    assert rc == 0, err
    assert "by hand" in out and sha(tarball) in out
    check_folder(tmp_path)


def test_unknown_name_lists_the_valid_ones(tmp_path, capsys):
    rc, out, err = run(capsys, "99k", "--root", tmp_path)
    assert rc == 2
    assert "99k" in err and "11k, 212k, 2256k, coco30k" in err
    assert not tmp_path.joinpath("anything").exists()


def evil_archive(kind: str, member: str) -> bytes:
    """An archive with a good ``metadata.csv`` and one bad member: ``../evil``, ``/tmp/evil`` or an escaping link."""
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(f"{NAME}/metadata.csv", "file_name,text\n")
            zf.writestr(zipfile.ZipInfo(member), b"owned")
        return buf.getvalue()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in ((f"{NAME}/metadata.csv", b"file_name,text\n"), (member, b"owned")):
            info = tarfile.TarInfo(name)
            if name == "link":
                info.type, info.linkname = tarfile.SYMTYPE, f"{NAME}/../../evil"
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


@pytest.mark.parametrize(
    "kind, member", [("tar.gz", "../evil"), ("tar.gz", "/tmp/evil"), ("tar.gz", "link"), ("zip", "../evil")]
)
def test_unsafe_archive_members_are_refused(serve, tmp_path, capsys, monkeypatch, kind, member):
    monkeypatch.setitem(dl.SOURCES, "11k", dataclasses.replace(dl.SOURCES["11k"], file=f"{NAME}.{kind}"))
    server = serve({"/evil": evil_archive(kind, member)})
    root = tmp_path / "root"
    rc, out, err = run(capsys, "11k", "--url", server.url("/evil"), "--root", root)
    assert rc == 2, err
    assert "refusing to unpack" in err and repr(member) in err and "Traceback" not in err
    assert not (tmp_path / "evil").exists() and not (root / "evil").exists()
    assert not (root / NAME).exists() and not list(root.glob(".*unpacking"))  # nothing half-unpacked left
    assert (root / f"{NAME}.{kind}").is_file()  # the archive is kept for inspection


def test_zip_archive_and_transient_http_error(serve, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(dl.SOURCES, "11k", dataclasses.replace(dl.SOURCES["11k"], file=f"{NAME}.zip"))
    src = make_folder(tmp_path / "src")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(src.iterdir()):
            zf.write(path, f"{NAME}/{path.name}")
    server = serve({"/a.zip": buf.getvalue()}, fail_first=503)
    rc, out, err = run(capsys, "11k", "--url", server.url("/a.zip"), "--root", tmp_path / "root")
    assert rc == 0, err
    assert "HTTP 503" in err and "retrying" in err and len(server.requests) == 2
    check_folder(tmp_path / "root")


def test_coco30k_is_a_plain_file(serve, tmp_path, capsys):
    csv_bytes = b"file_name,text\nCOCO_val2014_000000000042.jpg,a dog\n"
    server = serve({"/metadata.csv": csv_bytes})
    rc, out, err = run(capsys, "coco30k", "--url", server.url("/metadata.csv"), "--root", tmp_path)
    assert rc == 0, err
    assert (tmp_path / "mscoco_val2014_30k" / "metadata.csv").read_bytes() == csv_bytes
    rc, out, err = run(capsys, "coco30k", "--url", server.url("/metadata.csv"), "--root", tmp_path)
    assert rc == 0 and "already present" in out and len(server.requests) == 1


def test_registry_points_at_the_authors_bucket():
    for source in dl.SOURCES.values():
        assert source.url.startswith("https://netspresso-research-code-release.s3.us-east-2.amazonaws.com/data/")
        assert source.url.endswith("/" + Path(source.file).name) and source.file.startswith(source.folder)
        assert source.size is None and source.sha256 is None  # nothing published: Content-Length is checked
    assert dl.resolve("preprocessed_2256k")[0] == "2256k"
