"""dnsgate: a consent-aware DNS resolver."""

__version__ = "0.1.0"
