"""mapbuild: build offline Kaggle submission bundles for MAP: Charting Student Math Misunderstandings."""

from runtime import __version__

__all__ = ["__version__"]
