"""The demo exchange."""
