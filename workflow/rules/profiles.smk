rule evaluate_profiles:
    input:
        unpack(get_profile_inputs),
    output:
        result="results/eval/profiles/{name}.json",
        embedding="results/eval/profiles/{name}.embedding.tsv",
    log:
        "logs/evaluate_profiles/{name}.log",
    benchmark:
        "benchmarks/evaluate_profiles/{name}.tsv"
    wildcard_constraints:
        name=name_pattern(PROFILES),
    conda:
        "../../envs/training.yaml"
    resources:
        mem_mb=4000,
    params:
        spec=lambda wildcards: PROFILES[wildcards.name],
        files=get_profile_files,
    script:
        "../../scripts/evaluate_profiles.py"
