"""Evaluation prompts: the paper's few-shot strings (Appendix D) and the Emu2-Chat short-answer prompts.

Base model (Appendix D): each in-context example is ``[image] based on the picture, [question] short answer:
[answer]``; "The chosen few-shot examples will be separated by ". " and then placed ahead of the test sample",
so the examples and the query are joined by ". ". Zero-shot uses ``[image] based on the picture, answer in one
word or phrase. [question] short answer:`` because the plain prompt made the model answer with a sentence.

Emu2-Chat (Appendix D): the short-answer system message plus LLaVA-1.5's output-format instructions [49],
through the official chat template (`emu2.processing.chat_prompt`). Video: ``[VIDEO]`` then one frame
placeholder per frame, as the official input lists write a video (16 frames in the paper).

``[image]`` is written `IMAGE_PLACEHOLDER`; the images go to the model in placeholder order.
"""

from __future__ import annotations

from collections.abc import Sequence

from emu2.processing import (
    IMAGE_PLACEHOLDER,
    SHORT_ANSWER_SYSTEM_MESSAGE,
    VIDEO_PLACEHOLDER,
    VIDEO_TOKEN,
    chat_prompt,
)

FEWSHOT_SEPARATOR = ". "
ZERO_SHOT_INSTRUCTION = "answer in one word or phrase."
# LLaVA-1.5's output-format instructions (paper ref. [49]).
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# Captioning is not in the paper's tables; this is the official README's caption prompt.
CAPTION_INSTRUCTION = "Describe the image in details:"


# ------------------------------------------------------------------------------------ base model, few-shot
def vqa_example(question: str, answer: str) -> str:
    """One in-context example: ``[<IMG_PLH>] based on the picture, {question} short answer: {answer}``."""
    return f"{IMAGE_PLACEHOLDER} based on the picture, {question} short answer: {answer}"


def vqa_query(question: str) -> str:
    """The test sample of a few-shot prompt: ``[<IMG_PLH>] based on the picture, {question} short answer:``."""
    return f"{IMAGE_PLACEHOLDER} based on the picture, {question} short answer:"


def zero_shot_vqa_prompt(question: str) -> str:
    """Appendix D's zero-shot prompt, which asks for one word or phrase."""
    return f"{IMAGE_PLACEHOLDER} based on the picture, {ZERO_SHOT_INSTRUCTION} {question} short answer:"


def fewshot_vqa_prompt(question: str, examples: Sequence[tuple[str, str]]) -> str:
    """The full VQA prompt for ``question`` after ``examples`` ((question, answer) pairs, in prompt order).

    No examples gives the zero-shot prompt. The images are the examples' images in order, then the query's.
    """
    if not examples:
        return zero_shot_vqa_prompt(question)
    return FEWSHOT_SEPARATOR.join([*(vqa_example(q, a) for q, a in examples), vqa_query(question)])


def hateful_memes_question(meme_text: str) -> str:
    """Hateful Memes as a yes/no VQA question (answers "yes"/"no").

    The paper does not give its Hateful Memes prompt; this puts the meme's text (as OpenFlamingo does) into
    the paper's VQA template, so few-shot and zero-shot prompts come from `fewshot_vqa_prompt`.
    """
    return f'the text on the image reads "{meme_text.strip()}". is it hateful?'


def fewshot_caption_prompt(example_captions: Sequence[str]) -> str:
    """Few-shot captioning: ``[<IMG_PLH>]Describe the image in details: {caption}`` examples, then the query.

    Not a paper prompt (captioning is not in Table 1): the README caption prompt, joined with the paper's ". "
    separator; a caption's own final period is dropped so the separator does not double it.
    """
    examples = [f"{IMAGE_PLACEHOLDER}{CAPTION_INSTRUCTION} {c.strip().rstrip('.')}" for c in example_captions]
    return FEWSHOT_SEPARATOR.join([*examples, f"{IMAGE_PLACEHOLDER}{CAPTION_INSTRUCTION}"])


# ------------------------------------------------------------------------------------------- Emu2-Chat
def _visual_prefix(num_images: int, num_frames: int) -> str:
    if num_images < 0 or num_frames < 0:
        raise ValueError(f"num_images and num_frames must be >= 0; got {num_images} and {num_frames}")
    video = VIDEO_TOKEN + VIDEO_PLACEHOLDER * num_frames if num_frames else ""
    return IMAGE_PLACEHOLDER * num_images + video


def chat_vqa_prompt(question: str, num_images: int = 1) -> str:
    """Emu2-Chat short-answer VQA (VQAv2, OKVQA, GQA, VizWiz, TextVQA; Table 2).

    ``<short-answer system> [USER]: [<IMG_PLH>]{question}\\nAnswer the question using a single word or
    phrase. [ASSISTANT]:``
    """
    user = f"{_visual_prefix(num_images, 0)}{question}\n{SHORT_ANSWER_INSTRUCTION}"
    return chat_prompt([user], system=SHORT_ANSWER_SYSTEM_MESSAGE)


def chat_video_qa_prompt(question: str, num_frames: int = 16) -> str:
    """Emu2-Chat video QA (MSVD-QA, MSRVTT-QA): ``[VIDEO]`` + one frame placeholder per frame, then the question."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame; got num_frames={num_frames}")
    user = f"{_visual_prefix(0, num_frames)}{question}\n{SHORT_ANSWER_INSTRUCTION}"
    return chat_prompt([user], system=SHORT_ANSWER_SYSTEM_MESSAGE)


def format_options(options: Sequence[str]) -> str:
    """Options as LLaVA-1.5 presents them: ``A. first\\nB. second ...``."""
    if len(options) > 26:
        raise ValueError(f"at most 26 options can be lettered; got {len(options)}")
    return "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))


def chat_multiple_choice_prompt(
    question: str, options: Sequence[str], num_images: int = 1, num_frames: int = 0
) -> str:
    """Emu2-Chat multiple choice (SEED-Bench, MMMU), following LLaVA-1.5 as the paper says (section 3.2).

    ``... [USER]: [<IMG_PLH>]{question}\\nA. ..\\nB. ..\\nAnswer with the option's letter from the given
    choices directly. [ASSISTANT]:``; video questions pass ``num_frames`` instead of an image.
    """
    if not options:
        raise ValueError("a multiple-choice prompt needs at least one option")
    user = (f"{_visual_prefix(num_images, num_frames)}{question}\n{format_options(options)}\n"
            f"{MULTIPLE_CHOICE_INSTRUCTION}")
    return chat_prompt([user], system=SHORT_ANSWER_SYSTEM_MESSAGE)
