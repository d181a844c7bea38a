"""Rule report: the run's self-contained HTML report (funnel, labels, crops, training, evaluation, outliers)."""

from _workflow import setup_logging

from cytopretrain.report import build_report

log = setup_logging(snakemake)
inputs = snakemake.input
build_report(
    funnel=inputs.funnel,
    quarantine=inputs.quarantine,
    labels=inputs.labels,
    index=inputs.index,
    summary=inputs.summary,
    evaluations=list(inputs.evaluations),
    cards=list(inputs.cards),
    outliers=list(inputs.outliers),
    out_html=snakemake.output.html,
)
log.info("report written to %s", snakemake.output.html)
