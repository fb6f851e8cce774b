"""``python -m tokenledger``: the command line."""

from tokenledger.cli import main

main()
