"""Services: calls, the RRef protocol and distributed autograd over the wire; each registers its message handlers and talks to peers through the runtime's endpoint."""
