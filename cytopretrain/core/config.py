"""Config validation: the JSON schema in workflow/schemas plus the checks a schema cannot say.

Every error names the offending key as a dotted path (``sources.rxrx1.adapter``). Options the
schema leaves open are checked here too, before any job: each source's adapter options (the
adapter's own names and value checks, curation.sources.validate_options) and each run's
method_options (the option names of its pretext method, learning.pretext.method_options).
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import jsonschema
import yaml

from cytopretrain import REPO_ROOT
from cytopretrain.core.errors import ConfigError, SourceError

SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


# Table formats a profiles file may have, by file-name ending (cytopretrain.evaluation.profiles
# reads them); checked here so a wrong file stops the run before any job.
TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet")
# results/eval/profiles/ holds the profiles results, so no benchmark may take the name.
PROFILES_DIR = "profiles"


def _with_defaults(validator_class):
    """A validator class that fills in ``default`` values while it validates."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<config>"


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "oneOf" and error.path and error.path[0] == "sources":
        return (
            f"config key 'sources.{_key(list(error.path)[1:])}': give exactly one of "
            "resource, url, urls, synthetic, path"
        )
    if error.validator == "oneOf" and error.path and error.path[0] == "profiles":
        return (
            f"config key '{_key(error.path)}': give a file path or {{source: <source name>, "
            "file: <path inside its folder>}"
        )
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - allowed)
        if unknown:
            return (
                f"config key '{_key([*error.path, unknown[0]])}': unknown key "
                f"(allowed here: {', '.join(sorted(allowed))})"
            )
    return f"config key '{_key(error.path)}': {error.message}"


def load_schema(schema_path: str | Path = SCHEMA_PATH) -> dict:
    """The config schema with every ``enum_from: module.NAME`` replaced by ``enum:`` and the
    names of the library constant it points at (a tuple, or a dict's keys)."""
    return _resolve_enums(yaml.safe_load(Path(schema_path).read_text()))


def _resolve_enums(node):
    if isinstance(node, dict):
        node = {key: _resolve_enums(value) for key, value in node.items()}
        if "enum_from" in node:
            module, _, name = node.pop("enum_from").rpartition(".")
            node["enum"] = list(getattr(importlib.import_module(module), name))
        return node
    if isinstance(node, list):
        return [_resolve_enums(item) for item in node]
    return node


def validate_config(config: dict, schema_path: str | Path = SCHEMA_PATH) -> dict:
    """Validate ``config`` in place (filling defaults) and return it; raise ConfigError."""
    schema = load_schema(schema_path)
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.path), list(map(str, e.path))))
    if errors:
        raise ConfigError(_describe(errors[0]))
    _check_semantics(config)
    return config


def _check_semantics(config: dict) -> None:
    for section in ("standardize", "quality_control"):
        low, high = config[section]["low_percentile"], config[section]["high_percentile"]
        if low >= high:
            raise ConfigError(f"config key '{section}.low_percentile': {low} must be below high_percentile {high}")
    labels = config["labels"]
    if not labels["min_count"] <= labels["take_all_max"] <= labels["prelim_max"]:
        raise ConfigError(
            "config key 'labels': need min_count <= take_all_max <= prelim_max, got "
            f"{labels['min_count']}, {labels['take_all_max']}, {labels['prelim_max']}"
        )
    thresholds = [rule[0] for rule in config["crops"]["rules"]]
    if thresholds != sorted(thresholds, reverse=True) or thresholds[-1] != 0:
        raise ConfigError(
            "config key 'crops.rules': thresholds must decrease and end with 0 so every class "
            f"size matches a rule, got {thresholds}"
        )
    for name, spec in config["sources"].items():
        # Files sources are only downloaded: no adapter reads them.
        if "adapter" not in spec and "resource" not in spec and spec["role"] != "files":
            raise ConfigError(f"config key 'sources.{name}.adapter': required unless a resource YAML names it")
    _check_source_options(config["sources"])
    models = _check_learning(config)
    _check_profiles(config, models)
    # Curation only runs for pretrain sources, so a config without them must evaluate something.
    has_pretrain = any(spec["role"] == "pretrain" for spec in config["sources"].values())
    if config["training"]["runs"] and not has_pretrain:
        raise ConfigError(
            "config key 'sources': training.runs train on the curated set, so at least one source needs role 'pretrain'"
        )
    if not has_pretrain and not config["profiles"] and not (config["benchmarks"] and models):
        raise ConfigError(
            "config key 'sources': nothing to do: no source has role 'pretrain', no benchmark has a "
            "model (training.runs or features.external) and profiles is empty"
        )


def _check_source_options(sources: dict) -> None:
    """Each cleaned source's adapter options, as its adapter will read them."""
    from cytopretrain.curation.resources import load_resource
    from cytopretrain.curation.sources import validate_options

    for name, spec in sources.items():
        if spec["role"] == "files":
            continue
        adapter = spec.get("adapter") or load_resource(spec["resource"])["adapter"]
        try:
            validate_options(adapter, name, spec["options"])
        except SourceError as exc:
            raise ConfigError(str(exc)) from None


def _check_method_options(name: str, run: dict) -> None:
    """A run's method_options against the option names its pretext method declares (and those
    it has no default for)."""
    from cytopretrain.learning.pretext import method_options, required_options

    allowed = method_options(run["method"])
    for option in run["method_options"]:
        if option not in allowed:
            raise ConfigError(
                f"config key 'training.runs.{name}.method_options.{option}': unknown option; "
                f"method {run['method']} accepts: {', '.join(allowed) or 'no options'}"
            )
    for option in required_options(run["method"]):
        if option not in run["method_options"]:
            raise ConfigError(
                f"config key 'training.runs.{name}.method_options.{option}': method {run['method']} needs it"
            )


