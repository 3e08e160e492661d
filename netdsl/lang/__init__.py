"""The front end: `.net` text to a shaped layer graph (parse, build, and `frontend`'s one call)."""
