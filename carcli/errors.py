"""Exceptions for what a user can cause; each message is one line."""

from __future__ import annotations


class UsageError(ValueError):
    """Arguments that make no sense together (exit code 2); the message is one line."""


class ProcessingError(RuntimeError):
    """One image cannot be processed; the message is one line for the user."""
