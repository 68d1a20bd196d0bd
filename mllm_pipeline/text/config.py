"""Caption-cleaning configuration, reasons and output schemas."""

from __future__ import annotations

import dataclasses
import math

import pyarrow as pa

#: Why a caption was dropped; every row of a rejected table carries one of these, with a detail.
REASONS: dict[str, str] = {
    "empty_after_cleaning": "nothing is left after normalisation (or the caption was null)",
    "too_short": "not more than 2 words and more than 5 characters (the DataComp basic rule)",
    "too_long": "more than max_words words or max_chars characters",
    "mostly_non_letters": "letters are less than min_letter_fraction of the non-space characters",
    "repeated_ngrams": "the same word n-grams repeat: the share of repeated n-grams reaches max_repeated_ngram_fraction",
    "language": "the language model's top language is not in languages and its score reaches min_language_score",
    "exact_duplicate": "the same duplicate key (ASCII case, punctuation and spacing ignored) as an earlier caption",
    "near_duplicate": "MinHash Jaccard estimate >= near_dup_threshold with an earlier caption (LSH candidate)",
    "eval_leak": "a training caption that is an exact or near copy of an evaluation caption, or whose medium is an "
                 "exact or near copy of an evaluation sample's medium (MSR-VTT test, COCO val, ...)",
    "media_duplicate": "the medium is an exact (same bytes) or near (perceptual hash) copy of an earlier sample's; "
                       "its captions moved to that sample",
    "caption_cap": "the same caption already appears max_caption_repeats times in training (concept balancing)",
}

#: Source split names that are evaluation splits by default (MSR-VTT validate/test, COCO val, CC3M validation ...).
DEFAULT_EVAL_SPLITS = ("validate", "val", "validation", "test")
DEDUP_SCOPES = ("medium", "dataset")
#: The languages lingua chooses among by default: large web languages that cover the Latin, Cyrillic, CJK and Arabic
#: scripts. Measured on 1,000 real alt texts (docs/captions.md): with this set lingua keeps 99.2% of the English
#: captions and drops 17 of 28 clearly non-English ones; with all 75 languages the confidence spreads thinner (10 of
#: 28 dropped) and it is much slower.
LINGUA_CANDIDATES = ("en", "de", "fr", "es", "it", "pt", "nl", "ru", "zh", "ja", "ko", "ar")

#: The order in which the per-caption filters are tried; the first that fires is the reason.
FILTER_ORDER = ("empty_after_cleaning", "too_short", "too_long", "mostly_non_letters", "repeated_ngrams", "language")


