"""The `hbfungi` command line: thin sub-commands that parse options and call the package's API.

`cli.main` builds the parser and dispatches; `cli.segment` holds the `segment` and `demo` commands;
`cli.output` prints metric lines and writes results files.
"""
