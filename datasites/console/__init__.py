"""The admin web console (``datasite console``): the CLI's review, budget and audit, in a browser."""
