"""Offline model audit: MPSs of several models on the same images, compared as in the paper."""
