rule extract_features:
    input:
        table=get_benchmark_table,
        weights=get_model_weights,
    output:
        profiles="results/features/{benchmark}/{model}.parquet",
        failures="results/features/{benchmark}/{model}.failures.tsv",
    log:
        "logs/extract_features/{benchmark}/{model}.log",
    benchmark:
        "benchmarks/extract_features/{benchmark}/{model}.tsv"
    wildcard_constraints:
        model=name_pattern(EXTRACTED_MODELS),
    conda:
        "../../envs/training.yaml"
    threads: 2
    resources:
        mem_mb=4000,
    params:
        model=lambda wildcards: model_spec(wildcards.model),
        features=FEATURES,
        device=config["training"]["device"],
        z_projection=lambda wildcards: get_z_projections().get(
            BENCHMARKS[wildcards.benchmark]["source"]
        ),
    script:
        "../../scripts/extract_features.py"


rule fuse_features:
    input:
        unpack(get_fusion_inputs),
    output:
        profiles="results/features/{benchmark}/{model}.parquet",
    log:
        "logs/fuse_features/{benchmark}/{model}.log",
    benchmark:
        "benchmarks/fuse_features/{benchmark}/{model}.tsv"
    wildcard_constraints:
        model=name_pattern(FUSIONS),
    conda:
        "../../envs/training.yaml"
    script:
        "../../scripts/fuse_features.py"


rule assign_clusters:
    input:
        table=get_benchmark_table,
        method="results/train/{model}/method.pt",
        card="results/train/{model}/model_card.json",
    output:
        clusters="results/features/{benchmark}/{model}.clusters.parquet",
    log:
        "logs/assign_clusters/{benchmark}/{model}.log",
    benchmark:
        "benchmarks/assign_clusters/{benchmark}/{model}.tsv"
    wildcard_constraints:
        model=name_pattern(CLUSTERING_RUNS),
    conda:
        "../../envs/training.yaml"
    threads: 2
    resources:
        mem_mb=4000,
    params:
        features=FEATURES,
        device=config["training"]["device"],
        z_projection=lambda wildcards: get_z_projections().get(
            BENCHMARKS[wildcards.benchmark]["source"]
        ),
    script:
        "../../scripts/assign_clusters.py"
