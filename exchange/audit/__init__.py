"""Auditors and retention."""
