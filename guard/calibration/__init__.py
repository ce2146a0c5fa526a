"""Offline calibration: MPSs of labelled items, the fitted check, and its report."""
