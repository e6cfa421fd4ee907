"""Datasets: the benchmark readers (registered in `clpt.data.registry`), class orders, loaders, transforms."""

from clpt.data import readers  # noqa: F401  (registers the built-in readers)
