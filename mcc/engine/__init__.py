"""The cache as a library: blocks, single-flight fetches and the engine that ties them."""
