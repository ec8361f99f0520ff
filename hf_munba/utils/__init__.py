"""Small helpers the front ends share: atomic output folders, model cards and the Hub, plots."""
