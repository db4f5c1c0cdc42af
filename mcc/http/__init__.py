"""The HTTP front end: sans-I/O protocol, ranges, routing and the trio server."""
