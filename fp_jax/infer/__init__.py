"""Inference: the per-op graph baseline, the fused XLA path, latency and export (DESIGN §7)."""
