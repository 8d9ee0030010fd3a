"""One module per command, file in, file out: each reads its inputs, calls the library,
writes its outputs atomically, and returns a report dataclass for the CLI to render."""
