"""Export a local YOLO `.pt` to the ONNX file the edge node's `YoloOnnx` runs; nothing is downloaded.

    $ crossview export-detector yolo11n.pt --out models/yolo11n.onnx --imgsz 480 640
    export_yolo(Path("yolo11n.pt"), Path("models/yolo11n.onnx"))
"""

from __future__ import annotations

import shutil
from pathlib import Path

from crossview.kernel.runtime import ultralytics


def export_yolo(weights: Path, out: Path, imgsz: int | tuple[int, int] = 640) -> Path:
    """`imgsz` is one side, or (H, W): 480x640 fits 4:3 cameras without padding."""
    if not Path(weights).is_file():
        raise FileNotFoundError(f"{weights}: YOLO weights not found")
    ultralytics()  # offline, and OpenCV keeps its threads
    from ultralytics import YOLO

    # simplify=False: onnxslim is optional and must not be pip-installed on the fly.
    produced = Path(YOLO(str(weights), task="detect").export(format="onnx", imgsz=imgsz, simplify=False, dynamic=False, opset=17))
    out.parent.mkdir(parents=True, exist_ok=True)
    if produced.resolve() != out.resolve():
        shutil.move(produced, out)
    return out
