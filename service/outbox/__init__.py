"""service/outbox."""
