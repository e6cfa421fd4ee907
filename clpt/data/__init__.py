"""Datasets: the benchmark readers (registered in `clpt.data.registry`), class orders, loaders, transforms."""
