"""The h11 client that fetches from origins and parent caches."""
