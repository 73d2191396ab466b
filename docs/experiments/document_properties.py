"""Which of the data properties that in-context learning is known to need the shapes world's interleaved training
documents have (docs/training-notes.md, "What the few-shot documents are made of"): burstiness and dynamic
labels (Chan et al. 2022, arXiv 2205.05055), exact repetitions of items within a sequence (Bratulic et al. 2025,
arXiv 2501.06256), and how often each label word occurs across the corpus.

    python docs/experiments/document_properties.py DATA_DIR [SPLIT]
"""

import hashlib
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

from emu2.data.shapes.tasks import LABEL_WORDS


def documents(root: Path, split: str):
    """(meta, answers, image hashes) of every interleaved document of ``split``."""
    for shard in sorted((root / split).glob("interleaved-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if not name.endswith(".json"):
                    continue
                record = json.load(tar.extractfile(member))
                key = name[: -len(".json")]
                images = sorted(n for n in members if n.startswith(key + ".") and not n.endswith(".json"))
                hashes = [hashlib.sha1(tar.extractfile(members[n]).read()).hexdigest() for n in images]
                yield record["meta"], [t.rstrip(".").split(": ")[-1] for t in record["texts"]], hashes


def main(root: str, split: str = "train") -> None:
    tasks, lengths, bursty, repeated_answers, repeated_images = Counter(), Counter(), Counter(), Counter(), Counter()
    nonce_docs, label_docs, word_counts, per_doc_classes = 0, 0, Counter(), []
    for meta, answers, hashes in documents(Path(root), split):
        task = meta.get("task", "?")
        tasks[task] += 1
        lengths[task] += len(answers)
        counts = Counter(answers)
        bursty[task] += any(n >= 2 for n in counts.values())
        repeated_answers[task] += sum(n - 1 for n in counts.values())
        repeated_images[task] += len(hashes) - len(set(hashes))
        if task == "labels":
            label_docs += 1
            words = meta["label_words"]
            nonce_docs += not set(words) <= set(LABEL_WORDS)
            word_counts.update(words)
            per_doc_classes.append((len(words), len(answers)))
    total = sum(tasks.values())
    report = {
        "documents": total,
        "share_by_task": {t: round(n / total, 3) for t, n in tasks.items()},
        "examples_per_document": {t: round(lengths[t] / tasks[t], 2) for t in tasks},
        "documents_with_a_repeated_answer": {t: round(bursty[t] / tasks[t], 3) for t in tasks},
        "repeated_answers_per_example": {t: round(repeated_answers[t] / lengths[t], 3) for t in tasks},
        "repeated_images_per_example": {t: round(repeated_images[t] / lengths[t], 4) for t in tasks},
    }
    if label_docs:
        once = sum(1 for n in word_counts.values() if n == 1)
        report["labels"] = {
            "classes_per_document": round(sum(c for c, _ in per_doc_classes) / label_docs, 2),
            "examples_per_class_in_a_document": round(sum(e / c for c, e in per_doc_classes) / label_docs, 2),
            "documents_with_made_up_words": round(nonce_docs / label_docs, 3),
            "distinct_label_words": len(word_counts),
            "label_words_seen_in_one_document_only": round(once / len(word_counts), 3),
            "most_common_label_words": word_counts.most_common(5),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
