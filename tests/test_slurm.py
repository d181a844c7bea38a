"""The workflow on a real SLURM cluster through profiles/slurm (snakemake-executor-plugin-slurm).

Needs a running cluster: `.ci/slurm.sh start` (CI starts one before the tests); skipped when
`sinfo` does not answer. The curation half runs once as SLURM jobs and once locally, in two
scratch folders, and both must produce the same tables and the same shard samples. A rule that
fails on a compute node must fail the run, with the job's log naming the cause.

Snakemake ignores SIGTERM while jobs are running, so every run is wrapped in `timeout -k`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from workflow_helpers import DATA, REPO, check, demo_config, real_config, write_config

from cytopretrain.core.tables import read_table
from cytopretrain.curation.shards import iter_shard, load_index, load_labels

pytestmark = pytest.mark.slow

PROFILE = REPO / "profiles" / "slurm"
TARGETS = ["results/shards/index.tsv", "results/funnel.tsv"]
CURATION_RULES = [
    "generate_synthetic",
    "download",
    "clean_metadata",
    "merge_metadata",
    "standardize",
    "assign_labels",
    "upsample_crops",
    "quality_control",
    "select_labels",
    "write_shards",
    "funnel",
]
TIMEOUT = 900  # seconds for the cluster run; it takes 3 to 5 minutes here
# The plugin checks job states `init` seconds after a job finished, then 10 s later each time,
# so a job of T seconds is seen after init, 2 init + 10, ... seconds. A job here takes 11 to 18 s
# (two Snakemake start-ups around the rule): 8 s catches most of them at the second check.
FAST_STATUS = ["--slurm-init-seconds-before-status-checks", "8", "--seconds-between-status-checks", "8"]


def sinfo(*args: str) -> str | None:
    if shutil.which("sinfo") is None:
        return None
    result = subprocess.run(["sinfo", "--noheader", *args], capture_output=True, text=True, timeout=30)
    return result.stdout if result.returncode == 0 else None


def profile_memory(rules: list[str]) -> int:
    """Largest mem_mb the slurm profile requests for these rules."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    requests = [profile["default-resources"]["mem_mb"]]
    requests += [profile["set-resources"].get(rule, {}).get("mem_mb", 0) for rule in rules]
    return max(requests)


def no_cluster(reason: str) -> None:
    """Skip, unless CI started a cluster (CYTOPRETRAIN_REQUIRE_SLURM=1): then it is a failure."""
    if os.environ.get("CYTOPRETRAIN_REQUIRE_SLURM") == "1":
        pytest.fail(f"CI started a SLURM cluster, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def partition() -> str:
    """The cluster's default partition, once its node is ready for jobs."""
    nodes = sinfo("--format=%P %t %m")
    if not nodes:
        no_cluster("no SLURM cluster answers `sinfo` (start one with `.ci/slurm.sh start`)")
    rows = [line.split() for line in nodes.splitlines()]
    ready = [(name, int(memory)) for name, state, memory in rows if name.endswith("*") and state in ("idle", "mix")]
    if not ready:
        no_cluster(f"SLURM answers but has no idle node in a default partition:\n{nodes}")
    name, memory = ready[0]
    if memory < profile_memory(CURATION_RULES):
        no_cluster(f"the SLURM node has {memory} MB, less than profiles/slurm asks for the curation rules")
    return name.rstrip("*")


def curation_config() -> dict:
    """The real subsets in ../shared/data, or else the synthetic demo at a small scale."""
    if DATA.is_dir():
        # Two chunks: the chunked rules still run side by side, in fewer rounds of jobs.
        return {**real_config(), "chunk_size": 1200}
    config = demo_config()
    config["synthetic"]["scale"] = 0.3
    config["labels"].update(min_count=12, take_all_max=36, prelim_max=120)
    config["quality_control"]["min_images_per_label"] = 18
    return config


def run_snakemake(workdir: Path, *args: str, timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """Snakemake on the repository's Snakefile in workdir, killed by `timeout` if it hangs."""
    command = ["timeout", "-k", "10", str(timeout), sys.executable, "-m", "snakemake"]
    command += ["-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    command += ["--configfile", str(workdir / "config.yaml"), *args]
    result = subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, timeout=timeout + 60, env={**os.environ, **(env or {})}
    )
    if result.returncode in (124, 137):  # timeout's codes for TERM, then KILL
        cancel_leftover_jobs(result)
        pytest.fail(f"snakemake hung and was killed after {timeout} s:\n{result.stderr[-4000:]}")
    return result


def cancel_leftover_jobs(result: subprocess.CompletedProcess) -> None:
    """A killed run leaves its jobs queued; they carry the run id as their job name."""
    for run_id in re.findall(r"SLURM run ID: (\S+)", result.stdout + result.stderr):
        subprocess.run(["scancel", "--name", run_id], capture_output=True)


def slurm(workdir: Path, *args: str, partition: str, timeout: int) -> subprocess.CompletedProcess:
    """A run through profiles/slurm, as the README gives it, keeping every job's SLURM log."""
    # No --slurm-status-command here: the profile's `squeue` is what keeps this from hanging.
    options = ["--workflow-profile", str(PROFILE), "--jobs", "2", "--slurm-keep-successful-logs", *FAST_STATUS]
    return run_snakemake(workdir, *options, *args, timeout=timeout, env={"CYTOPRETRAIN_SLURM_PARTITION": partition})


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, partition):
    workdir = tmp_path_factory.mktemp("slurm")
    write_config(workdir, curation_config())
    start = time.monotonic()
    result = check(slurm(workdir, *TARGETS, partition=partition, timeout=TIMEOUT))
    print(f"\ncuration on SLURM: {time.monotonic() - start:.0f} s")
    return workdir, result


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, cluster_run):
    workdir = tmp_path_factory.mktemp("local")
    write_config(workdir, curation_config())
    start = time.monotonic()
    check(run_snakemake(workdir, "--cores", "2", *TARGETS, timeout=TIMEOUT))
    print(f"\nsame curation locally: {time.monotonic() - start:.0f} s")
    return workdir


