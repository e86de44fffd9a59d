"""Plug-in callbacks of stagewise_pl, loaded by dotted path from the config (``stages.rules``,
``stages.callbacks``). ``callbacks.rules`` holds the built-in stage rules; ``callbacks.promote``
is the example of a rule written outside the core."""
