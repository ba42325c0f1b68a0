"""The `cascade` command line: main.py builds the parser and turns known failures into one line;
each other module registers one group of subcommands (batch, cluster, eval, export, validate)."""
