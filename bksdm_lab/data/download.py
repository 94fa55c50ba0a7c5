"""Fetch and unpack the published BK-SDM data (``SOURCES``), resumable and size-checked: an own downloader, as
pooch 1.9 does not resume a partial download.

    python -m bksdm_lab.data.download 212k [--root DIR] [--url URL] [--no-extract] [--force] [--sha256 HEX]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from tqdm import tqdm

PROG = "bksdm_lab.data.download"
S3 = "https://netspresso-research-code-release.s3.us-east-2.amazonaws.com/data"
MARKER = ".bksdm_download.json"
CHUNK = 1 << 20  # bytes per read
TIMEOUT_S = 60.0  # per connect / read
TRIES = 3  # attempts in a row that make no progress before giving up
BACKOFF_S = 2.0  # wait before retry k (1-based): BACKOFF_S * 2 ** (k - 1)
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Source:
    url: str
    file: str  # where the download lands, relative to the root
    folder: str  # the folder it provides (unpacks to / lands in), relative to the root
    about: str
    size: int | None = None  # exact bytes if published; else the server's Content-Length is checked
    sha256: str | None = None  # if published


# URLs: scripts/get_laion_data.sh (11k and 212k under improved_aesthetics_6.5plus/, 2256k under
# improved_aesthetics_6.25plus/) and scripts/get_mscoco_files.sh (mscoco_val2014_30k/metadata.csv) of
# github.com/Nota-NetsPresso/BK-SDM. Sizes in `about` are the approximate ones those scripts and the README state.
SOURCES: dict[str, Source] = {
    "11k": Source(
        f"{S3}/improved_aesthetics_6.5plus/preprocessed_11k.tar.gz",
        "preprocessed_11k.tar.gz",
        "preprocessed_11k",
        "LAION-Aesthetics V2 6.5+ subset, 10,274 image-text pairs (about 1.7 GB tar.gz, 1.8 GB unpacked)",
    ),
    "212k": Source(
        f"{S3}/improved_aesthetics_6.5plus/preprocessed_212k.tar.gz",
        "preprocessed_212k.tar.gz",
        "preprocessed_212k",
        "LAION-Aesthetics V2 6.5+ subset, 212,776 image-text pairs (about 18 GB tar.gz, 20 GB unpacked)",
    ),
    "2256k": Source(
        f"{S3}/improved_aesthetics_6.25plus/preprocessed_2256k.tar.gz",
        "preprocessed_2256k.tar.gz",
        "preprocessed_2256k",
        "LAION-Aesthetics V2 6.25+ subset, 2,256,472 image-text pairs (about 182 GB tar.gz, 204 GB unpacked)",
    ),
    "coco30k": Source(
        f"{S3}/mscoco_val2014_30k/metadata.csv",
        "mscoco_val2014_30k/metadata.csv",
        "mscoco_val2014_30k",
        "MS-COCO val2014, 30K evaluation prompts (metadata.csv)",
    ),
}
ALIASES = {s.folder: name for name, s in SOURCES.items()}  # preprocessed_212k -> 212k, ...


class DownloadError(Exception):
    """A failure the user can act on; the message says what happened and what to do."""


def resolve(name: str) -> tuple[str, Source]:
    key = ALIASES.get(name, name)
    if key not in SOURCES:
        listing = "\n".join(f"  {n:8s} {s.about}" for n, s in SOURCES.items())
        raise DownloadError(f"unknown data set {name!r}; valid names: {', '.join(SOURCES)}\n{listing}")
    return key, SOURCES[key]


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


# ----------------------------------------------------------------------------------------------- download


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/200`` -> (100, 200); ``bytes */200`` -> (None, 200); unknown parts -> None."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total and total != "*" else None)


class _Transfer:
    """One file's download state across attempts: the .part, the expected total, the running sha256."""

    def __init__(self, url: str, part: Path, size: int | None, bar: tqdm):
        self.url, self.part, self.size, self.bar = url, part, size, bar
        self.total: int | None = size  # expected bytes: the published size, else what the server says
        self.hasher, self.hashed = hashlib.sha256(), 0  # sha256 of the first `hashed` bytes of the .part
        # The server's ETag / Last-Modified of the file the .part began as, kept next to it (<file>.part.json) and
        # sent as If-Range on resume, so a file changed on the server restarts instead of being stitched.
        self.meta = part.with_name(part.name + ".json")
        self.validator: str | None = None
        if part.exists() and self.meta.is_file():
            try:
                saved = json.loads(self.meta.read_text(encoding="utf-8"))
                if saved.get("url") == url:  # another host (a mirror) has other validators
                    self.validator = saved.get("validator")
            except (OSError, ValueError):
                pass

    def _remember(self, headers) -> None:
        etag, modified = headers.get("ETag"), headers.get("Last-Modified")
        self.validator = etag if etag and not etag.startswith("W/") else modified  # If-Range takes strong ETags only
        self.meta.write_text(json.dumps({"url": self.url, "validator": self.validator}) + "\n", encoding="utf-8")

    def have(self) -> int:
        return self.part.stat().st_size if self.part.exists() else 0

    def _sync_hash(self, upto: int) -> None:
        """Make the running hash cover exactly the first ``upto`` bytes already in the .part."""
        if self.hashed == upto:
            return
        self.hasher, self.hashed = hashlib.sha256(), 0
        with self.part.open("rb") as f:
            while self.hashed < upto:
                block = f.read(min(CHUNK, upto - self.hashed))
                if not block:
                    break
                self.hasher.update(block)
                self.hashed += len(block)

    def _learn_total(self, total: int | None) -> None:
        if total is None:
            return
        if self.size is not None and total != self.size:
            kept = f" The partial download {self.part} is kept as it was." if self.part.exists() else ""
            raise DownloadError(
                f"size mismatch: {self.url} has {total:,} bytes but the expected size is {self.size:,} bytes; "
                f"stopped before downloading it (the server's file is not the published one: check --url).{kept}"
            )
        self.total = total
        if self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()

    def attempt(self) -> bool:
        """One request; appends to the .part. True when the file is complete, False when the stream broke."""
        have = self.have()
        headers = {"User-Agent": "bksdm_lab-download/1", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
            if self.validator:
                headers["If-Range"] = self.validator
        request = urllib.request.Request(self.url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as err:
            if err.code != 416 or not have:
                raise
            _, total = _content_range(err.headers.get("Content-Range"))
            err.close()
            if total == have:  # the .part is already the whole file
                self._learn_total(total)
                return True
            raise DownloadError(
                f"the partial download {self.part} ({have:,} bytes) does not fit {self.url} (the server refused "
                f"to resume it: HTTP 416, its file has {'an unknown number of' if total is None else f'{total:,}'} "
                f"bytes). It is kept; delete it or pass --force to download from scratch."
            ) from None
        with response:
            length = response.headers.get("Content-Length")
            length = int(length) if length and length.strip().isdigit() else None
            if response.status == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != have:
                    raise DownloadError(
                        f"{self.url} answered the request for bytes {have:,}- with another range "
                        f"({response.headers.get('Content-Range')!r}); the partial download {self.part} is kept: "
                        f"delete it or pass --force to download from scratch."
                    )
                self._learn_total(total if total is not None else (have + length if length is not None else None))
                mode = "ab"
            elif response.status == 200:
                self._learn_total(length)
                if have:
                    _say(
                        f"{self.url} answered the request to resume at byte {have:,} with the whole file (HTTP 200: "
                        f"it ignored the Range request, or the file changed since): restarting from zero "
                        f"(the {have:,} bytes in {self.part} are overwritten)"
                    )
                self._remember(response.headers)
                have, mode = 0, "wb"
            else:
                raise DownloadError(
                    f"{self.url} answered HTTP {response.status} {response.reason}; expected 200 or 206"
                )
            self._sync_hash(have)
            self.bar.reset(total=self.total)
            self.bar.update(have)
            got = have
            with self.part.open(mode) as f:
                while True:
                    block = response.read(CHUNK)
                    if not block:
                        break
                    try:
                        f.write(block)
                    except OSError as err:
                        raise DownloadError(f"could not write {self.part}: {err}") from None
                    self.hasher.update(block)
                    self.hashed += len(block)
                    got += len(block)
                    self.bar.update(len(block))
        return self.total is None or got >= self.total


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def download(url: str, dest: Path, size: int | None = None, sha256: str | None = None, tries: int = TRIES) -> str:
    """Download ``url`` to ``dest`` via ``dest.part`` (resumed if present); verify; rename. Returns the sha256."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if part.exists():
        _say(f"resuming the partial download {part} ({part.stat().st_size:,} bytes)")
    with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, mininterval=0.5) as bar:
        transfer = _Transfer(url, part, size, bar)
        failures = 0
        while True:
            before = transfer.have()
            try:
                if transfer.attempt():
                    break
                err: BaseException = ConnectionError("the connection closed before the end of the file")
            except urllib.error.HTTPError as http_err:
                if http_err.code not in TRANSIENT_HTTP:
                    hint = " (S3 answers 403 for a file that does not exist)" if http_err.code == 403 else ""
                    raise DownloadError(
                        f"HTTP {http_err.code} {http_err.reason}{hint}: {url}\n"
                        f"  The file may have moved: pass --url with its new address or a mirror."
                    ) from None
                err = http_err
            except (OSError, http.client.HTTPException) as io_err:  # URLError, refused, reset, timeout, ...
                err = io_err
            if transfer.have() > before:  # progress: resume at once, the count starts again
                failures = 0
                _say(f"{_describe(err)}; resuming at byte {transfer.have():,}")
                continue
            failures += 1
            if failures >= tries:
                have = transfer.have()
                if have == 0 and not isinstance(err, urllib.error.HTTPError):
                    raise DownloadError(
                        f"could not download {url}: {_describe(err)} ({tries} tries).\n"
                        f"  No network? Pass --url with a mirror of the file, or download it by hand to {dest} "
                        f"and rerun this command (it then checks and unpacks it)."
                    ) from None
                raise DownloadError(
                    f"could not download {url}: {_describe(err)} ({tries} tries), stopped at {have:,}"
                    f"{'' if transfer.total is None else f' of {transfer.total:,}'} bytes.\n"
                    f"  The partial file is kept at {part}: rerun the same command to resume it, or pass --url "
                    f"with a mirror."
                ) from None
            wait = BACKOFF_S * 2 ** (failures - 1)
            _say(f"{_describe(err)} ({url}); retrying in {wait:g} s (try {failures + 1} of {tries})")
            time.sleep(wait)
    transfer._sync_hash(transfer.have())
    digest = transfer.hasher.hexdigest()
    verify(part, transfer.total, sha256, digest, source=url)
    os.replace(part, dest)
    transfer.meta.unlink(missing_ok=True)
    return digest


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            hasher.update(block)
    return hasher.hexdigest()


def verify(path: Path, size: int | None, sha256: str | None, digest: str | None = None, source: str = "") -> str:
    """Check ``path`` against a size and a sha256 (either may be None); raise DownloadError, deleting nothing."""
    actual = path.stat().st_size
    keep = f"The file is kept at {path}; delete it (or pass --force) to download it again."
    if size is not None and actual != size:
        raise DownloadError(
            f"size mismatch for {path.name}: {actual:,} bytes, expected {size:,} "
            f"({'the server said' if source else 'published'}). {keep}"
        )
    if digest is None:
        digest = file_sha256(path)
    if sha256 is not None and digest != sha256.lower():
        raise DownloadError(
            f"sha256 mismatch for {path.name}: got {digest}, expected {sha256.lower()} (a corrupt transfer, or "
            f"the file changed on the server between a download and its resume). {keep}"
        )
    return digest


# ----------------------------------------------------------------------------------------------- extract


def archive_kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar")):
        return "tar"
    if lower.endswith(".zip"):
        return "zip"
    return None


def _unsafe(name: str) -> str | None:
    """Why a member name may not be written under the extraction folder, or None."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        return "has an absolute path"
    if ".." in PurePosixPath(posix).parts:
        return "contains '..'"
    return None


def _unsafe_tar_member(member: tarfile.TarInfo) -> str | None:
    reason = _unsafe(member.name)
    if reason:
        return reason
    if member.isdev():
        return "is a device or FIFO"
    if member.issym() or member.islnk():
        link = member.linkname.replace("\\", "/")
        if link.startswith("/") or re.match(r"^[A-Za-z]:", link):
            return f"is a link to an absolute path ({member.linkname!r})"
        # a symlink is relative to its own folder, a hard link to the archive's root
        base = PurePosixPath(member.name).parent if member.issym() else PurePosixPath()
        depth = 0
        for part in (base / link).parts:
            depth += -1 if part == ".." else 0 if part == "." else 1
            if depth < 0:
                return f"is a link that leaves the folder ({member.linkname!r})"
    return None


class _CountingReader:
    """A read-only file wrapper that advances a progress bar by the bytes read."""

    def __init__(self, f, bar: tqdm):
        self.f, self.bar = f, bar

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.bar.update(len(data))
        return data

    def close(self) -> None:
        pass


def extract(archive: Path, into: Path) -> None:
    """Unpack ``archive`` into the folder ``into`` member by member; DownloadError on an unsafe member."""
    into.mkdir(parents=True, exist_ok=True)
    kind = archive_kind(archive.name)
    bar = tqdm(
        total=archive.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"unpack {archive.name}"
    )
    with bar:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    reason = _unsafe(info.filename)
                    if reason:
                        raise DownloadError(f"refusing to unpack {archive}: member {info.filename!r} {reason}")
                    zf.extract(info, into)
                    bar.update(info.compress_size)
            return
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with archive.open("rb") as raw, tarfile.open(fileobj=_CountingReader(raw, bar), mode="r|*") as tar:
            while (member := tar.next()) is not None:
                reason = _unsafe_tar_member(member)
                if reason:
                    raise DownloadError(f"refusing to unpack {archive}: member {member.name!r} {reason}")
                try:
                    tar.extract(member, into, **safe)
                except tarfile.TarError as err:  # the data filter's own refusal
                    raise DownloadError(f"refusing to unpack {archive}: {err}") from None
                tar.members.clear()  # stream mode keeps every member: millions for 2256k


def unpack(archive: Path, root: Path, folder: str, force: bool) -> Path:
    """Extract into a staging folder under ``root``, check it holds ``folder``, then move its entries into root."""
    staging = root / f".{folder}.unpacking"
    if staging.exists():
        _say(f"removing {staging}, left by an interrupted unpack")
        shutil.rmtree(staging)
    try:
        try:
            extract(archive, staging)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
            raise DownloadError(
                f"could not unpack {archive}: {err}. It is kept; delete it (or pass --force) to download it again."
            ) from None
        entries = sorted(p.name for p in staging.iterdir())
        if folder not in entries:
            raise DownloadError(
                f"{archive} does not unpack to {folder}/ (it holds {entries[:10]}); nothing was moved into {root}."
            )
        clashes = [name for name in entries if (root / name).exists() or (root / name).is_symlink()]
        if clashes and not force:
            raise DownloadError(
                f"unpacking {archive} would replace {[str(root / n) for n in clashes]}; move them away or pass --force"
            )
        for name in entries:
            old = root / name
            if old.is_dir() and not old.is_symlink():
                _say(f"--force: replacing {old}")
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                _say(f"--force: replacing {old}")
                old.unlink()
            os.replace(staging / name, old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root / folder


# ----------------------------------------------------------------------------------------------- command


def fetch(
    name: str,
    root: str | Path,
    url: str | None = None,
    extract_archive: bool = True,
    force: bool = False,
    sha256: str | None = None,
    keep_archive: bool = False,
) -> Path:
    """Download (and unpack) the named source under ``root``; returns the folder (or the archive if not unpacked)."""
    key, source = resolve(name)
    url = url or source.url
    sha256 = sha256 or source.sha256
    root = Path(root).expanduser()
    folder, dest = root / source.folder, root / source.file
    part = dest.with_name(dest.name + ".part")
    marker = folder / MARKER
    kind = archive_kind(source.file)
    unpacking = kind is not None and extract_archive

    if not force:
        if marker.is_file():
            print(f"{key}: already present at {folder}; nothing to do (--force downloads it again)")
            return folder
        if unpacking and folder.exists():
            print(
                f"{key}: {folder} already exists but was not made by this command (no {MARKER}); it is left as is. "
                f"Pass --force to download and replace it."
            )
            return folder
    else:
        for stale in (marker, dest, part, part.with_name(part.name + ".json")):
            if stale.exists():
                _say(f"--force: removing {stale}")
                stale.unlink()

    root.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        known = " and ".join(k for k, v in (("size", source.size), ("sha256", sha256)) if v is not None)
        print(
            f"{key}: using {dest} (downloaded earlier or by hand); "
            + (f"checking its {known}" if known else "no published size or sha256 to check it against")
        )
        digest = verify(dest, source.size, sha256)
    else:
        print(f"{key}: {source.about}\n  from {url}\n  to   {dest}")
        digest = download(url, dest, source.size, sha256)
    size = dest.stat().st_size
    print(f"{key}: {dest} ({size:,} bytes, sha256 {digest})")
    if kind is not None and not extract_archive:
        print(f"{key}: not unpacked (--no-extract); rerun without it to unpack {dest}")
        return dest
    if unpacking:
        unpack(dest, root, source.folder, force)
    info = {
        "name": key,
        "url": url,
        "file": source.file,
        "bytes": size,
        "sha256": digest,
        "unpacked": unpacking,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = marker.with_name(MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, marker)
    if unpacking and not keep_archive:
        dest.unlink()
        print(f"{key}: unpacked to {folder}; removed {dest} (--keep-archive keeps it)")
    else:
        print(f"{key}: ready at {folder}")
    return folder


def main(argv: list[str] | None = None) -> int:
    names = ", ".join(SOURCES)
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Download and unpack the published BK-SDM data sets.",
        epilog="\n".join(f"  {n:8s} {s.about}\n           {s.url}" for n, s in SOURCES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", help=f"one of: {names} (or the folder name, e.g. preprocessed_212k)")
    parser.add_argument(
        "--root",
        default=os.environ.get("BKSDM_DATA_DIR") or "data",
        help="where to put it (default: $BKSDM_DATA_DIR, else ./data); the presets read <root>/preprocessed_<n>",
    )
    parser.add_argument("--url", help="download from this address instead (a mirror)")
    parser.add_argument("--no-extract", action="store_true", help="download the archive only")
    parser.add_argument("--force", action="store_true", help="download (and unpack) again even if present")
    parser.add_argument("--sha256", help="check the download against this sha256")
    parser.add_argument("--keep-archive", action="store_true", help="keep the archive after unpacking it")
    args = parser.parse_args(argv)
    if args.sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", args.sha256):
        print(f"{PROG}: error: --sha256 takes 64 hex digits, got {args.sha256!r}", file=sys.stderr)
        return 2
    try:
        fetch(args.name, args.root, args.url, not args.no_extract, args.force, args.sha256, args.keep_archive)
    except DownloadError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
