"""Download stage: source descriptions, resumable verified HTTP fetches and safe extraction.

A *resource* is a dict describing one public source (see ``resources/sources/*.yaml``): where
its files live, how to reach them (``transport``: https, kaggle, aspera, manual, or local for a
folder the user already has) and which adapter reads them. :func:`download_source` turns a
resource into a folder of extracted files plus ``download_manifest.json``.

Only the standard library speaks HTTP here: a partial file ``<dest>.part`` survives dropped
connections and interrupted runs and is continued with a ``Range`` request."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

from cytopretrain.core.errors import (
    CredentialsRequired,
    DownloadError,
    ManualDownloadRequired,
    TransportUnavailable,
)
from cytopretrain.core.tables import atomic_path, file_sha256
from cytopretrain.curation.archives import safe_extract
from cytopretrain.curation.fetch import fetch_with_digest
from cytopretrain.curation.resources import infer_archive_type

log = logging.getLogger(__name__)


MANIFEST_NAME = "download_manifest.json"
ASPERA_KEY_CANDIDATES = (
    "~/.aspera/connect/etc/asperaweb_id_dsa.openssh",
    "~/.aspera/cli/etc/asperaweb_id_dsa.openssh",
)


def download_source(
    resource: dict,
    target_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    fetch_options: dict | None = None,
) -> dict:
    """Fetch, verify and extract one source into ``target_dir``; write and return its manifest.

    https: each file goes to ``cache_dir/<name>/`` (default ``target_dir/.downloads``), is
    checked and extracted into ``target_dir/<dest>``; files recorded in an earlier manifest
    with the same URL and checksum are neither fetched nor extracted again. kaggle and aspera
    run their command-line tools when present and otherwise raise :class:`CredentialsRequired`
    or :class:`TransportUnavailable`; manual sources raise :class:`ManualDownloadRequired`.
    ``fetch_options`` (retries, backoff, timeout, chunk_size) are passed on to :func:`fetch`.
    """
    target = Path(target_dir)
    transport = resource["transport"]
    if transport == "manual":
        raise ManualDownloadRequired(
            f"source {resource['name']!r} has no automatic download. {resource['instructions'].strip()}"
        )
    if transport == "local":
        return _local_manifest(resource, target)
    cache = Path(cache_dir) / resource["name"] if cache_dir else target / ".downloads"
    if transport == "https":
        entries = _download_https(resource, target, cache, fetch_options or {})
    elif transport == "kaggle":
        entries = _download_kaggle(resource, target, cache)
    else:
        entries = _download_aspera(resource, target)
    manifest = _manifest(resource, files=entries)
    _write_manifest(target, manifest)
    return manifest


def _manifest(resource: dict, **fields) -> dict:
    head = {key: resource[key] for key in ("transport", "adapter")}
    return {"source": resource["name"], **head, **fields}


def read_manifest(target_dir: str | os.PathLike) -> dict | None:
    path = Path(target_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        log.warning("%s: unreadable manifest ignored; everything is fetched again", path)
        return None


def _write_manifest(target: Path, manifest: dict) -> None:
    target.mkdir(parents=True, exist_ok=True)
    with atomic_path(target / MANIFEST_NAME) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _previous_entries(target: Path) -> dict[str, dict]:
    previous = read_manifest(target) or {}
    return {entry.get("url"): entry for entry in previous.get("files", []) if isinstance(entry, dict)}


def _download_https(resource: dict, target: Path, cache: Path, fetch_options: dict) -> list[dict]:
    previous = _previous_entries(target)
    entries = []
    for item in resource["files"]:
        done = previous.get(item["url"])
        if _still_valid(done, item, target):
            log.info("%s: already fetched and extracted (sha256 %s)", item["url"], done["sha256"])
            entries.append(done)
            continue
        local = cache / item["filename"]
        digest = _reuse_cached(local, item)
        if digest is None:
            local, digest = fetch_with_digest(item["url"], local, item["sha256"], **fetch_options)
        extracted = _place(local, item, target)
        entries.append(
            {
                "url": item["url"],
                "filename": item["filename"],
                "sha256": digest,
                "bytes": local.stat().st_size,
                "archive": item["archive"],
                "dest": item["dest"],
                "extracted_files": extracted,
            }
        )
    return entries


def _still_valid(done: dict | None, item: dict, target: Path) -> bool:
    """An earlier manifest entry stands if it matches the URL, checksum, placement and folder."""
    if not done or "sha256" not in done or "extracted_files" not in done:
        return False
    if item["sha256"] and done["sha256"] != item["sha256"]:
        return False
    if done.get("archive") != item["archive"] or done.get("dest") != item["dest"]:
        return False
    placed = target / item["dest"]
    return (placed / item["filename"]).is_file() if item["archive"] == "none" else placed.is_dir()


def _reuse_cached(local: Path, item: dict) -> str | None:
    """Digest of an already downloaded file when it may be reused (renamed into place = complete)."""
    if not local.is_file():
        return None
    digest = file_sha256(local)
    if item["sha256"] and digest != item["sha256"]:
        log.warning("%s: cached sha256 %s, expected %s; fetching again", local, digest, item["sha256"])
        local.unlink()
        return None
    log.info("%s: reusing cached %s", item["url"], local)
    return digest


def _place(local: Path, item: dict, target: Path) -> int:
    """Extract an archive, or put a plain file, into ``target/dest``; return the file count."""
    dest_dir = target / item["dest"]
    if item["archive"] != "none":
        return len(safe_extract(local, dest_dir, item["archive"]))
    dest = dest_dir / item["filename"]
    if dest.resolve() != local.resolve():
        with atomic_path(dest) as tmp:
            tmp.unlink()
            try:
                os.link(local, tmp)  # same file system: no second copy of a large file
            except OSError:
                shutil.copyfile(local, tmp)
    return 1


def _local_manifest(resource: dict, target: Path) -> dict:
    folder = Path(resource["path"])
    if not folder.is_dir():
        raise DownloadError(f"source {resource['name']!r}: path {folder} is not a folder")
    manifest = _manifest(resource, path=str(folder.resolve()), files=[])
    _write_manifest(target, manifest)
    return manifest


def kaggle_credentials_present() -> bool:
    """Kaggle's CLI reads KAGGLE_USERNAME + KAGGLE_KEY or kaggle.json in KAGGLE_CONFIG_DIR / ~/.kaggle."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")
    return (config_dir / "kaggle.json").is_file()


