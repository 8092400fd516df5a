"""Deprecated path of :mod:`lossatlas.distributed`: importing it gives that very module (the old path goes in the next release)."""

import sys

from lossatlas._moved import moved

sys.modules[__name__] = moved(__name__)
