"""Prompts match the paper's strings (Appendix D) and the Emu2-Chat template."""

import pytest

from emu2.eval.prompts import (
    chat_multiple_choice_prompt,
    chat_video_qa_prompt,
    chat_vqa_prompt,
    fewshot_caption_prompt,
    fewshot_vqa_prompt,
    hateful_memes_question,
    zero_shot_vqa_prompt,
)
from emu2.processing import SHORT_ANSWER_SYSTEM_MESSAGE

SYSTEM = "You are a helpful assistant, dedicated to provide concise and efficient answers."


def test_zero_shot_prompt_is_the_paper_string():
    # Appendix D: "[image] based on the picture, answer in one word or phrase. [question] short answer:"
    expected = "[<IMG_PLH>] based on the picture, answer in one word or phrase. what is on the table? short answer:"
    assert zero_shot_vqa_prompt("what is on the table?") == expected
    assert fewshot_vqa_prompt("what is on the table?", []) == expected


def test_few_shot_examples_are_separated_by_period_space_and_placed_before_the_query():
    # Appendix D: examples "[image] based on the picture, [question] short answer: [answer]", separated by ". ",
    # ahead of the test sample "[image] based on the picture, [question] short answer:".
    prompt = fewshot_vqa_prompt("what color is the bus?", [("how many dogs?", "2"), ("is it raining?", "no")])
    assert prompt == (
        "[<IMG_PLH>] based on the picture, how many dogs? short answer: 2. "
        "[<IMG_PLH>] based on the picture, is it raining? short answer: no. "
        "[<IMG_PLH>] based on the picture, what color is the bus? short answer:"
    )


def test_hateful_memes_is_a_yes_no_question_in_the_vqa_template():
    question = hateful_memes_question(" love the way you smell today ")
    assert question == 'the text on the image reads "love the way you smell today". is it hateful?'
    assert fewshot_vqa_prompt(question, [(question, "no")]).count("short answer:") == 2


def test_caption_few_shot_prompt_uses_the_readme_caption_prompt():
    prompt = fewshot_caption_prompt(["A dog on a sofa.", "Two cats"])
    assert prompt == ("[<IMG_PLH>]Describe the image in details: A dog on a sofa. "
                      "[<IMG_PLH>]Describe the image in details: Two cats. "
                      "[<IMG_PLH>]Describe the image in details:")


def test_chat_vqa_uses_short_answer_system_message_and_llava_instruction():
    assert SHORT_ANSWER_SYSTEM_MESSAGE == SYSTEM
    assert chat_vqa_prompt("What is the man holding?") == (
        f"{SYSTEM} [USER]: [<IMG_PLH>]What is the man holding?\n"
        "Answer the question using a single word or phrase. [ASSISTANT]:"
    )


def test_chat_multiple_choice_lists_lettered_options():
    prompt = chat_multiple_choice_prompt("How many towels are in the image?", ["One", "Two", "Three", "Four"])
    assert prompt == (
        f"{SYSTEM} [USER]: [<IMG_PLH>]How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four\n"
        "Answer with the option's letter from the given choices directly. [ASSISTANT]:"
    )


def test_chat_video_prompt_has_one_frame_placeholder_per_frame_after_the_video_token():
    prompt = chat_video_qa_prompt("what is the man doing?", num_frames=16)
    assert prompt.startswith(f"{SYSTEM} [USER]: [VIDEO]" + "[<VID_PLH>]" * 16 + "what is the man doing?\n")
    assert prompt.count("[<VID_PLH>]") == 16 and "[<IMG_PLH>]" not in prompt


def test_video_multiple_choice_uses_frames_instead_of_an_image():
    prompt = chat_multiple_choice_prompt("What happens next?", ["a", "b"], num_images=0, num_frames=8)
    assert prompt.count("[<VID_PLH>]") == 8 and "[<IMG_PLH>]" not in prompt


def test_prompt_errors_say_what_was_wrong():
    with pytest.raises(ValueError, match="at least one frame"):
        chat_video_qa_prompt("q", num_frames=0)
    with pytest.raises(ValueError, match="at least one option"):
        chat_multiple_choice_prompt("q", [])
