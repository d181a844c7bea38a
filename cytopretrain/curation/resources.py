"""Source descriptions: the resource YAMLs of resources/sources/ and the config's inline sources,
validated into one dict per source (where its files live, how to reach them, which adapter
reads them). Every error names the file (or config entry) and the key."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import yaml

from cytopretrain import REPO_ROOT
from cytopretrain.core.errors import (
    ResourceError,
)
from cytopretrain.curation.sources import ADAPTERS

SOURCES_DIR = REPO_ROOT / "resources" / "sources"
TRANSPORTS = ("https", "kaggle", "aspera", "manual", "local")
# The key that each transport needs besides the required ones.
TRANSPORT_KEYS = {"https": "files", "kaggle": "kaggle", "aspera": "aspera", "manual": "instructions", "local": "path"}
ARCHIVES = ("zip", "tar", "tar.gz", "tgz", "tar.bz2", "tar.xz", "none")
REQUIRED_KEYS = ("name", "title", "database", "adapter", "licence", "homepage", "citation", "transport")
OPTIONAL_KEYS = ("files", "kaggle", "aspera", "instructions", "options", "notes", "path", "role")
FILE_KEYS = ("url", "sha256", "archive", "dest", "filename")
# Keys a `sources.<name>` config entry may carry (the download script removes `synthetic`).
CONFIG_KEYS = ("resource", "url", "urls", "sha256", "archive", "adapter", "options", "path", "role")


class _Where:
    """Formats validation errors so that they name the file or the config entry and the key."""

    def __init__(self, origin: str, config_style: bool):
        self.origin = origin
        self.config_style = config_style

    def error(self, key: str, problem: str) -> ResourceError:
        if self.config_style:
            return ResourceError(f"{self.origin}.{key}: {problem}")
        return ResourceError(f"{self.origin}: key '{key}': {problem}")


def resolve_resource_path(path_or_name: str | os.PathLike) -> Path:
    """A bare name means ``resources/sources/<name>.yaml``; anything else is a path."""
    text = str(path_or_name)
    if re.fullmatch(r"[A-Za-z0-9_\-]+", text):
        return SOURCES_DIR / f"{text}.yaml"
    return Path(text)


def load_resource(path_or_name: str | os.PathLike) -> dict:
    """Load and validate one source description (a bare name resolves in resources/sources/)."""
    path = resolve_resource_path(path_or_name)
    if not path.is_file():
        raise ResourceError(f"{path}: source description not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ResourceError(f"{path}: not valid YAML: {exc}") from exc
    where = _Where(str(path), config_style=False)
    if not isinstance(data, dict):
        raise ResourceError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    resource = validate_resource(data, where)
    if resource["name"] != path.stem:
        raise where.error("name", f"{resource['name']!r} differs from the file name {path.stem!r}")
    return resource


def validate_resource(data: dict, where: _Where) -> dict:
    """Check keys and values of a resource; return a copy with defaults filled in."""
    unknown = sorted(set(data) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise where.error(unknown[0], f"unknown key (allowed: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)})")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise where.error(key, "missing")
        if not _is_text(data[key]):
            raise where.error(key, "must be a non-empty string")
    resource = dict(data)
    _check_choice(where, "adapter", resource["adapter"], ADAPTERS)
    _check_choice(where, "transport", resource["transport"], TRANSPORTS)
    if "options" in resource and not isinstance(resource["options"], dict):
        raise where.error("options", "must be a mapping")
    transport = resource["transport"]
    needed = TRANSPORT_KEYS[transport]
    if needed not in resource:
        raise where.error(needed, f"required for transport {transport!r}")
    if transport == "https":
        resource["files"] = _validate_files(resource["files"], where)
    elif transport == "kaggle":
        resource["kaggle"] = _validate_kaggle(resource["kaggle"], where)
    elif transport == "aspera":
        resource["aspera"] = _validate_aspera(resource["aspera"], where)
    elif transport == "manual" and not _is_text(resource["instructions"]):
        raise where.error("instructions", "must be a non-empty string")
    elif transport == "local" and not _is_text(resource["path"]):
        raise where.error("path", "must be a folder path")
    return resource


def _is_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_choice(where: _Where, key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise where.error(key, f"{value!r} is not one of {', '.join(allowed)}")


def _validate_files(files, where: _Where) -> list[dict]:
    if not isinstance(files, list) or not files:
        raise where.error("files", "must be a non-empty list")
    out = []
    seen: dict[str, int] = {}
    for i, item in enumerate(files):
        key = f"files[{i}]"
        if not isinstance(item, dict):
            raise where.error(key, "must be a mapping with at least 'url'")
        unknown = sorted(set(item) - set(FILE_KEYS))
        if unknown:
            raise where.error(f"{key}.{unknown[0]}", f"unknown key (allowed: {', '.join(FILE_KEYS)})")
        out.append(_validate_file_entry(item, where, key))
        name = out[-1]["filename"]
        if name in seen:
            raise where.error(f"{key}.url", f"file name {name!r} repeats files[{seen[name]}]; set 'filename'")
        seen[name] = i
    return out


def _validate_file_entry(item: dict, where: _Where, key: str) -> dict:
    url = item.get("url")
    if not isinstance(url, str) or not url.strip():
        raise where.error(f"{key}.url", "must be a non-empty string")
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file", ""):
        raise where.error(f"{key}.url", f"unsupported scheme {scheme!r} (http, https, file or a local path)")
    sha = item.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha)):
        raise where.error(f"{key}.sha256", "must be 64 hex digits or null")
    archive = item.get("archive") or infer_archive_type(url)
    _check_choice(where, f"{key}.archive", archive, ARCHIVES)
    dest = str(item.get("dest", "."))
    if not _is_safe_relative(dest):
        raise where.error(f"{key}.dest", f"{dest!r} must be a relative folder without '..'")
    filename = item.get("filename") or url_basename(url)
    if not filename or not _is_safe_relative(filename) or "/" in filename:
        raise where.error(f"{key}.filename", f"cannot use {filename!r} as a file name; set 'filename'")
    return {
        "url": url,
        "sha256": sha.lower() if sha else None,
        "archive": "tar.gz" if archive == "tgz" else archive,
        "dest": dest,
        "filename": filename,
    }


def _validate_kaggle(spec, where: _Where) -> dict:
    if not isinstance(spec, dict) or len(set(spec) & {"competition", "dataset"}) != 1 or len(spec) != 1:
        raise where.error("kaggle", "must be {competition: NAME} or {dataset: OWNER/NAME}")
    ((kind, value),) = spec.items()
    if not isinstance(value, str) or not value:
        raise where.error(f"kaggle.{kind}", "must be a non-empty string")
    if kind == "dataset" and not re.fullmatch(r"[^/\s]+/[^/\s]+", value):
        raise where.error("kaggle.dataset", f"{value!r} must be OWNER/NAME")
    return {kind: value}


def _validate_aspera(spec, where: _Where) -> dict:
    if not isinstance(spec, dict):
        raise where.error("aspera", "must be a mapping with user and host")
    allowed = ("user", "host", "port", "remote_path", "rate", "key_file")
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise where.error(f"aspera.{unknown[0]}", f"unknown key (allowed: {', '.join(allowed)})")
    for key in ("user", "host"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise where.error(f"aspera.{key}", "must be a non-empty string")
    port = spec.get("port", 33001)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise where.error("aspera.port", f"{port!r} is not a port number")
    return {
        "user": spec["user"],
        "host": spec["host"],
        "port": port,
        "remote_path": str(spec.get("remote_path", ".")),
        "rate": str(spec.get("rate", "100m")),
        "key_file": spec.get("key_file"),
    }


def resource_from_config(name: str, spec: dict) -> dict:
    """Turn a ``sources.<name>`` config entry into a validated resource dict.

    Forms: ``{resource: NAME_OR_PATH}`` (optionally overriding ``adapter``/``options``),
    ``{url: U, sha256: H, archive: A}``, ``{urls: [U, ...], archive: A}`` (an inline https
    source, adapter ``folder`` unless given) or ``{path: DIR}`` (a local folder; nothing to
    fetch). Errors name ``sources.<name>.<key>``.
    """
    where = _Where(f"sources.{name}", config_style=True)
    if not isinstance(spec, dict):
        raise ResourceError(f"sources.{name}: must be a mapping")
    unknown = sorted(set(spec) - set(CONFIG_KEYS))
    if unknown:
        raise where.error(unknown[0], f"unknown key (allowed: {', '.join(CONFIG_KEYS)})")
    forms = [key for key in ("resource", "url", "urls", "path") if key in spec]
    if len(forms) != 1:
        got = ", ".join(forms) or "none"
        raise ResourceError(f"sources.{name}: give exactly one of resource, url, urls, path (got {got})")
    if spec.get("sha256") is not None and "url" not in spec:
        raise where.error("sha256", "only applies to a single 'url'")
    if "archive" in spec and not ("url" in spec or "urls" in spec):
        raise where.error("archive", "only applies to 'url' or 'urls'")
    extras = {key: spec[key] for key in ("adapter", "options", "role") if key in spec}
    if "resource" in spec:
        if not isinstance(spec["resource"], str) or not spec["resource"]:
            raise where.error("resource", "must be a resource name or a path to a YAML file")
        try:
            base = load_resource(spec["resource"])
        except ResourceError as exc:
            raise ResourceError(f"sources.{name}.resource: {exc}") from exc
        # The config's name is the source's name in the workflow (ids, folders, manifest).
        return validate_resource({**base, **extras, "name": name}, where)
    resource = {
        "name": name,
        "title": f"{name} (defined in the config)",
        "database": "user-supplied",
        "licence": "unknown (user-supplied source)",
        "citation": "unknown (user-supplied source)",
        "adapter": "folder",
        **extras,
    }
    if "path" in spec:
        resource.update(transport="local", homepage=str(spec["path"]), path=spec["path"])
        return validate_resource(resource, where)
    resource.update(transport="https", files=_inline_files(spec, where))
    resource["homepage"] = resource["files"][0]["url"]
    return validate_resource(resource, where)


def _inline_files(spec: dict, where: _Where) -> list[dict]:
    """The file list of a config entry given by ``url`` or ``urls``; errors name the config key."""
    key = "url" if "url" in spec else "urls"
    urls = [spec["url"]] if key == "url" else spec["urls"]
    if not isinstance(urls, list) or not urls:
        raise where.error("urls", "must be a non-empty list of URL strings")
    sha = spec.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha)):
        raise where.error("sha256", "must be 64 hex digits or null")
    if "archive" in spec:
        _check_choice(where, "archive", spec["archive"], ARCHIVES)
    files = []
    for i, url in enumerate(urls):
        item = {"url": url, "sha256": sha}
        if "archive" in spec:
            item["archive"] = spec["archive"]
        try:
            files.append(_validate_file_entry(item, where, f"{key}[{i}]"))
        except ResourceError as exc:
            raise where.error(key if key == "url" else f"urls[{i}]", str(exc).split(": ", 1)[1]) from None
    names = [item["filename"] for item in files]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise where.error(key, f"several URLs end in the same file name {repeated[0]!r}")
    return files


def infer_archive_type(name: str) -> str:
    """Archive type from a file name or URL suffix; ``none`` for anything else."""
    lower = urlsplit(str(name)).path.lower() if "://" in str(name) else str(name).lower()
    for suffix, kind in (
        (".tar.gz", "tar.gz"),
        (".tgz", "tar.gz"),
        (".tar.bz2", "tar.bz2"),
        (".tar.xz", "tar.xz"),
        (".tar", "tar"),
        (".zip", "zip"),
    ):
        if lower.endswith(suffix):
            return kind
    return "none"


def url_basename(url: str) -> str:
    """The last path component of a URL or local path, percent-decoded."""
    return unquote(PurePosixPath(urlsplit(url).path).name) if urlsplit(url).scheme else Path(url).name


def _is_safe_relative(path: str) -> bool:
    parts = re.split(r"[\\/]", path)
    return not (path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path) or ".." in parts)
