"""Plug-in callbacks of stagewise_pl, installed as ``stagewise_pl.callbacks`` and loaded by dotted path from the
config (``routing.rules``, ``trainer.callbacks``). ``stagewise_pl.callbacks.rules`` holds the built-in routing
rules; ``stagewise_pl.callbacks.promote`` is the example of a rule written outside the core. The former top-level
paths (``callbacks.rules:...``) are still read, with a deprecation message."""
