"""The measurement options and the analyses they enable (Shapley, redundancy, intervals, precision, performance).

:mod:`~lightning_mc.analyses.options` declares every option once; each analysis (an
:class:`~lightning_mc.analyses.part.Analysis`) owns a torchmetrics accumulator fed by
:class:`lightning_mc.ContributionMeasurement`. Imports only :mod:`core`.
"""
