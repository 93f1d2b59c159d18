"""Benchmarks of lightning-mc: the monitor's cost against its floor, the reference loop and Captum.

Run ``python -m benchmarks`` (or ``make bench``); ``python -m benchmarks --quick`` is a fast smoke run. Every
figure is a ratio of two things measured side by side in one run, interleaved and repeated (median and spread).
"""
