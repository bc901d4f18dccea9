"""Integrations with other libraries (each imported on demand)."""
