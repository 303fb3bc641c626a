"""The debug view: the answered frame with the question and the answer written on it."""

import textwrap

import cv2
import numpy as np

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def draw_caption(frame: np.ndarray, lines: list[str]) -> np.ndarray:
    """A copy of an RGB frame with `lines` wrapped to its width on a dark band at the top."""
    height, width = frame.shape[:2]
    scale = max(0.4, width / 1280)
    thickness = max(1, round(scale * 2))
    line_height = int(28 * scale)
    chars = max(10, int(width / (14 * scale)))
    wrapped = [piece for line in lines for piece in textwrap.wrap(line, chars) or [""]]
    out = frame.copy()
    band = min(height, line_height * len(wrapped) + line_height // 2)
    out[:band] = (out[:band] * 0.35).astype(np.uint8)
    for index, text in enumerate(wrapped):
        y = line_height * (index + 1)
        if y > height:
            break
        cv2.putText(out, text, (int(8 * scale), y), _FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out
