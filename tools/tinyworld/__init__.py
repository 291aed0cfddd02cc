"""Tiny-world: the synthetic world, its trainer and evaluator."""
