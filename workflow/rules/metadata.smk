rule clean_metadata:
    input:
        root=get_source_root,
        listing=get_source_listing,
    output:
        table="results/metadata/sources/{source}.parquet",
        issues="results/metadata/sources/{source}.issues.tsv",
    log:
        "logs/clean_metadata/{source}.log",
    benchmark:
        "benchmarks/clean_metadata/{source}.tsv"
    conda:
        "../../envs/curation.yaml"
    params:
        adapter=lambda wildcards: source_adapter(wildcards.source),
        options=lambda wildcards: SOURCES[wildcards.source]["options"],
    script:
        "../../scripts/clean_metadata.py"


checkpoint merge_metadata:
    input:
        unpack(get_merge_inputs),
    output:
        table="results/metadata/merged.parquet",
        issues="results/metadata/issues.tsv",
        plan="results/metadata/chunks.json",
    log:
        "logs/merge_metadata/merge_metadata.log",
    benchmark:
        "benchmarks/merge_metadata/merge_metadata.tsv"
    conda:
        "../../envs/curation.yaml"
    resources:
        mem_mb=8000,
    params:
        chunk_size=config["chunk_size"],
    script:
        "../../scripts/merge_metadata.py"


rule describe_metadata:
    input:
        table="results/metadata/merged.parquet",
    output:
        summary="results/metadata/description/summary.png",
        counts="results/metadata/description/counts.tsv",
    log:
        "logs/describe_metadata/describe_metadata.log",
    benchmark:
        "benchmarks/describe_metadata/describe_metadata.tsv"
    conda:
        "../../envs/curation.yaml"
    script:
        "../../scripts/describe_metadata.py"
