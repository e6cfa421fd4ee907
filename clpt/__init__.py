"""clpt: continual learning with pre-trained models (see README.md and docs/)."""

__version__ = "0.1.0"

# The front door for using a run (clpt.api), imported on first use so that `import clpt` stays light:
# clpt.classifier, clpt.predict, clpt.add_task, clpt.export, clpt.load_model; clpt.run_one trains.
_API = ("classifier", "predict", "add_task", "export", "load_model")


def __getattr__(name: str):
    if name in _API:
        from clpt import api

        return getattr(api, name)
    if name == "run_one":
        from clpt.run import run_one

        return run_one
    raise AttributeError(f"module 'clpt' has no attribute {name!r}")
