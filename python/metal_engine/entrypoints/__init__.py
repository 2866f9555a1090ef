"""Front doors: the command line (cli.py) and the HTTP servers (openai/)."""
