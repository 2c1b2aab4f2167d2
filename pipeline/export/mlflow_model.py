"""A run's model for MLflow, in its keras flavour: a fine-tune's model.keras, or a fit-head run's head as
its Keras form (`Head.to_keras`: cache features in, probabilities out, as export and fine-tuning build it).
Passed to `tracking.mlflow_log.log_run`, which stays below the stages and knows no head."""

from __future__ import annotations

from typing import Any

from pipeline.errors import UserError
from pipeline.heads.files import load_keras_file
from pipeline.heads.registry import load_head
from pipeline.layout import FINETUNED_MODEL
from pipeline.tracking.mlflow_log import requirements
from pipeline.tracking.runs import RunRecord


def log_model(mlflow: Any, record: RunRecord) -> None:
    """Log the model of a finetune or fit-head run as the MLflow artifact `model` (other stages have none)."""
    import mlflow.keras  # noqa: PLC0415 - optional, and only when logging

    if record.stage == "finetune" and (record.dir / FINETUNED_MODEL).is_file():
        model = load_keras_file(record.dir / FINETUNED_MODEL)
    elif record.stage == "fit-head":
        try:
            model = load_head(record.dir).to_keras()
        except UserError:
            return  # an old pickled head is not loaded without --trust-pickle; the files are still logged
    else:
        return
    mlflow.keras.log_model(model, name="model", pip_requirements=requirements("keras"))
