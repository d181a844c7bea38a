"""The workflow used as a Snakemake module of another workflow (snakedeploy style)."""

import subprocess
import sys

import pytest
import yaml
from workflow_helpers import DATA, REPO

from cytopretrain.curation.shards import load_index

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} is absent"),
]

OUTER = f'''
configfile: "config.yaml"


module cytopretrain:
    snakefile:
        "{REPO / "Snakefile"}"
    config:
        config["cytopretrain"]


use rule * from cytopretrain as cyto_*


rule all:
    input:
        "results/shards/index.tsv",
        "my_label_count.txt",
    default_target: True


rule count_labels:
    input:
        "results/shards/labels.tsv",
    output:
        "my_label_count.txt",
    shell:
        "tail -n +2 {{input}} | wc -l > {{output}}"
'''


def test_outer_workflow_runs_the_module_and_uses_its_outputs(tmp_path):
    (tmp_path / "Snakefile").write_text(OUTER)
    inner = {
        "chunk_size": 1000,
        "sources": {
            "yeast": {"path": str(DATA / "yeast_toy" / "images"), "adapter": "cyclops", "options": {"category": "gene"}}
        },
        "labels": {"min_count": 50, "take_all_max": 300, "prelim_max": 600},
        "crops": {"rules": [[300, 1], [0, 2]], "min_crop_side": 24, "min_image_side": 48},
        "quality_control": {"min_images_per_label": 50},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"cytopretrain": inner}))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    index = load_index(tmp_path / "results" / "shards")
    assert index["n_samples"].sum() > 0
    labels = (tmp_path / "results" / "shards" / "labels.tsv").read_text().splitlines()[1:]
    assert int((tmp_path / "my_label_count.txt").read_text()) == len(labels)
    genes = {line.split("\t")[1] for line in labels if line.split("\t")[2] == "gene"}
    assert genes == {f"{p} targeted" for p in ("aac1", "aac3", "aah1", "aap1", "aar2")}
    # The module's rules ran under their prefixed names.
    assert "cyto_standardize" in result.stderr
