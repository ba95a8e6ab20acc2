"""Proofs: load, soak, drain, faults, the resume bench, nginx and containers."""
