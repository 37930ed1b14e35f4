"""Crossview: find a person across a site's cameras.

One installed package in three floors, arrows pointing only down:

| floor    | packages                                                      | folder                      |
|----------|---------------------------------------------------------------|-----------------------------|
| app      | `crossview.cli` (the `crossview` command), `crossview.demo`   | `crossview/`                |
| services | `crossview.edge`, `crossview.matcher`, `crossview.trainer`    | `edge/`, `matcher/`, `trainer/` |
| kernel   | `crossview.kernel` (config, wire, model metadata, embedder...) | `kernel/`                   |
"""

__version__ = "0.1.0"
