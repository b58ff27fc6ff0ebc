"""One module per method. Importing this package registers them all."""
from .aptp import APTP
from .atp import ATP
from .fastv import FastV
from .ftp import FTP
from .random import RandomDrop
from .shortgpt import ShortGPT
from .skip import SkipRandom, SkipRank
from .tome import ToMe
from .tome_sd import ToMeSD
from .unet_static import UNetStatic
from .visionzip import VisionZip
from .vflowopt import VFlowOpt
from .zero_tprune import ZeroTPrune

__all__ = ["APTP", "ATP", "FastV", "FTP", "RandomDrop", "ShortGPT", "SkipRandom", "SkipRank", "ToMe", "ToMeSD", "UNetStatic", "VFlowOpt", "VisionZip", "ZeroTPrune"]
