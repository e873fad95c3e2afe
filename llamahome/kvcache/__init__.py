"""KV-cache eviction: budgets, evicting cache layers, policies and the hybrid attention."""