def _kaggle_help(resource: dict, missing: list[str]) -> str:
    spec = resource["kaggle"]
    page = (
        f"https://www.kaggle.com/c/{spec['competition']}/rules"
        if "competition" in spec
        else f"https://www.kaggle.com/datasets/{spec['dataset']}"
    )
    return (
        f"source {resource['name']!r} is downloaded from Kaggle, but {' and '.join(missing)}. "
        "To download it automatically: (1) install the client with `pip install kaggle`; "
        "(2) create an API token in your kaggle.com account settings (API -> Create New Token), save it as "
        "~/.kaggle/kaggle.json with `chmod 600 ~/.kaggle/kaggle.json`, or set the environment "
        f"variables KAGGLE_USERNAME and KAGGLE_KEY; (3) accept the rules on {page} while logged in. "
        f"Alternatively download and unpack the data by hand and set `path:` for sources.{resource['name']} "
        "in the config to that folder."
    )


def _download_kaggle(resource: dict, target: Path, cache: Path) -> list[dict]:
    missing = []
    executable = shutil.which("kaggle")
    if executable is None:
        missing.append("the `kaggle` command is not on PATH")
    if not kaggle_credentials_present():
        missing.append("no Kaggle API token was found (~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY)")
    if missing:
        raise CredentialsRequired(_kaggle_help(resource, missing))
    spec = resource["kaggle"]
    cache.mkdir(parents=True, exist_ok=True)
    if "competition" in spec:
        command = [executable, "competitions", "download", "-c", spec["competition"], "-p", str(cache)]
    else:
        command = [executable, "datasets", "download", "-d", spec["dataset"], "-p", str(cache)]
    _run_tool(command, resource, "kaggle")
    archives = sorted(p for p in cache.iterdir() if p.is_file() and not p.name.endswith(".part"))
    if not archives:
        raise DownloadError(f"source {resource['name']!r}: `{' '.join(command)}` left no file in {cache}")
    previous = _previous_entries(target)
    entries = []
    for local in archives:
        digest = file_sha256(local)
        url = f"kaggle:{next(iter(spec.values()))}/{local.name}"
        archive = infer_archive_type(local.name)
        item = {"url": url, "filename": local.name, "sha256": digest, "archive": archive, "dest": "."}
        done = previous.get(url)
        if _still_valid(done, item, target):
            entries.append(done)
            continue
        extracted = _place(local, item, target)
        entries.append({**item, "bytes": local.stat().st_size, "extracted_files": extracted})
    return entries


