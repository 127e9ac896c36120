"""The mesh model: frozen dataclasses, standard library only."""
