"""Optional language filter: a local fastText language-identification model, if the user has one.

Off by default (``CleanConfig.lid_model_path=None``). Nothing is downloaded: the user passes the path of a model
file they already have (for example fastText's ``lid.176.bin``) and installs the ``fasttext`` module themselves
(``pip install fasttext-wheel``); it is not a dependency of this project.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

#: predict(texts) -> [(language code, probability), ...], one per text.
Predictor = Callable[[Sequence[str]], list[tuple[str, float]]]

_CACHE: dict[str, Predictor] = {}


def _import_fasttext():
    import fasttext  # noqa: F401  (optional, user-installed)

    return fasttext


def load_language_model(path: str) -> Predictor:
    """Load (once per process) the fastText model at ``path`` and return a batch predictor.

    Raises ``FileNotFoundError`` if the file is missing and ``ImportError`` if the ``fasttext`` module is, each
    saying how to turn the filter off.
    """
    if path in _CACHE:
        return _CACHE[path]
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"language filter: the fastText model file {path!r} (CleanConfig.lid_model_path) does not exist; "
            "pass the path of a local language-id model such as lid.176.bin, or set lid_model_path=None to turn "
            "the language filter off"
        )
    try:
        fasttext = _import_fasttext()
    except ImportError as exc:
        raise ImportError(
            "language filter: CleanConfig.lid_model_path is set but the `fasttext` module is not installed; "
            "install it (pip install fasttext-wheel) or set lid_model_path=None to turn the language filter off"
        ) from exc
    model = fasttext.load_model(path)

    def predict(texts: Sequence[str]) -> list[tuple[str, float]]:
        if not texts:
            return []
        labels, probs = model.predict(list(texts), k=1)
        out = []
        for lab, pr in zip(labels, probs):
            code = lab[0].removeprefix("__label__") if len(lab) else ""
            out.append((code, float(pr[0]) if len(pr) else 0.0))
        return out

    _CACHE[path] = predict
    return predict


def language_verdicts(texts: Sequence[str], path: str, languages: Sequence[str], min_score: float) -> list[str | None]:
    """For each text: None if it passes, else the detail of its ``language`` rejection."""
    predict = load_language_model(path)
    allowed = set(languages)
    out: list[str | None] = []
    for code, score in predict(texts):
        if code in allowed and score >= min_score:
            out.append(None)
        else:
            out.append(f"language {code or '?'} (score {score:.2f}); allowed {sorted(allowed)} with score >= {min_score}")
    return out
