rule evaluate:
    input:
        unpack(get_evaluate_inputs),
    output:
        result="results/eval/{benchmark}/{model}.json",
        embedding="results/eval/{benchmark}/{model}.embedding.tsv",
    log:
        "logs/evaluate/{benchmark}/{model}.log",
    benchmark:
        "benchmarks/evaluate/{benchmark}/{model}.tsv"
    wildcard_constraints:
        # results/eval/profiles/ belongs to rule evaluate_profiles.
        benchmark=name_pattern(BENCHMARKS),
    conda:
        "../../envs/training.yaml"
    threads: 2
    params:
        benchmark=lambda wildcards: BENCHMARKS[wildcards.benchmark],
    script:
        "../../scripts/evaluate.py"


rule summarize_evaluation:
    input:
        get_summary_inputs,
    output:
        summary=report(
            "results/eval/summary.tsv",
            caption="../report/summary.rst",
            category="Evaluation",
        ),
    log:
        "logs/summarize_evaluation/summarize_evaluation.log",
    benchmark:
        "benchmarks/summarize_evaluation/summarize_evaluation.tsv"
    conda:
        "../../envs/training.yaml"
    params:
        benchmarks=BENCHMARKS,
    script:
        "../../scripts/summarize_evaluation.py"


rule outliers:
    input:
        unpack(get_outlier_inputs),
    output:
        scores=report(
            "results/eval/outliers.tsv",
            caption="../report/outliers.rst",
            category="Quality control",
        ),
    log:
        "logs/outliers/outliers.log",
    benchmark:
        "benchmarks/outliers/outliers.tsv"
    conda:
        "../../envs/training.yaml"
    threads: 2
    params:
        settings=config["outliers"],
        device=config["training"]["device"],
    script:
        "../../scripts/outliers.py"
