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
    if Path(weights).suffix != ".pt":
        raise ValueError(f"{weights}: not a PyTorch checkpoint (.pt): export-detector turns YOLO .pt weights into ONNX")
    sides = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    if not all(32 <= side <= 4096 and side % 32 == 0 for side in sides):
        raise ValueError(f"--imgsz {imgsz}: each side a multiple of 32 in 32..4096 (YOLO's stride)")
    ultralytics()  # offline, and OpenCV keeps its threads
    from ultralytics import YOLO

    try:
        model = YOLO(str(weights), task="detect")
    except Exception as e:  # ultralytics' TypeError for what is no checkpoint, torch.load's for a damaged one, ...
        raise ValueError(f"{weights}: not loadable YOLO weights ({str(e).splitlines()[0][:200]})") from None
    # simplify=False: onnxslim is optional and must not be pip-installed on the fly.
    produced = Path(model.export(format="onnx", imgsz=imgsz, simplify=False, dynamic=False, opset=17))
    out.parent.mkdir(parents=True, exist_ok=True)
    if produced.resolve() != out.resolve():
        shutil.move(produced, out)
    return out
