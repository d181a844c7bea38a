rule evaluate_well_profiles:
    input:
        unpack(get_well_profile_inputs),
    output:
        result="results/eval/well_profiles/{name}.json",
        embedding="results/eval/well_profiles/{name}.embedding.tsv",
    log:
        "logs/evaluate_well_profiles/{name}.log",
    benchmark:
        "benchmarks/evaluate_well_profiles/{name}.tsv"
    wildcard_constraints:
        name=name_pattern(WELL_PROFILES),
    conda:
        "../../envs/training.yaml"
    resources:
        mem_mb=2000,
    params:
        spec=lambda wildcards: WELL_PROFILES[wildcards.name],
        files=get_well_profile_files,
    script:
        "../../scripts/evaluate_well_profiles.py"
