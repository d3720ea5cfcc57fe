"""Hostile test encoder: answers with D = 7 instead of 8."""

import numpy as np
from _contract import D, answer, frames

answer(lambda item: np.zeros((frames(item), D - 1), np.float32))
