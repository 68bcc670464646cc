"""Evaluation: CORE (core.eval.core) and validation bits-per-byte (core.eval.bpb)."""
