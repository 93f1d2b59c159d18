"""Core: the metric and everything it needs to run (modalities, fills, masks, the occlusion engine, results).

Imports nothing from the other layers of the package.
"""
