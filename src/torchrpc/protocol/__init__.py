"""The sans-I/O protocol core: message types, and the RRef state machine."""
