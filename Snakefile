# cytopretrain: curate a weakly labelled microscopy collection the CytoImageNet way,
# pretrain models on it and evaluate them by transfer.
# Table of contents; each stage lives in workflow/rules/<stage>.smk.


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/synthetic.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/metadata.smk"
include: "workflow/rules/standardize.smk"
include: "workflow/rules/labels.smk"
include: "workflow/rules/crops.smk"
include: "workflow/rules/shards.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
