rule upsample_crops:
    input:
        images="results/standardize/chunk-{chunk}.parquet",
        selection="results/labels/selection.parquet",
    output:
        crops="results/crops/chunk-{chunk}.parquet",
        images="results/crops/images/chunk-{chunk}.tsv",
    log:
        "logs/upsample_crops/chunk-{chunk}.log",
    benchmark:
        "benchmarks/upsample_crops/chunk-{chunk}.tsv"
    conda:
        "../../envs/curation.yaml"
    resources:
        mem_mb=2000,
    params:
        crops=config["crops"],
        low=config["standardize"]["low_percentile"],
        high=config["standardize"]["high_percentile"],
    script:
        "../../scripts/upsample_crops.py"


rule quality_control:
    input:
        crops="results/crops/chunk-{chunk}.parquet",
    output:
        crops="results/qc/chunk-{chunk}.parquet",
        decisions="results/qc/decisions/chunk-{chunk}.tsv",
    log:
        "logs/quality_control/chunk-{chunk}.log",
    benchmark:
        "benchmarks/quality_control/chunk-{chunk}.tsv"
    conda:
        "../../envs/curation.yaml"
    resources:
        mem_mb=2000,
    params:
        thresholds=config["quality_control"],
    script:
        "../../scripts/quality_control.py"


rule select_labels:
    input:
        decisions=get_qc_decisions,
    output:
        kept="results/qc/labels.tsv",
        dropped="results/qc/dropped_labels.tsv",
    log:
        "logs/select_labels/select_labels.log",
    benchmark:
        "benchmarks/select_labels/select_labels.tsv"
    conda:
        "../../envs/curation.yaml"
    params:
        min_images=config["quality_control"]["min_images_per_label"],
    script:
        "../../scripts/select_labels.py"
