"""MSR-VTT's annotation folder as MMAction2's "Preparing MSR-VTT Retrieval / Video Question-Answering Dataset"
guide (the files come from VindLU) lays it out, at the real counts.

Field by field from MMAction2's own readers, ``mmaction/datasets/msrvtt_datasets.py``:

* ``MSRVTTRetrieval`` reads ``msrvtt_ret_train9k.json`` / ``_train7k.json`` / ``_test1k.json``: a list of
  ``{"video": "videoN.mp4", "caption": str | [str, ...]}`` (it turns a string caption into a one-element list);
  VindLU's entries also carry ``duration``. The training files hold one entry per caption (20 a video), the 1k-A
  test file one entry per video with its one JSFusion sentence.
* ``MSRVTTVQA`` reads ``msrvtt_qa_{train,val,test}.json``: ``{"video", "question", "answer": str | [str, ...],
  "question_id"}`` (a list of answers is weighted by count).
* ``MSRVTTVQAMC`` reads ``msrvtt_mc_test.json``: ``{"video", "caption": [5 options], "answer": index}``.
* ``msrvtt_qa_answer_list.json`` is the answer vocabulary, a list of strings, not samples.

Counts as released: 10,000 videos (official train video0..6512, validate ..7009, test ..9999), 7k = train +
validate, 1k-A test = 1,000 of the official test videos, 9k = 7k + the other 1,990 test videos, the multiple-choice
test = the 2,990 official test videos. MSRVTT-QA has 158,581 / 12,278 / 72,821 questions on the official train /
validate / test videos; ``qa_scale`` shrinks those counts (the structure stays) for tests that do not need them all.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

N_TRAIN, N_VALIDATE, N_TEST = 6513, 497, 2990
CAPTIONS_EACH = 20
QA_COUNTS = {"train": 158_581, "val": 12_278, "test": 72_821}
ANSWERS = ["man", "woman", "play", "talk", "dog", "cook", "car", "sing", "dance", "two"]


def caption(i: int, k: int) -> str:
    return f"clip {i} shows scene {k} with a person"


def layout(seed: int = 0) -> dict[str, list[int]]:
    rng = random.Random(seed)
    test = list(range(N_TRAIN + N_VALIDATE, N_TRAIN + N_VALIDATE + N_TEST))
    one_k = sorted(rng.sample(test, 1000))
    seven_k = list(range(N_TRAIN + N_VALIDATE))
    nine_k = seven_k + [i for i in test if i not in set(one_k)]
    return {"7k": seven_k, "9k": nine_k, "1k": one_k, "mc": test}


def write_folder(dest: Path, qa_scale: float = 1.0, list_answers_every: int = 7, seed: int = 0) -> dict[str, Path]:
    """Write ``annotations/`` and return {name: path}; ``list_answers_every``: every n-th val / test question has a
    list of answers (as some releases give)."""
    ann = dest / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    lay = layout(seed)
    rng = random.Random(seed)
    out: dict[str, Path] = {}

    def write(name: str, doc) -> None:
        out[name] = ann / f"msrvtt_{name}.json"
        out[name].write_text(json.dumps(doc))

    for kind in ("9k", "7k"):
        write(f"ret_train{kind}", [{"video": f"video{i}.mp4", "caption": caption(i, k), "duration": 10.0 + i % 20}
                                    for i in lay[kind] for k in range(CAPTIONS_EACH)])
    write("ret_test1k", [{"video": f"video{i}.mp4", "caption": caption(i, 3), "duration": 12.0} for i in lay["1k"]])
    write("mc_test", [{"video": f"video{i}.mp4", "caption": [caption(i, 5) if j == i % 5 else caption((i + j + 1) % 10000, 5)
                                                           for j in range(5)], "answer": i % 5} for i in lay["mc"]])
    videos = {"train": range(N_TRAIN), "val": range(N_TRAIN, N_TRAIN + N_VALIDATE),
              "test": range(N_TRAIN + N_VALIDATE, N_TRAIN + N_VALIDATE + N_TEST)}
    qid = 0
    for split, n in QA_COUNTS.items():
        entries = []
        for q in range(max(1, int(n * qa_scale))):
            i = rng.choice(videos[split])
            answer = ANSWERS[(i + q) % len(ANSWERS)]
            if split != "train" and list_answers_every and q % list_answers_every == 0:
                answer = [answer, answer, ANSWERS[q % len(ANSWERS)]]
            entries.append({"video": f"video{i}.mp4", "question": f"what is in clip {i} number {q}?", "answer": answer,
                            "question_id": qid})
            qid += 1
        write(f"qa_{split}", entries)
    write("qa_answer_list", ANSWERS)
    return out
