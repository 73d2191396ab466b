"""Video question answering: MSVD-QA and MSRVTT-QA (Xu et al. 2017), scored by exact match.

Records point at the video (file or folder of extracted frames, resolved when loaded: the extension may be
left out); `emu2.eval.datasets.load_frames` samples the paper's 16 frames uniformly.
"""

from __future__ import annotations

from pathlib import Path

from .record import EvalRecord, read_json, require_dir, require_file


def _video_qa_records(items: list[dict], video_dir: Path, video_name) -> list[EvalRecord]:
    records = []
    for index, item in enumerate(items):
        name = str(item["video"]) if "video" in item else video_name(item["video_id"])
        records.append(EvalRecord(
            id=str(item.get("id", index)),
            question=item["question"],
            answers=[str(item["answer"])],
            video=video_dir / name,
        ))
    return records


def load_msrvtt_qa(qa_json: str | Path, video_dir: str | Path) -> list[EvalRecord]:
    """MSRVTT-QA: a JSON list of ``{id, question, answer, video_id: 7010}`` (or ``video: "video7010.mp4"``).

    ``video_id`` N is the video ``video_dir/videoN`` (``.mp4`` or a frame folder).
    """
    items = read_json(qa_json, "MSRVTT-QA file", "https://github.com/xudejing/video-question-answering")
    video_dir = require_dir(video_dir, "MSRVTT video folder")
    return _video_qa_records(items, video_dir, lambda video_id: f"video{video_id}")


def load_msvd_qa(
    qa_json: str | Path, video_dir: str | Path, mapping_txt: str | Path | None = None
) -> list[EvalRecord]:
    """MSVD-QA: a JSON list of ``{id, question, answer, video_id: 1}`` (or ``video: "<youtube name>.avi"``).

    MSVD-QA numbers the videos; ``youtube_mapping.txt`` (lines ``-4wsuPCjDBc_5_15 vid1``) maps ``vidN`` back to
    the YouTube clip names the video files carry. Without it, ``video_id`` N is looked up as ``vidN``.
    """
    items = read_json(qa_json, "MSVD-QA file", "https://github.com/xudejing/video-question-answering")
    video_dir = require_dir(video_dir, "MSVD video folder")
    names: dict[str, str] = {}
    if mapping_txt is not None:
        for line in require_file(mapping_txt, "MSVD youtube_mapping.txt").read_text().splitlines():
            if line.strip():
                clip, vid = line.split()
                names[vid] = clip

    def video_name(video_id) -> str:
        vid = f"vid{video_id}"
        if names and vid not in names:
            raise ValueError(f"video id {video_id} ({vid}) is not in {mapping_txt}")
        return names.get(vid, vid)

    return _video_qa_records(items, video_dir, video_name)
