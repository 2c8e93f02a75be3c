"""aenv MCP gateway: a reverse proxy that routes MCP traffic by header and streams it end to end."""

__version__ = "0.1.0"
