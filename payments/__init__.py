"""payments package."""

__all__: list[str] = []
