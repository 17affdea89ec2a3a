"""``python -m casframe.cli``: the ``casframe`` command."""

from casframe.cli.group import main

main()
