"""lossatlas."""
from lossatlas._version import __version__
