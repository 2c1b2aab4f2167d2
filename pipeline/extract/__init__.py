"""Stage 1: plan a request into a cache key, run the frozen backbone over the data once, store it."""

from pipeline.extract.core import (DEFAULT_CACHE, DTYPES, KEY_VERSION, POOLINGS, PRECISIONS,  # noqa: F401
                                   ExtractRequest, ExtractResult, Plan, RunOptions, _ChunkWriter, _Extraction,
                                   extract, inference_fn, plan)
