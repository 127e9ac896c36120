"""Seeing the mesh: admin and debug endpoints. Reads state, never drives it."""
