"""Attribute mask builders, the public import path: ``from lightning_mc.masks import Columns, Patches2d``.

They live in :mod:`lightning_mc.core.attribute_builders`; :class:`AttributeMasks` (what a custom builder returns) is
re-exported here too, so a user needs one import path for everything passed as ``Modality(attributes=...)``.
"""

from lightning_mc.core.attribute_builders import ColumnGroups, Columns, CustomMasks, Patches2d, Patches3d, Tokens, Words
from lightning_mc.core.occlusion import AttributeMasks

__all__ = ["AttributeMasks", "ColumnGroups", "Columns", "CustomMasks", "Patches2d", "Patches3d", "Tokens", "Words"]
