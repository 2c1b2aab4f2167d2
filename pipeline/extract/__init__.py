"""Stage 1, named by its flow: plan a request into a cache key (`plan`), guard it once and hand it
to a distributor (`distributor`: local, --shard; `ray_distributor`), whose runner (`runner`) runs
reader -> mapper (`mapper`: the backbone on any Keras backend) -> writer (`writer`) chunk by chunk."""

from pipeline.extract.concat import cache_path, is_concat, part_names, part_requests  # noqa: F401
from pipeline.extract.distributor import Distributor, extract, local, shard  # noqa: F401
from pipeline.extract.mapper import make_runner, release_models, tf_inference_fn  # noqa: F401
from pipeline.extract.plan import (DEFAULT_CACHE, DTYPES, KEY_VERSION, MAX_IMAGE_SIZE, POOLINGS,  # noqa: F401
                                   PRECISIONS, ExtractRequest, ExtractResult, Plan, RunOptions, plan)
from pipeline.extract.runner import ExtractionJob  # noqa: F401
from pipeline.extract.writer import ChunkWriter  # noqa: F401
from pipeline.features.store import assemble  # noqa: F401
