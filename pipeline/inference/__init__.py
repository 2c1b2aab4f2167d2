"""Using results: apply a recorded run to new images (`apply`), run a backbone over files (`embed`)."""

from pipeline.inference.apply import LoadedRun, evaluate_run, load_run, predict_paths  # noqa: F401
