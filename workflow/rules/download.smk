rule download:
    input:
        get_download_input,
    output:
        directory("results/download/{source}"),
    log:
        "logs/download/{source}.log",
    benchmark:
        "benchmarks/download/{source}.tsv"
    conda:
        "../../envs/download.yaml"
    resources:
        downloads=1,
    params:
        spec=lambda wildcards: SOURCES[wildcards.source],
        cache=config["download_cache"],
    script:
        "../../scripts/download.py"
