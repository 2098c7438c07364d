"""Integrations with model libraries: ``transformers`` (instance and class-level patching)."""
