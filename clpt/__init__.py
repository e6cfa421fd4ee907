"""clpt: continual learning with pre-trained models (see README.md and docs/)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `clpt.load_model(EXPORT)`: imported on first use, so `import clpt` stays light
    if name == "load_model":
        from clpt.export import load_model

        return load_model
    raise AttributeError(f"module 'clpt' has no attribute {name!r}")
