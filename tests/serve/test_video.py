"""Videos for `emu2 chat` / `emu2 ask`: frames sampled as the official demo samples them, read with PIL only."""

import pytest
from PIL import Image

from emu2.serve.video import load_video_frames, sample_indices


def test_frames_are_the_middles_of_equal_segments_as_in_the_official_demo():
    """Official `extract_frames`: segment = total // n, frames segment // 2, segment // 2 + segment, ..."""
    assert sample_indices(80, 8) == [5, 15, 25, 35, 45, 55, 65, 75]
    assert sample_indices(11, 3) == [1, 4, 7]  # the official range would add frame 10: n frames are asked for
    assert sample_indices(5, 8) == [0, 1, 2, 3, 4]  # fewer frames than asked: all of them


def test_a_folder_of_frames_is_read_in_name_order(tmp_path):
    for k in range(10):
        Image.new("RGB", (4, 4), (k * 20, 0, 0)).save(tmp_path / f"frame_{k:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    frames = load_video_frames(tmp_path, num_frames=2)
    assert [f.getpixel((0, 0))[0] for f in frames] == [40, 140]  # frames 2 and 7 of 10


def test_an_animated_gif_is_a_video(tmp_path):
    frames = [Image.new("RGB", (4, 4), (k * 50, 0, 0)) for k in range(4)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    out = load_video_frames(tmp_path / "a.gif", num_frames=2)
    assert len(out) == 2 and all(f.mode == "RGB" for f in out)


def test_a_video_file_asks_for_its_frames_to_be_extracted(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="ffmpeg"):
        load_video_frames(tmp_path / "clip.mp4")


def test_an_empty_folder_or_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no frame images"):
        load_video_frames(tmp_path)
    with pytest.raises(FileNotFoundError, match="no video"):
        load_video_frames(tmp_path / "nowhere")
