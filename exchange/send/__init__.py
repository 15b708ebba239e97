"""The send side: events -> versions -> bundles in the outbox."""
