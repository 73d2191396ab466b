"""Evaluation: benchmark adapters, prompt builders, metrics, RICES example selection and the few-shot runner.

Paper section 3 and Appendix D. The parts here are model-independent: the model enters only through two
callables, ``answer_fn(prompts, images) -> answers`` (`emu2.eval.fewshot`) and
``encode(images) -> (N, D) features`` (`emu2.eval.rices`).

Modules (import them directly; this package imports nothing heavy):
  ``metrics``   VQA accuracy, exact match, ROC AUC, multiple choice, box IoU, answer post-processing
  ``scoring``   a benchmark's number from its records and predictions (which metric each benchmark uses)
  ``prompts``   the paper's prompt strings (few-shot, zero-shot, Emu2-Chat)
  ``datasets``  readers for the public benchmark files into one record type
  ``rices``     retrieval-based in-context example selection (and a seeded random selector)
  ``fewshot``   the resumable few-shot runner
  ``report``    results JSON, Table 1/Table 2 style markdown and an accuracy-vs-shots plot
  ``intervals`` 95 % confidence intervals of every figure
  ``image_metrics``  CLIP-I / DINO / CLIP-T of generated images (sections 3.3, 3.4)
  ``probe``, ``shapes``, ``shapes_generation``, ``shapes_interleaved``  the shapes world's evaluations: linear
                probe of the encoder, few-shot and chat, generation, interleaved consistency
"""
