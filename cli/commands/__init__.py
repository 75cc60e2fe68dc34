"""One module per command; each is a plain typed function registered by cli/app.py."""
