"""service/intake."""
