"""Pruning methods with more machinery than a one-function scorer; each module registers its scorer on import.

``compressor.api`` imports them so that ``--method <name>`` finds them.
"""
