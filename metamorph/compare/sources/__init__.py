"""Built-in point sources (registered on import; see :mod:`metamorph.compare.registry`)."""
