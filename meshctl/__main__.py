"""``python -m meshctl``: the same as the ``meshctl`` command."""

from meshctl.cli import main

main()
