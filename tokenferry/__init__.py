"""tokenferry: short-lived, user-and-agent-scoped tokens for sandbox egress."""

__version__ = "0.1.0"
