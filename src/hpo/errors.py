"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class HpoError(Exception):
    """Base for every error whose message tells the user what was wrong and how to fix it."""


class ConfigError(HpoError):
    """A study file (or a study's stored settings) is invalid."""


class StudyFileNotFound(ConfigError):
    """No study file by that name or path."""


class DataError(HpoError):
    """The study's data is missing, unreadable or malformed, or differs from the study's own."""


class StorageError(HpoError):
    """The storage URL is wrong, the database is unreachable or the study is not there."""
