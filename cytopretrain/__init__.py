"""cytopretrain: curate weakly labelled microscopy collections, pretrain and evaluate models."""

__version__ = "0.1.0"
