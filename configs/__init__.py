"""Shipped YAML configs; a package only so that wheels carry them (see pyproject.toml)."""
