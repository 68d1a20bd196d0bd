"""Optional language filter: which language a cleaned caption is in, and whether it is one the user keeps.

Two backends, chosen by ``CleanConfig.language_filter``:

* ``"lingua"`` -- `lingua-language-detector <https://github.com/pemistahl/lingua-py>`_, a dependency of this
  project whose n-gram models ship inside the package (nothing is downloaded). It is accurate on short text, which
  captions are. It chooses among ``CleanConfig.language_candidates`` (default: 12 large web languages covering the
  Latin, Cyrillic, CJK and Arabic scripts); fewer candidates are faster and confuse short English captions with
  fewer small languages, more candidates catch more languages. It runs in parallel on all cores
  (``compute_language_confidence_values_in_parallel``); its confidence values are relative and sum to 1 over the
  candidates. ``lingua_low_accuracy`` uses trigrams only: faster, but on real alt texts it rejected 13-19%
  of English captions (see docs/captions.md), so it is off by default.
* ``"fasttext"`` -- a local fastText model file the user already has (for example ``lid.176.bin``, 176 languages,
  much faster than lingua) at ``CleanConfig.lid_model_path``, with the ``fasttext`` module installed by the user
  (``pip install fasttext-wheel``; not a dependency of this project).

The rule is the same for both: a caption is dropped (reason ``language``) when the model's top language is not in
``CleanConfig.languages`` and its score reaches ``min_language_score``; a caption the model is unsure about is kept.
Short captions (product names, proper nouns) are often ambiguous, and dropping them would throw away good English
pairs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mllm_pipeline.text.config import CleanConfig

#: predict(texts) -> [(language code, probability), ...], one per text ("" and 0.0 when the model has no answer).
Predictor = Callable[[Sequence[str]], list[tuple[str, float]]]

_CACHE: dict[tuple, Predictor] = {}


def _import_fasttext():
    import fasttext  # noqa: F401  (optional, user-installed)

    return fasttext


def load_fasttext_model(path: str) -> Predictor:
    """Load (once per process) the fastText model at ``path`` and return a batch predictor.

    Raises ``FileNotFoundError`` if the file is missing and ``ImportError`` if the ``fasttext`` module is, each
    saying how to turn the filter off or use the built-in model instead.
    """
    key = ("fasttext", path)
    if key in _CACHE:
        return _CACHE[key]
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"language filter: the fastText model file {path!r} (CleanConfig.lid_model_path) does not exist; "
            "pass the path of a local language-id model such as lid.176.bin, use language_filter='lingua' (the "
            "model ships with the package), or set lid_model_path=None to turn the language filter off"
        )
    try:
        fasttext = _import_fasttext()
    except ImportError as exc:
        raise ImportError(
            "language filter: CleanConfig.lid_model_path is set but the `fasttext` module is not installed; "
            "install it (pip install fasttext-wheel), use language_filter='lingua', or set lid_model_path=None to "
            "turn the language filter off"
        ) from exc
    model = fasttext.load_model(path)

    def predict(texts: Sequence[str]) -> list[tuple[str, float]]:
        if not texts:
            return []
        labels, probs = model.predict(list(texts), k=1)
        return [(lab[0].removeprefix("__label__") if len(lab) else "", float(pr[0]) if len(pr) else 0.0)
                for lab, pr in zip(labels, probs)]

    _CACHE[key] = predict
    return predict


def lingua_codes() -> frozenset[str]:
    """The ISO 639-1 codes (lower case) that lingua knows."""
    from lingua import Language

    return frozenset(lang.iso_code_639_1.name.lower() for lang in Language.all())


def load_lingua(candidates: Sequence[str], low_accuracy: bool = False) -> Predictor:
    """A batch predictor over lingua's models for ``candidates`` (ISO 639-1 codes; empty = all 75 languages),
    built once per process and setting. The models are loaded up front (about 1 s for 12 languages)."""
    key = ("lingua", tuple(sorted(candidates)), bool(low_accuracy))
    if key in _CACHE:
        return _CACHE[key]
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    known = lingua_codes()
    unknown = sorted(set(candidates) - known)
    if unknown:
        raise ValueError(f"language filter: lingua has no model for {unknown}; it knows {sorted(known)}")
    if candidates:
        builder = LanguageDetectorBuilder.from_iso_codes_639_1(*(getattr(IsoCode639_1, c.upper()) for c in candidates))
    else:
        builder = LanguageDetectorBuilder.from_all_languages()
    if low_accuracy:
        builder = builder.with_low_accuracy_mode()
    detector = builder.with_preloaded_language_models().build()

    def predict(texts: Sequence[str]) -> list[tuple[str, float]]:
        if not texts:
            return []
        out = []
        for values in detector.compute_language_confidence_values_in_parallel(list(texts)):
            if values:  # sorted, most likely first
                out.append((values[0].language.iso_code_639_1.name.lower(), float(values[0].value)))
            else:
                out.append(("", 0.0))
        return out

    _CACHE[key] = predict
    return predict


def predictor(config: CleanConfig) -> Predictor | None:
    """The predictor ``config`` asks for, or None when the language filter is off."""
    backend = config.language_backend
    if backend == "lingua":
        cands = tuple(dict.fromkeys((*config.language_candidates, *config.languages))) if config.language_candidates else ()
        return load_lingua(cands, config.lingua_low_accuracy)
    if backend == "fasttext":
        return load_fasttext_model(config.lid_model_path)  # type: ignore[arg-type]
    return None


def language_verdicts(texts: Sequence[str], config: CleanConfig) -> list[str | None]:
    """For each text: None if it is kept, else the detail of its ``language`` rejection (see the module doc)."""
    predict = predictor(config)
    if predict is None:
        return [None] * len(texts)
    allowed = set(config.languages)
    out: list[str | None] = []
    for code, score in predict(texts):
        if code in allowed or score < config.min_language_score:
            out.append(None)
        else:
            out.append(f"language {code or '?'} (score {score:.2f} >= {config.min_language_score}); "
                       f"allowed {sorted(allowed)}")
    return out
