"""The mesh dashboard: read-only web pages over the admin API (see server)."""
