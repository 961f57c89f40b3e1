"""Defaults that ``--help`` shows, in a module the CLI can import without numpy: ``--help`` and
``--version`` answer without loading the engine, the formats or numpy."""

#: TF's default EMA name: shadow names are ``<tensor>/ExponentialMovingAverage``.
DEFAULT_EMA_NAME = "ExponentialMovingAverage"

#: ``--settle``'s default: a newest checkpoint modified less than this many seconds ago may
#: still be being written, so a ``--state`` run leaves it for the next run.
DEFAULT_SETTLE_SECONDS = 60.0
