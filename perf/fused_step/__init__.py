"""The fused training step, an experiment outside the package (README.md here)."""
