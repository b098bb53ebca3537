"""`workbench analyze <name>` subcommands: one module per analysis, each exposing
`add_parser(subparsers)` which registers a parser whose `func(args) -> dict` returns the JSON document."""

# Modules under workbench.commands that define `analyze` subcommands.
ANALYZE = ["analyze_influence", "analyze_views", "analyze_sparsity"]