def _download_aspera(resource: dict, target: Path) -> list[dict]:
    spec = resource["aspera"]
    executable = shutil.which("ascp")
    alternative = (
        "Alternatively download the files by hand (for IDR screens see "
        "https://idr.openmicroscopy.org/about/download.html) and set `path:` for "
        f"sources.{resource['name']} in the config to that folder."
    )
    if executable is None:
        raise TransportUnavailable(
            f"source {resource['name']!r} is served over Aspera, but `ascp` is not on PATH. Install IBM Aspera "
            "Connect or the aspera-cli (`ascp` and its key file asperaweb_id_dsa.openssh) and put ascp on PATH. "
            + alternative
        )
    key = _aspera_key(spec)
    if key is None:
        raise TransportUnavailable(
            f"source {resource['name']!r}: no Aspera key file found; set aspera.key_file in the resource, the "
            f"environment variable ASPERA_KEY, or place it at {ASPERA_KEY_CANDIDATES[0]}. " + alternative
        )
    target.mkdir(parents=True, exist_ok=True)
    command = [
        executable,
        "-T",
        "-k",
        "1",
        "-l",
        spec["rate"],
        "-P",
        str(spec["port"]),
        "-i",
        str(key),
        f"{spec['user']}@{spec['host']}:{spec['remote_path']}",
        str(target),
    ]
    _run_tool(command, resource, "ascp")
    files = [p for p in target.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
    return [
        {
            "url": f"aspera://{spec['user']}@{spec['host']}:{spec['port']}/{spec['remote_path']}",
            "sha256": None,
            "bytes": sum(p.stat().st_size for p in files),
            "archive": "none",
            "dest": ".",
            "extracted_files": len(files),
        }
    ]


def _aspera_key(spec: dict) -> Path | None:
    candidates = [spec.get("key_file"), os.environ.get("ASPERA_KEY"), *ASPERA_KEY_CANDIDATES]
    for candidate in candidates:
        if candidate and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser()
    return None


def _run_tool(command: list[str], resource: dict, tool: str) -> None:
    log.info("running %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    for line in (result.stdout + result.stderr).splitlines():
        log.info("%s: %s", tool, line)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        forbidden = tool == "kaggle" and "403" in tail
        hint = " (403: accept the rules on the Kaggle website first)" if forbidden else ""
        raise DownloadError(f"source {resource['name']!r}: {tool} exited with code {result.returncode}{hint}: {tail}")


def transport_problem(resource: dict) -> str | None:
    """What the user must provide before this source can download, or None if nothing.

    Checked without contacting anything, so a dry run can say it up front: Kaggle needs its
    client and an API token, Aspera needs ``ascp``, manual sources need the user's download.
    """
    transport = resource["transport"]
    if transport == "kaggle":
        missing = []
        if shutil.which("kaggle") is None:
            missing.append("the `kaggle` command is not on PATH")
        if not kaggle_credentials_present():
            missing.append("no Kaggle API token was found (~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY)")
        return _kaggle_help(resource, missing) if missing else None
    if transport == "aspera" and shutil.which("ascp") is None:
        return (
            f"source {resource['name']!r} is served over Aspera, but `ascp` is not on PATH: install IBM "
            f"Aspera Connect or the aspera-cli, or download by hand and set `path:` for sources.{resource['name']}"
        )
    if transport == "manual":
        return f"source {resource['name']!r} must be downloaded by hand: {resource['instructions']}"
    return None
