"""The servers users would pick instead, run on the same model for side-by-side benchmarks."""
