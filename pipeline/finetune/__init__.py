"""Stage 3: fine-tune the backbone's top blocks end to end, starting from a fitted head."""

from pipeline.finetune.tuner import FineTuner, build_finetune_model, set_trainable, stage2_inputs  # noqa: F401
