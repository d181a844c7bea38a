rule train_pretext:
    input:
        index="results/shards/index.tsv",
        labels="results/shards/labels.tsv",
    output:
        backbone="results/train/{run}/backbone.pt",
        best_backbone="results/train/{run}/best_backbone.pt",
        method="results/train/{run}/method.pt",
        card=report(
            "results/train/{run}/model_card.json",
            caption="../report/model_card.rst",
            category="Training",
        ),
        metrics="results/train/{run}/metrics.jsonl",
    log:
        "logs/train_pretext/{run}.log",
    benchmark:
        "benchmarks/train_pretext/{run}.tsv"
    wildcard_constraints:
        run=name_pattern([run for run in RUNS if run not in CLUSTERING_RUNS]),
    conda:
        "../../envs/training.yaml"
    threads: lambda wildcards: RUNS[wildcards.run]["threads"]
    resources:
        gpu=lambda wildcards: RUNS[wildcards.run]["gpus"],
        mem_mb=8000,
    params:
        settings=lambda wildcards: run_settings(wildcards.run),
        device=config["training"]["device"],
        processes=lambda wildcards: RUNS[wildcards.run]["processes"],
        # Checkpoints live outside the declared outputs, so a killed job resumes from them.
        work_dir=lambda wildcards, output: os.path.join(
            os.path.dirname(output.backbone), "work"
        ),
    script:
        "../../scripts/train_pretext.py"


# A run whose method assigns clusters (DEC) also writes each training crop's cluster and the centres.
use rule train_pretext as train_clustering with:
    output:
        backbone="results/train/{run}/backbone.pt",
        best_backbone="results/train/{run}/best_backbone.pt",
        method="results/train/{run}/method.pt",
        card=report(
            "results/train/{run}/model_card.json",
            caption="../report/model_card.rst",
            category="Training",
        ),
        metrics="results/train/{run}/metrics.jsonl",
        clusters="results/train/{run}/clusters.parquet",
        centres="results/train/{run}/centres.tsv",
    wildcard_constraints:
        run=name_pattern(CLUSTERING_RUNS),
