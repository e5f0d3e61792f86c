"""blurfast: blur diffusion (coarse-to-fine image synthesis) with its own DCT kernels."""
__version__ = "0.1.0"

from .ops import dct2, idct2, spectral, gaussian_blur  # noqa: F401
from .diffusion import BlurDiffusion  # noqa: F401
from .sampling import sample, timesteps, eta_first, variations  # noqa: F401
from . import (schedules, diffusion, sampling, testing, viz, models, data,  # noqa: F401
               training, checkpoint)
