"""Stage 3: fine-tune the backbone's top blocks end to end, starting from a fitted head."""

from pipeline.finetune.handover import stage2_inputs  # noqa: F401
from pipeline.finetune.model import build_finetune_model, set_trainable  # noqa: F401
from pipeline.finetune.tuner import FineTuner  # noqa: F401
