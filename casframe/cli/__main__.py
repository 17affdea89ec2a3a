"""``python -m casframe.cli``: the ``casframe`` command (as ``python -m casframe``)."""

from casframe.__main__ import main

main()
