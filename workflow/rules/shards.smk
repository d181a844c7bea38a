rule write_shards:
    input:
        crops=get_qc_crops,
        labels="results/qc/labels.tsv",
        table="results/metadata/merged.parquet",
    output:
        train=directory("results/shards/train"),
        validation=directory("results/shards/validation"),
        index="results/shards/index.tsv",
        labels="results/shards/labels.tsv",
        excluded="results/shards/excluded.tsv",
    log:
        "logs/write_shards/write_shards.log",
    benchmark:
        "benchmarks/write_shards/write_shards.tsv"
    conda:
        "../../envs/curation.yaml"
    resources:
        mem_mb=4000,
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.index),
        shards=config["shards"],
    script:
        "../../scripts/write_shards.py"


rule funnel:
    input:
        source_issues=expand(
            "results/metadata/sources/{source}.issues.tsv", source=PRETRAIN_SOURCES
        ),
        tables=expand(
            "results/metadata/sources/{source}.parquet", source=PRETRAIN_SOURCES
        ),
        standardize=get_standardize_decisions,
        selection="results/labels/selection.parquet",
        crops=get_crop_reports,
        qc=get_qc_decisions,
        dropped="results/qc/dropped_labels.tsv",
        excluded="results/shards/excluded.tsv",
        index="results/shards/index.tsv",
    output:
        funnel=report(
            "results/funnel.tsv", caption="../report/funnel.rst", category="Curation"
        ),
        quarantine="results/quarantine.tsv",
    log:
        "logs/funnel/funnel.log",
    benchmark:
        "benchmarks/funnel/funnel.tsv"
    conda:
        "../../envs/curation.yaml"
    script:
        "../../scripts/funnel.py"
