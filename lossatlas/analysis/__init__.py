"""Analyses over a run and its results: the probe runner, spike diagnosis, edge of stability, noise scale, reports."""
