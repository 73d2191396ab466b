"""Writes a shapes dataset whose LM corpus holds a share of compact label-word documents ("three large yellow
squares: a foosnom. four small yellow crosses: a glag. ..."): 6-10 examples of one label task with only the
object's description before each answer, so that most of a document fits the LM recipe's 64-token rows (the
text few-shot documents, median 163 tokens, are cut to 2-3 examples). The share comes from the repeat documents.
Measured in docs/training-notes.md, "What the few-shot answers are".

    python docs/experiments/binding_lm_corpus.py OUT SHARE      # e.g. OUT 0.2; the quickstart's sizes and seed

Then the quickstart's chain with OUT/lm in place of its lm split (its LM, encoder, stage 1 and stage 2 configs)."""
# ruff: noqa
import sys
import emu2.data.shapes.tasks as T
from emu2.data.shapes.world import describe
share = float(sys.argv[2])
T.LM_CORPUS = {"repeat": 0.7 - share, "recall": 0.2, "fewshot": 0.1, "binding": share}

def binding_document(self, rng):
    while (task := T.sample_task(self.world, rng, "train", self.piece_words)).name != "labels":
        pass
    examples = [task.example(self.world, rng) for _ in range(rng.randint(6, 10))]
    first = T.unpredictable_examples(task, [a for _, _, a in examples])
    text, unscored, scenes = "", [], []
    for k, (scene, prompt, answer) in enumerate(examples):
        scenes.append(scene)
        text += (" " if text else "") + f"{describe(scene.groups[0])}: "
        text += T.example_text(prompt, answer)
        if k in first:
            unscored.append((len(text) - len(T.example_text(prompt, answer)), len(text)))
    return T.K.Text(text, unscored=tuple(unscored)), T.task_meta(task, scenes)

def lm_text(self, rng):
    kind = rng.choices(list(T.LM_CORPUS), weights=list(T.LM_CORPUS.values()))[0]
    if kind == "binding":
        return binding_document(self, rng)
    if kind == "repeat":
        return self.repeat_document(rng)
    if kind == "recall":
        return self.recall_document(rng)
    return self.text_fewshot_document(rng, "train")
T.ShapesMaker.lm_text = lm_text
if __name__ == "__main__":
    from emu2.data.shapes.write import write_shapes
    write_shapes(sys.argv[1], seed=0, num_train=1500, num_episodes=50, num_lm=15000, processes=1)
