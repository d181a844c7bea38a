rule generate_synthetic:
    output:
        archives=expand("results/synthetic/archives/{layout}.zip", layout=LAYOUTS),
        ground_truth="results/synthetic/ground_truth.csv",
    log:
        "logs/generate_synthetic/generate_synthetic.log",
    benchmark:
        "benchmarks/generate_synthetic/generate_synthetic.tsv"
    conda:
        "../../envs/curation.yaml"
    threads: 2
    params:
        seed=config["synthetic"]["seed"],
        scale=config["synthetic"]["scale"],
        image_size=config["synthetic"]["image_size"],
        layouts=LAYOUTS,
    script:
        "../../scripts/generate_synthetic.py"
