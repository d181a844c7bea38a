# cytopretrain: curate a weakly labelled microscopy collection the CytoImageNet way,
# pretrain models on it and evaluate them by transfer.
# Table of contents; each stage lives in workflow/rules/<stage>.smk.


# The demo config, unless the command line names one: experiment configs are complete on their
# own, and merged into the demo they would inherit its sources, training runs and benchmarks.
if not workflow.overwrite_configfiles:

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
include: "workflow/rules/profiles.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
