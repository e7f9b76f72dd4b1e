"""cfwrap: Nomad TLS kits made by real cfssl, checked, and described by a manifest."""

__version__ = "0.1.0"
