"""Stage 2: heads fitted on cached features (`estimators`: logistic and dense; `kernel`: svm and
auto), LR schedules, training on a cache (`training`) and parallel sweeps (`sweep`)."""

from pipeline.heads.estimators import (DenseHead, FeatureSource, LogisticHead, ReducedFeatures,  # noqa: F401
                                       feature_info_of, head_filename, jsonable, load_head, make_head)
from pipeline.heads.kernel import AutoHead, KernelHead  # noqa: F401,E402 - registers "svm" and "auto"
