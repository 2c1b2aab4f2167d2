"""Features on disk: the crash-safe HDF5 store (`store`) and the cache inventory (`cache`)."""
