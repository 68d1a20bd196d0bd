"""Caption cleaning: normalisation, quality filters and de-duplication, shard by shard (no Dagster here).

Normalisation, in this order (every rule is in :mod:`mllm_pipeline.text.rules`):

1. mojibake repair with ``ftfy.fix_encoding`` ("cafÃ©" -> "café"), run only on rows that are not ASCII;
2. HTML character references with their ``;`` ("&amp;" -> "&", "&#233;" -> "é"; twice, for double-escaped text),
   run only where one occurs; entities without ``;`` stay (so "Barnes&noble" is not touched);
3. HTML tags (``<`` + letter ... ``>``) become a space; "a < b" and "<3" are not tags;
4. Unicode NFKC (full-width letters, ligatures, "…" -> "...", no-break spaces -> spaces);
5. control characters and line breaks become spaces; invisible characters (zero-width space, soft hyphen, BOM,
   bidi marks) are removed;
6. URLs (``http://``, ``https://``, ``ftp://``, ``www.``, any ``scheme://``, up to the next space) and e-mail
   addresses are removed;
7. dataset rules: WebVid titles lose stock-site boilerplate -- "stock footage/video/clip", "royalty free",
   stock-site names, resolution tags ("4k", "uhd", "hd", "1080p", "1920x1080"), frame rates ("60fps"), clip ids
   (digit runs of 6+, "#1234"), a leading "Video -" label, and the separators left dangling. Shot and camera
   words ("close-up", "aerial view", "slow motion", "time lapse", "dolly shot") stay: they describe the clip.
   The audited list is :data:`mllm_pipeline.text.rules.WEBVID_BOILERPLATE`. CC3M's hypernyms ("actor",
   "person") stay as they are; COCO, MSR-VTT and InternVid have no dataset rules;
8. repeated punctuation collapses ("!!!!" -> "!", "????" -> "?", ",," -> ","; four or more dots -> "...",
   three or more hyphens -> "-"; "--" stays); empty brackets left by removals go;
9. runs of spaces become one space; the caption is trimmed.

Reasons a caption is dropped (the first that applies; ``REASONS`` has the wording):

=====================  ======================================================================================
``empty_after_cleaning``  nothing left (or the caption was null)
``too_short``          not (more than 2 words AND more than 5 characters) -- DataComp's basic rule
``too_long``           more than 256 words or 2048 characters
``mostly_non_letters`` letters < 50% of the non-space characters
``repeated_ngrams``    >= 50% of the caption's word bigrams are repeats ("buy now buy now buy now")
``language``           optional (off): lingua's (or a local fastText model's) top language not allowed, score >= 0.5
``exact_duplicate``    same duplicate key (ASCII case, punctuation, spacing ignored) as an earlier caption
``near_duplicate``     MinHash (64 permutations over word bigrams) Jaccard >= 0.8 with an earlier caption that
                       shares one of 9 LSH bands of 7 rows
``eval_leak``          exact or near duplicate of an evaluation caption (MSR-VTT test, COCO val): never trained on
=====================  ======================================================================================

How it runs: :func:`clean_shard` cleans one raw shard (one Dagster partition; shards can be cleaned in any
order) and drops duplicates within it; :func:`dedup_across` (or :class:`DedupIndex` step by step) then walks the
shards' kept tables in shard order against the evaluation captions and the earlier shards, so its result depends
only on the shard order. Every caption is accounted for: ``captions_in == kept + rejected`` is checked in code.
All defaults are in :class:`CleanConfig`. ``mllm_pipeline_tests/text/reference.py`` is a per-caption implementation of
the same rules that the tests and ``bench/captions_bench.py`` compare with, row for row.
"""

from mllm_pipeline.text.clean import ShardCleanResult, clean_shard, explode_captions
from mllm_pipeline.text.config import FILTER_ORDER, REASONS, REJECTED_SCHEMA, CleanConfig, kept_schema
from mllm_pipeline.text.dedup import CrossShardResult, DedupIndex, ShardDrops, dedup_across
from mllm_pipeline.text.normalize import normalize
from mllm_pipeline.text.rules import DATASET_RULES, WEBVID_BOILERPLATE

__all__ = [
    "CleanConfig",
    "CrossShardResult",
    "DATASET_RULES",
    "DedupIndex",
    "FILTER_ORDER",
    "REASONS",
    "REJECTED_SCHEMA",
    "ShardCleanResult",
    "ShardDrops",
    "WEBVID_BOILERPLATE",
    "clean_shard",
    "dedup_across",
    "explode_captions",
    "kept_schema",
    "normalize",
]
