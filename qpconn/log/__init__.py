"""Logging: the level filter every module logs through, and the observers twistd writes with."""
