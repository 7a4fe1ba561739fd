"""User-space decoders, one module per L7 protocol."""
