"""Benchmarks: scripts that measure speed and quality as ratios against a baseline measured in the same run."""
