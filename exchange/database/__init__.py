"""The node database: exchange's tables, the business tables, moving rows, capturing changes."""