@dataclasses.dataclass(frozen=True)
class CleanConfig:
    """Every threshold of caption cleaning. Defaults are the documented behaviour; bad values raise ValueError.

    Filters
        min_words=3, min_chars=6        keep captions with more than 2 words AND more than 5 characters (DataComp)
        max_words=256, max_chars=2048   longer captions are ``too_long``
        min_letter_fraction=0.5         letters / non-space characters below this: ``mostly_non_letters``
        repeat_ngram_size=2             word n-grams (ASCII lower-cased words) checked for repetition
        max_repeated_ngram_fraction=0.5 ``1 - distinct n-grams / n-grams`` at or above this: ``repeated_ngrams``
                                        ("buy now buy now buy now" -> 0.6); needs at least 2 n-grams;
                                        1 turns the filter off
    Language (:mod:`mllm_pipeline.text.language`; off by default: the five datasets are English already)
        language_filter=None            "off", "lingua" (the model ships with the package) or "fasttext" (a local
                                        model file); None = "fasttext" when lid_model_path is set, else "off"
        lid_model_path=None             fastText only: a local language-id model such as lid.176.bin
        languages=("en",)               kept language codes (ISO 639-1, without fastText's "__label__" prefix)
        min_language_score=0.5          a caption is dropped when its top language is not in ``languages`` and
                                        scores at least this; a caption the model is unsure about is kept
        language_candidates=LINGUA_CANDIDATES   lingua only: the languages it chooses among (``languages`` are
                                        added); () = all 75 (much slower; the confidence spreads over more
                                        languages, so fewer captions are dropped)
        lingua_low_accuracy=False       lingua only: trigram models only (faster, far less accurate on
                                        short captions)
    Duplicates
        exact_dedup=True, near_dedup=True
        shingle="word", shingle_size=None   word n-grams (default n=2) or "char" byte n-grams (default n=5)
        num_perm=64                     MinHash permutations (signature = num_perm uint32)
        lsh_bands=9, lsh_rows=7         LSH banding (bands * rows <= num_perm); candidate pairs share one band.
                                        Probability that a pair becomes a candidate: 0.88 at Jaccard 0.8, 0.99 at
                                        0.9, 0.07 at 0.5
        near_dup_threshold=0.8          est. Jaccard (equal signature entries / num_perm) of a near duplicate
        seed=1                          seed of every hash (change it and signatures change)
    Other
        n_examples=5                    before/after pairs reported per shard
        dataset_rules=True              apply the dataset's own rules (WebVid boilerplate)
    Scope and evaluation splits
        dedup_scope="medium"            caption duplicates are looked for among the captions of one medium (one
                                        image's five COCO captions, one MSR-VTT video's twenty): identical captions
                                        of different images are kept ("person walks on the beach" in CC3M).
                                        "dataset": across every caption of the dataset (the old behaviour)
        eval_splits=("validate", "val", "validation", "test")
                                        source split names whose rows are evaluation data: never filtered or
                                        de-duplicated (they reach the manifests whole); training captions that
                                        copy them are dropped as ``eval_leak``
        max_caption_repeats=None        keep a caption at most this many times in training, across all media
                                        (LLaVA-style concept balancing); None = no cap
    """

    min_words: int = 3
    min_chars: int = 6
    max_words: int = 256
    max_chars: int = 2048
    min_letter_fraction: float = 0.5
    repeat_ngram_size: int = 2
    max_repeated_ngram_fraction: float = 0.5
    language_filter: str | None = None
    lid_model_path: str | None = None
    languages: tuple[str, ...] = ("en",)
    min_language_score: float = 0.5
    language_candidates: tuple[str, ...] = LINGUA_CANDIDATES
    lingua_low_accuracy: bool = False
    exact_dedup: bool = True
    near_dedup: bool = True
    shingle: str = "word"
    shingle_size: int | None = None
    num_perm: int = 64
    lsh_bands: int = 9
    lsh_rows: int = 7
    near_dup_threshold: float = 0.8
    seed: int = 1
    n_examples: int = 5
    dataset_rules: bool = True
    dedup_scope: str = "medium"
    eval_splits: tuple[str, ...] = DEFAULT_EVAL_SPLITS
    max_caption_repeats: int | None = None

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"CleanConfig.{field}={getattr(self, field)!r}: {why}")

        def integer(field: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(field, "must be an integer")
            if v < lo or (hi is not None and v > hi):
                bad(field, f"must be between {lo} and {hi}" if hi is not None else f"must be >= {lo}")

        def fraction(field: str) -> None:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
                bad(field, "must be a number between 0 and 1")

        integer("min_words", 0)
        integer("min_chars", 0)
        integer("max_words", 1)
        integer("max_chars", 1)
        if self.max_words < self.min_words:
            bad("max_words", f"must be >= min_words ({self.min_words})")
        if self.max_chars < self.min_chars:
            bad("max_chars", f"must be >= min_chars ({self.min_chars})")
        fraction("min_letter_fraction")
        integer("repeat_ngram_size", 1, 8)
        fraction("max_repeated_ngram_fraction")
        if self.max_repeated_ngram_fraction == 0:
            bad("max_repeated_ngram_fraction", "must be > 0 (1 turns the filter off)")
        if self.lid_model_path is not None and (not isinstance(self.lid_model_path, str) or not self.lid_model_path):
            bad("lid_model_path", "must be a non-empty path string or None")
        if isinstance(self.languages, str) or not all(isinstance(x, str) and x for x in self.languages):
            bad("languages", "must be a tuple of language codes such as ('en',)")
        if self.language_filter not in (None, "off", "lingua", "fasttext"):
            bad("language_filter", "must be 'off', 'lingua', 'fasttext' or None")
        if self.language_filter == "fasttext" and self.lid_model_path is None:
            bad("language_filter", "'fasttext' needs lid_model_path (a local model file such as lid.176.bin)")
        if self.language_backend != "off" and not self.languages:
            bad("languages", "must name at least one language when the language filter is on")
        for f in ("languages", "language_candidates"):
            if isinstance(getattr(self, f), str) or not all(isinstance(x, str) and x for x in getattr(self, f)):
                bad(f, "must be a tuple of language codes such as ('en',)")
        if self.language_backend == "lingua":
            from mllm_pipeline.text.language import lingua_codes

            unknown = sorted((set(self.languages) | set(self.language_candidates)) - lingua_codes())
            if unknown:
                bad("languages", f"lingua has no model for {unknown}")
        fraction("min_language_score")
        for f in ("exact_dedup", "near_dedup", "dataset_rules", "lingua_low_accuracy"):
            if not isinstance(getattr(self, f), bool):
                bad(f, "must be True or False")
        if self.shingle not in ("word", "char"):
            bad("shingle", "must be 'word' or 'char'")
        if self.shingle_size is not None:
            integer("shingle_size", 1, 64)
        integer("num_perm", 1, 1024)
        integer("lsh_bands", 1)
        integer("lsh_rows", 1, 64)
        if self.lsh_bands * self.lsh_rows > self.num_perm:
            bad("lsh_bands", f"lsh_bands * lsh_rows ({self.lsh_bands} * {self.lsh_rows}) must be <= num_perm ({self.num_perm})")
        fraction("near_dup_threshold")
        if self.near_dup_threshold == 0:
            bad("near_dup_threshold", "must be > 0")
        integer("seed", 0, 2**32 - 1)
        integer("n_examples", 0)
        if self.dedup_scope not in DEDUP_SCOPES:
            bad("dedup_scope", f"must be one of {list(DEDUP_SCOPES)}")
        if isinstance(self.eval_splits, str) or not all(isinstance(x, str) and x for x in self.eval_splits):
            bad("eval_splits", "must be a tuple of split names such as ('val', 'test')")
        if self.max_caption_repeats is not None:
            integer("max_caption_repeats", 1)
        object.__setattr__(self, "languages", tuple(self.languages))
        object.__setattr__(self, "eval_splits", tuple(sorted({s.lower() for s in self.eval_splits})))
        object.__setattr__(self, "language_candidates", tuple(self.language_candidates))

    @property
    def language_backend(self) -> str:
        """"off", "lingua" or "fasttext" (``language_filter`` with None resolved)."""
        if self.language_filter is None:
            return "fasttext" if self.lid_model_path is not None else "off"
        return self.language_filter

    @property
    def effective_shingle_size(self) -> int:
        return self.shingle_size if self.shingle_size is not None else (2 if self.shingle == "word" else 5)

    def dedup_fingerprint(self) -> dict[str, str]:
        """The settings that make signatures comparable; stored with a saved :class:`DedupIndex`."""
        return {
            "shingle": self.shingle,
            "shingle_size": str(self.effective_shingle_size),
            "num_perm": str(self.num_perm),
            "lsh_bands": str(self.lsh_bands),
            "lsh_rows": str(self.lsh_rows),
            "near_dup_threshold": repr(float(self.near_dup_threshold)),
            "seed": str(self.seed),
        }


def kept_schema(num_perm: int) -> pa.Schema:
    """One row per kept caption."""
    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("caption_index", pa.int32(), nullable=False),  # position in the raw row's `captions` list
            pa.field("caption", pa.string(), nullable=False),  # cleaned
            pa.field("caption_raw", pa.string()),
            pa.field("n_words", pa.int32(), nullable=False),
            pa.field("n_chars", pa.int32(), nullable=False),
            pa.field("dedup_hash", pa.uint64(), nullable=False),  # 64-bit hash of the duplicate key
            pa.field("minhash", pa.list_(pa.uint32(), num_perm), nullable=False),
        ]
    )


REJECTED_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("caption_index", pa.int32(), nullable=False),
        pa.field("caption_raw", pa.string()),
        pa.field("caption_clean", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
    ]
)
