"""Stage 1: plan a request into a cache key (`plan`), run the frozen backbone over the data once
on any Keras backend (`worker`, `runners`), and store the features chunk by chunk (`writer`)."""

from pipeline.extract.plan import (DEFAULT_CACHE, DTYPES, KEY_VERSION, MAX_IMAGE_SIZE, POOLINGS,  # noqa: F401
                                   PRECISIONS, ExtractRequest, ExtractResult, Plan, RunOptions, plan)
from pipeline.extract.runners import make_runner, release_models, tf_inference_fn  # noqa: F401
from pipeline.extract.worker import ExtractionJob, extract  # noqa: F401
from pipeline.extract.writer import ChunkWriter as _ChunkWriter  # noqa: F401
from pipeline.features.store import assemble  # noqa: F401
