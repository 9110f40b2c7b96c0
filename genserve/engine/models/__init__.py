"""Models: the torch-free registry, loading, the LRU model cache, sampler construction, tiny fixtures."""
