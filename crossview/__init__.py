"""Crossview: find a person across a site's cameras.

Shared pieces used by every service: typed configuration (`crossview.config`), the edge→matcher
wire format (`crossview.wire`), runtime setup (`crossview.runtime`) and the `crossview` command
(`crossview.cli`). The services live in the top-level packages `edge`, `matcher` and `trainer`.
"""

__version__ = "0.1.0"
