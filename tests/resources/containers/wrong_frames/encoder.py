"""Hostile test encoder: answers with 10x too many frames."""

import numpy as np
from _contract import D, answer, frames

answer(lambda item: np.zeros((10 * frames(item), D), np.float32))
