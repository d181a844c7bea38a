"""Every rule's conda environment provides what its script imports, and every env file parses.

A rule's imports are its script's, followed through the sibling helper (`scripts/_workflow.py`)
and every `cytopretrain` module reached from there. Third-party top-level modules are mapped to
their distributions with the running environment's metadata (`torch` -> torch, `PIL` ->
pillow, `yaml` -> PyYAML, `sklearn` -> scikit-learn).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RULE = re.compile(r"^(?:rule|checkpoint) (\w+):\n(.*?)(?=^\S|\Z)", re.MULTILINE | re.DOTALL)
DIRECTIVE = r'^\s+{}:\n\s+"([^"]+)"'


def rules() -> dict[str, dict[str, Path]]:
    """rule name -> its script and conda env file, read from workflow/rules/*.smk."""
    found = {}
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for name, body in RULE.findall(smk.read_text()):
            script = re.search(DIRECTIVE.format("script"), body, re.MULTILINE)
            conda = re.search(DIRECTIVE.format("conda"), body, re.MULTILINE)
            if script:
                assert conda, f"rule {name} ({smk.name}) runs a script but declares no conda env"
                found[name] = {
                    "script": (smk.parent / script.group(1)).resolve(),
                    "env": (smk.parent / conda.group(1)).resolve(),
                }
    return found


def module_file(name: str) -> Path | None:
    """The project file of a module name (cytopretrain.x or a scripts/ sibling), if any."""
    parts = name.split(".")
    if parts[0] == "cytopretrain":
        base = REPO.joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None
    sibling = REPO / "scripts" / f"{name}.py"
    return sibling if sibling.is_file() else None


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported by one file (relative imports resolved in the package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = None
    if REPO / "cytopretrain" in path.parents:
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module
            names.add(module)
            # "from cytopretrain import evaluate" imports a submodule.
            names |= {f"{module}.{alias.name}" for alias in node.names if module_file(f"{module}.{alias.name}")}
    return names


def third_party_imports(script: Path) -> dict[str, Path]:
    """Top-level third-party modules reached from a script -> the project file importing it."""
    seen, queue, found = set(), [script], {}
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            local = module_file(name)
            if local:
                queue.append(local)
                # Importing cytopretrain.a.b runs cytopretrain/__init__.py and a/__init__.py too.
                parts = name.split(".")
                queue.extend(REPO.joinpath(*parts[:n], "__init__.py") for n in range(1, len(parts)))
                continue
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ("cytopretrain", "snakemake") and top != "__future__":
                found.setdefault(top, path)
    return found


def env_packages(env: Path) -> set[str]:
    spec = yaml.safe_load(env.read_text())
    assert isinstance(spec, dict) and "dependencies" in spec, f"{env}: not a conda environment file"
    names = set()
    for entry in spec["dependencies"]:
        items = entry["pip"] if isinstance(entry, dict) else [entry]
        for item in items:
            names.add(normalize(re.split(r"[=<>!~ ]", item, maxsplit=1)[0]))
    return names


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def distributions_of_modules() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def missing_from_env(script: Path, env: Path) -> dict[str, str]:
    """Third-party modules the script needs that the env does not provide -> why."""
    distributions = distributions_of_modules()
    provided = env_packages(env)
    missing = {}
    for module, where in sorted(third_party_imports(script).items()):
        candidates = {normalize(d) for d in distributions.get(module, [module])}
        if not candidates & provided:
            shown = where.relative_to(REPO) if REPO in where.parents else where
            missing[module] = f"imported by {shown}; needs one of {sorted(candidates)}"
    return missing


RULES = rules()


def test_every_scripted_rule_is_found():
    assert {"download", "standardize", "train_pretext", "extract_features", "evaluate", "report"} <= set(RULES)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule_env_provides_its_imports(rule):
    script, env = RULES[rule]["script"], RULES[rule]["env"]
    assert script.is_file(), f"rule {rule}: script {script} missing"
    assert env.is_file(), f"rule {rule}: env {env} missing"
    assert missing_from_env(script, env) == {}


@pytest.mark.parametrize("env", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_files_parse_and_pin_every_package(env):
    spec = yaml.safe_load(env.read_text())
    assert spec["channels"] and spec["dependencies"]
    for entry in spec["dependencies"]:
        items = entry["pip"] if isinstance(entry, dict) else [entry]
        for item in items:
            assert re.search(r"==?\d", item), f"{env.name}: {item!r} is not pinned"


def test_the_check_catches_an_import_the_env_lacks(tmp_path):
    script = tmp_path / "needs_sklearn.py"
    script.write_text("import numpy\nfrom sklearn.neighbors import NearestNeighbors\n")
    env = tmp_path / "env.yaml"
    env.write_text("channels: [conda-forge]\ndependencies:\n  - python=3.11\n  - pip:\n      - numpy==2.4.6\n")
    assert set(missing_from_env(script, env)) == {"sklearn"}
    # And through the package: the download env cannot run a script that imports the trainer.
    through_package = tmp_path / "uses_train.py"
    through_package.write_text("from cytopretrain.learning.train import train\n")
    assert "torch" in missing_from_env(through_package, REPO / "envs" / "download.yaml")


def pinned_requirements() -> dict[str, str]:
    """requirements.txt: normalized name -> pinned version."""
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalize(name)] = version
    return pins


def test_the_package_declares_compatible_ranges_that_admit_the_pins():
    """pyproject.toml's dependencies install the library on its own; requirements.txt's exact
    pins (what CI runs) fall inside those ranges, and every third-party module the library
    imports is declared."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(item) for item in project["dependencies"]]
    extras = [Requirement(item) for group in project["optional-dependencies"].values() for item in group]
    pins = pinned_requirements()
    for requirement in declared + extras:
        name = normalize(requirement.name)
        assert name in pins, f"{requirement} is not pinned in requirements.txt"
        assert requirement.specifier.contains(pins[name]), f"{requirement} does not admit the pin {pins[name]}"
        assert requirement.specifier, f"{requirement.name}: give a compatible range"
    distributions = distributions_of_modules()
    provided = {normalize(r.name) for r in declared}
    for path in sorted((REPO / "cytopretrain").rglob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if module_file(name) or top in sys.stdlib_module_names or top in ("cytopretrain", "__future__"):
                continue
            candidates = {normalize(d) for d in distributions.get(top, [top])}
            assert candidates & provided, f"{path.relative_to(REPO)} imports {top}, not in pyproject dependencies"
