rule standardize:
    input:
        table="results/metadata/merged.parquet",
        plan="results/metadata/chunks.json",
    output:
        images="results/standardize/chunk-{chunk}.parquet",
        decisions="results/standardize/decisions/chunk-{chunk}.tsv",
    log:
        "logs/standardize/chunk-{chunk}.log",
    benchmark:
        "benchmarks/standardize/chunk-{chunk}.tsv"
    conda:
        "../../envs/curation.yaml"
    threads: config["standardize"]["threads"]
    resources:
        mem_mb=2000,
    params:
        low=config["standardize"]["low_percentile"],
        high=config["standardize"]["high_percentile"],
        mode=config["standardize"]["channels"],
        min_side=config["standardize"]["min_side"],
        z_projections=get_z_projections(),
    script:
        "../../scripts/standardize.py"
