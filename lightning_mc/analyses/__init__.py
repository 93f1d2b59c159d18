"""Analyses beside the shares: exact Shapley values, bootstrap intervals, the label-aware performance drop.

Each is a torchmetrics accumulator fed by :class:`lightning_mc.ContributionMeasurement`; imports only :mod:`core`.
"""
