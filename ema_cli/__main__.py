"""``python -m ema_cli``: the same as the ``ema-cli`` console script."""

from ema_cli._entry import main

main()
