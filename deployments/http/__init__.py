"""Thin HTTP modules over the request core (see docs/architecture.md)."""
