"""Small helpers at the bottom of the layering: every layer (data, stages, the engine, reporting,
the CLI) may import them, and they import nothing of cascade's."""
