"""Data: sources that list a data set (`sources`), decoding, resizing and augmentation of images
(`decode`, `augment`) and the parallel, ordered batch loader (`loader`)."""

from pipeline.data.sources import (BUILTIN_DEFAULT, SPLITS, Listing, Source, SplitConfig,  # noqa: F401
                                   hash_split, open_source)
