"""The `loraswap` subcommands, one module per command group; `loraswap.main` assembles them into one app."""
