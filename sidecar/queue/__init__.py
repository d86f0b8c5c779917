"""Queue stores: the LocalQueue fallback, the RedisQueue primary, and the manager between them."""
