"""A node home: its configuration, keys, peers and locks."""
