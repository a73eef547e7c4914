"""`syncd run`: the long-running service (schedule, HTTP server, metrics)."""
