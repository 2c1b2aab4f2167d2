"""featurecache: two-stage transfer learning with cached backbone features.

Stage 1 (`pipeline.extract`) runs a frozen backbone once over a data set and stores the features
in HDF5 (`pipeline.store`); stage 2 trains heads on those arrays; stage 3 fine-tunes the top blocks.
"""

__version__ = "0.1.0"
