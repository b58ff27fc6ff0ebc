"""One module per method. Importing this package registers them all."""
from .fastv import FastV
from .random import RandomDrop

__all__ = ["FastV", "RandomDrop"]
