"""gateway package."""

__all__: list[str] = []
