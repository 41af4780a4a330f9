"""
The CAV-MAE reference's preprocessing (its `src/preprocess/extract_video_frame.py` and `extract_audio.py`), redone
here by calling the same tools, to compare our video path with it on files the tests write: OpenCV
(opencv-python-headless, a test dependency only) opens the video, seeks and reads; Pillow resizes, crops and writes
the JPEG as torchvision's transforms and `save_image` call it; `ffmpeg` and `sox` (Debian's, when on PATH) write the
WAV. Nothing here is imported by the package. Used by tests/test_media_reference.py and
benchmarks/video_decoding.py.
"""

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

NUM_FRAMES = 10


def opencv_frame_count_and_rate(path) -> tuple[int, float]:
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        return int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), capture.get(cv2.CAP_PROP_FPS)
    finally:
        capture.release()


def opencv_frames(path, num_frames: int = NUM_FRAMES) -> list:
    """The RGB frames (uint8 `[H, W, 3]`) the reference's script read: OpenCV's count and fps, `total = min(count,
    int(fps * 10))`, a seek to `int(i * (total / num_frames)) - 1` and one read per frame, BGR to RGB. A read that
    fails gives None (the script then stopped with an error for that video)."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS)
    total = min(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), int(fps * 10))
    frames = []
    for i in range(num_frames):
        capture.set(cv2.CAP_PROP_POS_FRAMES, int(i * (total / num_frames)) - 1)
        ok, bgr = capture.read()
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if ok else None)
    capture.release()
    return frames


def opencv_decode_all(path) -> list:
    """Every frame OpenCV reads from the start, in order (RGB uint8), to find which frame a seek returned."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


def script_jpeg(rgb: np.ndarray) -> bytes:
    """One frame as the script saved it: `T.Resize(224)` on the PIL image (the shorter side to 224, the longer one
    `int(224 * long / short)`, Pillow's bilinear), `T.CenterCrop(224)` (offsets `int(round((side - 224) / 2))`),
    `T.ToTensor` (x / 255 in float32), `save_image` (x * 255 + 0.5, clamped, to uint8) and Pillow's JPEG at its
    default quality."""
    image = Image.fromarray(rgb)
    width, height = image.size
    size = (224, int(224 * height / width)) if width <= height else (int(224 * width / height), 224)
    image = image.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - 224) / 2.0)), int(round((size[1] - 224) / 2.0))
    image = image.crop((left, top, left + 224, top + 224))
    tensor = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    pixels = np.clip(tensor * np.float32(255.0) + np.float32(0.5), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def have_ffmpeg_and_sox() -> bool:
    return bool(shutil.which("ffmpeg") and shutil.which("sox"))


def script_wav(path, folder: Path) -> Path:
    """extract_audio.py's WAV: `ffmpeg -i path -vn -ar 16000` (16-bit PCM, every channel), then `sox ... remix 1`."""
    folder = Path(folder)
    intermediate, wav = folder / f"{Path(path).stem}_intermediate.wav", folder / f"{Path(path).stem}.wav"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": True}
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-i", str(path), "-vn", "-ar", "16000", str(intermediate)], **quiet)
    subprocess.run(["sox", str(intermediate), str(wav), "remix", "1"], **quiet)
    intermediate.unlink()
    return wav
