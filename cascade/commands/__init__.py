"""CLI command groups; `cascade.cli` mounts them. Bodies stay short and call library code."""
