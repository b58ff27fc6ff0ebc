"""tokenprune: remove, skip or merge tokens inside transformer models you already use.

    import tokenprune as tp
    with tp.pruning(model, tp.FastV(layer=2, keep_ratio=0.5)) as handle:
        out = model.generate(**inputs, max_new_tokens=32)
        print(handle.stats.summary())
"""
from . import methods, zoo
from .errors import AlreadyAttachedError, TokenPruneError, UnsupportedModelError
from .handle import PruningHandle, prune, pruning
from .methods import APTP, ATP, FastV, FTP, RandomDrop, ShortGPT, SkipRandom, SkipRank, ToMe, ToMeSD, VFlowOpt, VisionZip, ZeroTPrune
from .pruner import ModelFacts, Pruner, build_pruner, list_pruners, register_pruner
from .reductions import Drop, Merge, Reduction, Skip
from .state import Segment, TokenState
from .stats import Stats

__version__ = "0.1.0"

__all__ = [
    "APTP", "ATP", "AlreadyAttachedError", "Drop", "FastV", "FTP", "Merge", "ModelFacts", "Pruner", "PruningHandle", "RandomDrop", "Reduction", "ShortGPT", "SkipRandom", "SkipRank",
    "Segment", "Skip", "Stats", "TokenPruneError", "TokenState", "UnsupportedModelError", "build_pruner",
    "list_pruners", "methods", "prune", "pruning", "register_pruner", "ToMe", "ToMeSD", "VFlowOpt", "VisionZip", "ZeroTPrune", "zoo",
]
