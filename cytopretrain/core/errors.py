"""Every error the workflow raises on purpose, under one base.

``CytopretrainError`` is what a caller catches for "this workflow refused the input or could
not finish": each message names the file, the column or the config key at fault. The classes
also keep the builtin base they always had (``ValueError`` for bad input, ``RuntimeError`` for
a failed download or an unbalanced funnel), so existing ``except ValueError`` code still works.

    CytopretrainError
    ├── ConfigError              config key invalid (core.config)
    ├── SettingsError            training settings invalid (learning.settings)
    ├── SchemaError              a table lacks a column or breaks the canonical schema
    ├── QuarantineError          an image set aside: .reason, .detail
    │   ├── ImageReadError       unreadable, unsupported or badly shaped file (core.imageio)
    │   ├── StandardizeError     non-finite pixels (curation.standardize)
    │   └── FeatureInputError    no features from an image (evaluation.features)
    ├── ResourceError            a source description (resources/sources/*.yaml) is invalid
    ├── SourceError              an adapter cannot read a source's layout
    ├── DownloadError            fetching or extracting failed
    │   ├── ChecksumError, UnsafeArchiveError
    │   └── CredentialsRequired, TransportUnavailable, ManualDownloadRequired
    ├── TFRecordError            a corrupt or unexpected TFRecord file
    ├── FunnelError              the per-stage counts do not reconcile
    ├── WeightsError             a weights file does not fit the backbone
    ├── KnnError                 bad kNN arguments
    ├── EvaluationError          a protocol cannot run on a profile table
    ├── ProfileError             a profile table or a table joined to it is unusable
    └── ReportInputError         a report input is missing or malformed
"""

from __future__ import annotations


class CytopretrainError(Exception):
    """Base of the workflow's own errors; the message names what is at fault."""


class ConfigError(CytopretrainError, ValueError):
    """The config is invalid; the message starts with the offending key."""


class SettingsError(CytopretrainError, ValueError):
    """Training settings are missing, unknown or out of range; the message names the key."""


class SchemaError(CytopretrainError, ValueError):
    """A table does not follow the canonical schema; the message names the column."""


class QuarantineError(CytopretrainError, ValueError):
    """An image that a stage sets aside: ``reason`` (a short code, the quarantine table's
    ``reason``) and ``detail`` (what was found, naming the file)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class ImageReadError(QuarantineError):
    """A file that cannot be read as the image it claims to be."""


class StandardizeError(QuarantineError):
    """An image that standardization sets aside after reading it (e.g. non-finite pixels)."""


class FeatureInputError(QuarantineError):
    """An image gives no features (e.g. non-finite pixels)."""


class ResourceError(CytopretrainError, ValueError):
    """A source description is invalid; the message names the file and key."""


class SourceError(CytopretrainError, ValueError):
    """An adapter cannot read a source; the message names the file or option."""


class DownloadError(CytopretrainError, RuntimeError):
    """Fetching or extracting a source failed."""


class ChecksumError(DownloadError):
    """A downloaded file does not have the expected sha256."""


class UnsafeArchiveError(DownloadError):
    """An archive entry would land outside the target folder (absolute, '..' or a link)."""


class CredentialsRequired(DownloadError):
    """The transport needs credentials the user has not provided (e.g. a Kaggle token)."""


class TransportUnavailable(DownloadError):
    """The transport's tool (kaggle, ascp) is not installed."""


class ManualDownloadRequired(DownloadError):
    """The source can only be downloaded by hand; the message says from where and how."""


class TFRecordError(CytopretrainError, ValueError):
    """A TFRecord file is corrupt or holds an unexpected example."""


class FunnelError(CytopretrainError, RuntimeError):
    """The per-stage counts do not reconcile."""


class WeightsError(CytopretrainError, ValueError):
    """A weights file cannot be loaded into the backbone."""


class KnnError(CytopretrainError, ValueError):
    """Invalid arguments to the exact kNN search."""


class EvaluationError(CytopretrainError, ValueError):
    """A protocol cannot run on the given profiles; the message names the protocol."""


class ProfileError(CytopretrainError, ValueError):
    """A profile table (config profiles:) or a table joined to it cannot be used; the message names the config key."""


class ReportInputError(CytopretrainError, ValueError):
    """A report input is missing or malformed; the message names the file."""
