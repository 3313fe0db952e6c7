"""Pure request/response transformations: dict in, dict out, no I/O."""
