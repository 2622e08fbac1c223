"""A pipeline's output written by its kind: images (a PNG each), video (an mp4 through diffusers'
``export_to_video`` when its writer is installed, else numbered PNGs), audio (a 16-bit wav through
the standard library's ``wave``)."""

from __future__ import annotations

import importlib.util
import wave
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".gif", ".webm", ".mov", ".mkv", ".avi"}


def video_writer_available() -> bool:
    """Whether ``diffusers.utils.export_to_video`` can write a file here (imageio with its ffmpeg
    plugin, or OpenCV, which it falls back to)."""
    has = importlib.util.find_spec
    return bool((has("imageio") and has("imageio_ffmpeg")) or has("cv2"))


def _numpy(x: Any) -> Any:
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _pil(frame: Any) -> Any:
    """A PIL image from a PIL image, an (H, W, C) array in [0, 1] or a (C, H, W) tensor."""
    import numpy as np
    from PIL import Image

    if isinstance(frame, Image.Image):
        return frame
    is_tensor = hasattr(frame, "detach")
    arr = _numpy(frame)
    if is_tensor and arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr)


def _named(base: Path, suffix: str, index: int | None, count: int, width: int = 1) -> Path:
    if count == 1 or index is None:
        return base.with_suffix(suffix)
    return base.with_name(f"{base.stem}-{index:0{width}d}{suffix}")


def _images(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return [_pil(i) for i in images]
    arr = images
    if hasattr(arr, "ndim") and arr.ndim == 3:
        return [_pil(arr)]
    return [_pil(arr[i]) for i in range(len(arr))]


def _videos(frames: Any) -> list[list[Any]]:
    if isinstance(frames, (list, tuple)):
        if frames and not isinstance(frames[0], (list, tuple)) and getattr(frames[0], "ndim", 4) != 4:
            frames = [frames]                               # one video as a list of frames
        return [[_pil(f) for f in video] for video in frames]
    return [[_pil(video[i]) for i in range(len(video))] for video in frames]


def _sample_rate(pipe: Any) -> int:
    for name in ("vocoder", "vae", "audio_vae"):
        module = getattr(pipe, name, None)
        config = getattr(module, "config", None)
        for key in ("output_sampling_rate", "sampling_rate", "sample_rate"):
            value = getattr(config, key, None) if config is not None else None
            if isinstance(value, (int, float)) and value > 0:
                return int(value)
    rate = getattr(pipe, "audio_sampling_rate", None)
    return int(rate) if isinstance(rate, (int, float)) and rate > 0 else 16000


def write_wav(path: Path, audio: Any, rate: int) -> None:
    """``audio`` ((channels, samples) or (samples,), floats in [-1, 1]) as 16-bit PCM."""
    import numpy as np

    arr = _numpy(audio).astype(np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    arr = arr.reshape(-1, arr.shape[-1])
    pcm = (np.clip(arr, -1.0, 1.0) * 32767.0).round().astype("<i2").T.copy()
    with wave.open(str(path), "wb") as out:
        out.setnchannels(arr.shape[0])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())


def write_outputs(result: Any, pipe: Any, base: Path, *, fps: float) -> tuple[list[Path], list[str]]:
    """Write every output of ``result``; (the files written, notes). ``base``'s suffix picks the
    image format (PNG unless it is another image suffix) and, for video, mp4 or numbered PNGs."""
    written: list[Path] = []
    notes: list[str] = []
    base = Path(base)
    get = (lambda k: result.get(k)) if isinstance(result, dict) else (lambda k: getattr(result, k, None))
    frames = get("frames")
    images = get("images")
    audio = get("audios")
    if audio is None:
        audio = get("audio")
    if frames is not None and not isinstance(frames, str):
        videos = _videos(frames)
        as_mp4 = base.suffix.lower() in VIDEO_SUFFIXES or base.suffix == ""
        if base.suffix.lower() in IMAGE_SUFFIXES:
            as_mp4 = False
        if as_mp4 and not video_writer_available():
            notes.append("no video writer installed (pip install imageio imageio-ffmpeg): frames written as PNGs")
            as_mp4 = False
        for v, video in enumerate(videos):
            vbase = base if len(videos) == 1 else base.with_name(f"{base.stem}-{v}{base.suffix}")
            if as_mp4:
                from diffusers.utils import export_to_video

                target = vbase.with_suffix(base.suffix if base.suffix.lower() in VIDEO_SUFFIXES else ".mp4")
                export_to_video(video, str(target), fps=int(round(fps)))
                written.append(target)
            else:
                for i, frame in enumerate(video):
                    target = vbase.with_name(f"{vbase.stem}-{i:03d}.png")
                    frame.save(target)
                    written.append(target)
    elif images is not None and not isinstance(images, str):
        pils = _images(images)
        suffix = base.suffix.lower() if base.suffix.lower() in IMAGE_SUFFIXES else ".png"
        for i, img in enumerate(pils):
            target = _named(base, suffix, i, len(pils))
            img.save(target)
            written.append(target)
    if audio is not None:
        arr = _numpy(audio)
        clips = [arr] if arr.ndim <= 2 else [arr[i] for i in range(arr.shape[0])]
        rate = _sample_rate(pipe)
        abase = base if frames is None and images is None else base.with_name(base.stem + "-audio")
        for i, clip in enumerate(clips):
            target = _named(abase, ".wav", i, len(clips))
            write_wav(target, clip, rate)
            written.append(target)
        notes.append(f"audio at {rate} Hz")
    return written, notes


def default_suffix(signature_names: set[str]) -> str:
    """The output's suffix when ``--output`` is not given: a video for pipelines taking
    ``num_frames``, audio for those taking ``audio_end_in_s``, else an image."""
    if "num_frames" in signature_names:
        return ".mp4" if video_writer_available() else ".png"
    if "audio_end_in_s" in signature_names or "num_waveforms_per_prompt" in signature_names:
        return ".wav"
    return ".png"
