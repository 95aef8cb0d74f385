"""Attention entry points and backends."""
