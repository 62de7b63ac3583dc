"""One module per stage and extra command; see components/__init__.py. Stages import the library, never each other."""