def random_baselines(runs: dict) -> dict[str, str]:
    """Random-init baseline name -> the run it stands beside.

    A random-init backbone's features depend only on the architecture, input channels, seed and
    (ViTs) pooled feature, so runs sharing all four share one baseline, ``random_<first such
    run>``: extracting it twice would give the same features.
    """
    baselines: dict[str, str] = {}
    seen: set[tuple] = set()
    for name, run in runs.items():
        key = (run["backbone"], run["in_channels"], run["seed"], run.get("pool"))
        if key not in seen:
            seen.add(key)
            baselines[f"random_{name}"] = name
    return baselines


def _check_learning(config: dict) -> set[str]:
    """Check runs, features, benchmarks and outliers; return the names of the evaluated models."""
    runs = config["training"]["runs"]
    features = config["features"]
    for name, run in runs.items():
        _check_method_options(name, run)
        # Under torchrun every CUDA rank takes its own GPU (LOCAL_RANK).
        if run["gpus"] and run["processes"] > run["gpus"]:
            raise ConfigError(
                f"config key 'training.runs.{name}.processes': {run['processes']} GPU processes "
                f"need gpus >= processes, got gpus: {run['gpus']}"
            )
    models = {*runs, *features["external"]}
    if features["random_baseline"]:
        models |= set(random_baselines(runs))
    for name in features["external"]:
        if name in runs or name in features["fusion"]:
            raise ConfigError(f"config key 'features.external.{name}': the name is already a run or fusion")
    for name, members in features["fusion"].items():
        if name in models:
            raise ConfigError(f"config key 'features.fusion.{name}': the name is already a model")
        for member in members:
            if member not in models:
                raise ConfigError(
                    f"config key 'features.fusion.{name}': unknown model {member!r} "
                    f"(models: {', '.join(sorted(models)) or 'none'})"
                )
    for name, benchmark in config["benchmarks"].items():
        if name == PROFILES_DIR:
            raise ConfigError(
                f"config key 'benchmarks.{name}': the name is reserved for the profiles results "
                f"(results/eval/{PROFILES_DIR}/)"
            )
        source = config["sources"].get(benchmark["source"])
        if source is None or source["role"] != "benchmark":
            valid = sorted(n for n, spec in config["sources"].items() if spec["role"] == "benchmark")
            raise ConfigError(
                f"config key 'benchmarks.{name}.source': {benchmark['source']!r} is not a source with role "
                f"'benchmark'; sources with that role: {', '.join(valid) or 'none'}"
            )
    outlier_run = config["outliers"]["run"]
    if outlier_run is not None and runs.get(outlier_run, {}).get("method") != "autoencoder":
        raise ConfigError(f"config key 'outliers.run': {outlier_run!r} is not a training run with method autoencoder")
    return models | set(features["fusion"])


def _table_files(spec: dict, key: str) -> list[tuple[str, object]]:
    """(config key, file) of every table a profiles entry reads."""
    files = [(f"{key}.path", spec["path"])]
    files += [(f"{key}.join[{n}].path", join["path"]) for n, join in enumerate(spec["join"])]
    return files


def _check_profiles(config: dict, models: set[str]) -> None:
    """Names, roles, table files and the sources they come from; every files source must be read."""
    from cytopretrain.evaluation.profiles import PROTOCOL_ROLES

    sources = config["sources"]
    read_from = set()
    for name, spec in config["profiles"].items():
        key = f"profiles.{name}"
        if (spec["benchmark"] in config["benchmarks"] or spec["benchmark"] is None) and name in models:
            raise ConfigError(
                f"config key '{key}': the name is already a model; both would be rows {spec['benchmark'] or name} "
                f"/ {name} of summary.tsv"
            )
        for protocol in spec["protocols"]:
            missing = [role for role in PROTOCOL_ROLES[protocol] if not spec[role]]
            if missing:
                raise ConfigError(f"config key '{key}.protocols': {protocol} needs {' and '.join(missing)}")
        if "replicate_map" in spec["protocols"] and spec["aggregate"] != "none":
            raise ConfigError(f"config key '{key}.aggregate': replicate_map needs the replicates; use aggregate: none")
        if spec["normalize"]["fit"] == "controls" and not spec["controls"]:
            raise ConfigError(f"config key '{key}.normalize.fit': 'controls' needs `controls`")
        if spec["normalize"]["by_batch"] and not spec["batch"]:
            raise ConfigError(f"config key '{key}.normalize.by_batch': needs `batch`")
        for where, file in _table_files(spec, key):
            if isinstance(file, dict):
                if file["source"] not in sources:
                    raise ConfigError(
                        f"config key '{where}.source': {file['source']!r} is not a source "
                        f"(sources: {', '.join(sorted(sources)) or 'none'})"
                    )
                read_from.add(file["source"])
                where, file = f"{where}.file", file["file"]
                parts = Path(file).parts
                if Path(file).is_absolute() or ".." in parts:
                    raise ConfigError(
                        f"config key '{where}': {file!r} must be a relative path inside the "
                        "source's folder, without '..'"
                    )
            if not file.lower().endswith(TABLE_SUFFIXES):
                raise ConfigError(
                    f"config key '{where}': {file!r} is not a table this reads ({', '.join(TABLE_SUFFIXES)})"
                )
    for name, spec in sources.items():
        if spec["role"] == "files" and name not in read_from:
            raise ConfigError(
                f"config key 'sources.{name}.role': a 'files' source is only downloaded for "
                "profiles, and no profiles entry reads from it"
            )
