"""Edge node: camera capture → person detection → tracking → re-ID embedding → ZeroMQ publishing.

One module per stage: `sources` (capture + watchdog), `detectors` (YOLO / HOG → `Detections`),
`tracking`, `embedder` (ONNX Runtime), `publisher` (ZeroMQ), `harvest` (crops for re-adaptation), `uploader`
(the harvested crops to the matcher), `node` (the loop that ties them together) and `metrics`.
"""
