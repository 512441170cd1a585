"""service/results."""
