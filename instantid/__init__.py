"""InstantID model library (Ray-free)."""
