"""The shared kernel: what every service imports and nothing above it.

| module        | owns                                                                   |
|---------------|------------------------------------------------------------------------|
| `config`      | typed, validated configuration; `ConfigError` names the file and key    |
| `wire`        | the edge → matcher message format (versioned MessagePack schema)        |
| `harvest`     | the edge → trainer crop format: file names and versioned JSON sidecars  |
| `images`      | what an image declares before it is decoded: its size, a JPEG's scans   |
| `checkpoint`  | the training checkpoint format (versioned; written by training, read by export) |
| `modelmeta`   | the `crossview.*` metadata keys an embedding model carries              |
| `embedder`    | the ONNX re-ID embedding runtime (preprocessing + session + hot reload) |
| `ort`         | ONNX Runtime sessions: providers, threads                               |
| `transport`   | ZeroMQ CURVE keys and secured sockets                                   |
| `multipart`   | multipart/form-data bodies: files sent to the matcher's HTTP API (stdlib only) |
| `runtime`     | process setup: logging, offline ultralytics, OpenMP threads             |

The kernel never imports a service (`crossview.edge`, `crossview.matcher`, `crossview.trainer`) or
the command line (`crossview.cli`, `crossview.demo`); tests/test_layers.py checks it.
"""
