"""Evaluation: benchmark loaders (one question type for all benchmarks) and multiple-choice answer handling."""