def table(workdir: Path, name: str) -> pd.DataFrame:
    """A result table with the run's own folder cut out of its text (quarantine details name files)."""
    frame = read_table(workdir / "results" / name)
    return frame.map(lambda value: value.replace(str(workdir), "") if isinstance(value, str) else value)


def shard_samples(shards: Path) -> pd.DataFrame:
    """What a trainer reads from the shards: ids, labels, image shapes and a hash of the pixels.

    Parquet file bytes are not compared: paths to the inputs (channel_paths) live under each
    run's own folder when the sources are generated there.
    """
    rows = [
        {
            "shard": shard,
            "crop_id": sample["crop_id"],
            "idx": sample["idx"],
            "class_index": sample["class_index"],
            "label": sample["label"],
            "shape": (sample["height"], sample["width"], sample["n_channels"]),
            "pixels": hashlib.sha256(sample["pixels"]).hexdigest(),
        }
        for shard in load_index(shards)["shard"]
        for sample in iter_shard(shards / shard)
    ]
    return pd.DataFrame(rows)


def test_cluster_run_produces_the_same_curation_as_a_local_run(cluster_run, local_run):
    cluster, _ = cluster_run
    for name in ("funnel.tsv", "quarantine.tsv"):
        pd.testing.assert_frame_equal(table(cluster, name), table(local_run, name))
    shards_cluster, shards_local = cluster / "results" / "shards", local_run / "results" / "shards"
    pd.testing.assert_frame_equal(load_labels(shards_cluster), load_labels(shards_local))
    content = ["split", "shard", "format", "n_samples", "first_crop_id", "last_crop_id"]
    index = load_index(shards_cluster)
    pd.testing.assert_frame_equal(index[content], load_index(shards_local)[content])
    samples = shard_samples(shards_cluster)
    pd.testing.assert_frame_equal(samples, shard_samples(shards_local))
    assert len(samples) == index["n_samples"].sum() > 0


def test_every_job_ran_as_a_slurm_job(cluster_run, partition):
    workdir, result = cluster_run
    output = result.stdout + result.stderr
    # One rule log per job (every rule declares one) and one SLURM log per submitted job.
    rule_logs = sorted(p.relative_to(workdir / "logs") for p in (workdir / "logs").rglob("*.log"))
    slurm_dir = workdir / ".snakemake" / "slurm_logs"
    slurm_logs = sorted(slurm_dir.rglob("*.log"))  # rule_<rule>/<wildcards>/<SLURM job id>.log
    assert rule_logs and len(slurm_logs) == len(rule_logs)
    rules_on_slurm = {p.relative_to(slurm_dir).parts[0].removeprefix("rule_") for p in slurm_logs}
    assert rules_on_slurm == {p.parts[0] for p in rule_logs}
    job_ids = {log.stem for log in slurm_logs}
    assert len(job_ids) == len(slurm_logs) and all(job_id.isdigit() for job_id in job_ids)
    submitted = set(re.findall(r"has been submitted with SLURM jobid (\d+)", output))
    assert submitted == job_ids
    # Each SLURM log holds the job step that ran the rule on the node.
    for log in slurm_logs:
        assert "Finished jobid" in log.read_text(), log
    # The partition came from CYTOPRETRAIN_SLURM_PARTITION through the profile's default-resources.
    assert f"slurm_partition={partition}," in output
    # The controller still lists the last jobs (MinJobAge): completed, in the partition asked for.
    run_id = re.search(r"SLURM run ID: (\S+)", output).group(1)
    squeue = ["squeue", "--states=all", "--noheader", "--name", run_id, "--format=%i %T %P"]
    rows = [
        line.split() for line in subprocess.run(squeue, capture_output=True, text=True, check=True).stdout.splitlines()
    ]
    assert rows and all(state == "COMPLETED" and part == partition for _, state, part in rows)
    assert {job_id for job_id, _, _ in rows} <= job_ids


def test_a_local_run_submits_nothing(local_run):
    assert not (local_run / ".snakemake" / "slurm_logs").exists()


def test_a_job_failing_on_the_cluster_fails_the_run(tmp_path, partition):
    empty = tmp_path / "empty_bbbc021"
    empty.mkdir()
    config = demo_config()
    config["sources"]["broken"] = {"path": str(empty), "adapter": "bbbc021"}
    write_config(tmp_path, config)
    result = slurm(tmp_path, "results/metadata/sources/broken.parquet", partition=partition, timeout=300)
    assert result.returncode != 0
    log = (tmp_path / "logs" / "clean_metadata" / "broken.log").read_text()
    assert "BBBC021_v1_image.csv" in log
    assert not (tmp_path / "results" / "metadata" / "sources" / "broken.parquet").exists()
    # The failure came back from SLURM, and the job's SLURM log is kept for the user.
    job_id = re.search(r"has been submitted with SLURM jobid (\d+)", result.stdout + result.stderr).group(1)
    assert f"SLURM-job '{job_id}' failed" in result.stdout + result.stderr
    slurm_log = tmp_path / ".snakemake" / "slurm_logs" / "rule_clean_metadata" / "broken" / f"{job_id}.log"
    assert "Error in rule clean_metadata" in slurm_log.read_text()
