"""The caption normalisation rules, written once and run by two engines.

Every rewrite rule is a regular expression in the subset of syntax on which RE2 (used by ``pyarrow.compute``)
and Python's :mod:`re` (used by the per-caption reference in ``mllm_pipeline_tests/text/reference.py``) agree: explicit character classes instead of
``\\s``; ``\\b`` and ``\\d`` in their ASCII meaning (Python patterns are compiled with :data:`re.ASCII`); no
backreferences; ``^``/``$`` only on text that holds no newline. Case-insensitive rules run after NFKC, which maps
the only non-ASCII characters RE2's case folding would add (KELVIN SIGN, LONG S) to ASCII.

A :class:`RuleGroup` carries a *trigger*: a pattern that matches every string any of its rules could change. The
vectorised engine runs the group only on the rows its trigger matches; the reference runs every rule on every
string. The equivalence tests (vectorised output == reference output) check that each trigger is wide enough.
"""

from __future__ import annotations

import dataclasses
import html
import re
from functools import cached_property

# ---------------------------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rewrite: every match of ``pattern`` becomes ``replacement`` (a literal string)."""

    name: str
    pattern: str
    replacement: str
    ignore_case: bool = False
    why: str = ""

    @property
    def re2(self) -> str:
        """The pattern as given to ``pyarrow.compute`` (RE2)."""
        return ("(?i)" if self.ignore_case else "") + self.pattern

    @cached_property
    def python(self) -> re.Pattern[str]:
        """The same pattern compiled for Python's :mod:`re`."""
        return re.compile(self.pattern, re.ASCII | (re.IGNORECASE if self.ignore_case else 0))


@dataclasses.dataclass(frozen=True)
class RuleGroup:
    """Rules applied in order; ``trigger`` matches (at least) every string that one of them would change."""

    name: str
    trigger: str
    rules: tuple[Rule, ...]
    ignore_case_trigger: bool = False

    @property
    def trigger_re2(self) -> str:
        return ("(?i)" if self.ignore_case_trigger else "") + self.trigger


# ---------------------------------------------------------------------------------------------------------------
# 1. mojibake (ftfy), only ever needed on strings with a non-ASCII character
# ---------------------------------------------------------------------------------------------------------------


def fix_mojibake(text: str) -> str:
    """Repair UTF-8 text that was decoded with a legacy single-byte codec ("cafÃ©" -> "café").

    Uses ``ftfy.fix_encoding`` (only the encoding repairs, none of ftfy's other rewrites). ftfy returns ASCII text
    unchanged, so the vectorised engine calls this only for rows where ``pyarrow.compute.string_is_ascii`` is false.
    """
    return _ftfy().fix_encoding(text)


def _ftfy():
    try:
        import ftfy
    except ImportError as exc:  # pragma: no cover - ftfy is a declared dependency
        raise ImportError("caption cleaning needs the `ftfy` package for mojibake repair: pip install 'ftfy>=6'") from exc
    return ftfy


# ---------------------------------------------------------------------------------------------------------------
# 2. HTML entities: only well-formed ones, terminated by ';'
# ---------------------------------------------------------------------------------------------------------------

#: A named (``&amp;``) or numeric (``&#233;``, ``&#xE9;``) character reference, with its ``;``. Entities without
#: ``;`` are left alone on purpose: HTML5 would turn "Barnes&noble" into "Barnes¬ble".
ENTITY_PATTERN = r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});"
_ENTITY_RE = re.compile(ENTITY_PATTERN)
#: Rounds of unescaping: two handle double-escaped text ("&amp;quot;" -> '"'), common in scraped alt text.
ENTITY_ROUNDS = 2


def unescape_entities(text: str) -> str:
    """Replace each well-formed character reference by its character (``html.unescape`` on that reference)."""
    for _ in range(ENTITY_ROUNDS):
        new = _ENTITY_RE.sub(lambda m: html.unescape(m.group(0)), text)
        if new == text:
            break
        text = new
    return text


# ---------------------------------------------------------------------------------------------------------------
# 3. regex rules of the general normalisation, in the order they run
# ---------------------------------------------------------------------------------------------------------------

#: A tag: ``<`` + a letter (so "a < b" and "<3" are not tags), attributes, ``>``. Replaced by a space.
HTML_TAGS = RuleGroup(
    "html_tags",
    trigger=r"<[/A-Za-z]",
    rules=(Rule("html_tag", r"</?[A-Za-z][A-Za-z0-9]*(?:[ \t\n\r\f/][^<>]*)?>", " ", why="HTML tag"),),
)

# C0/C1 controls, DEL, and the whitespace NFKC leaves alone (line/paragraph separators, ogham space) -> space.
_CONTROL = r"\x00-\x1f\x7f-\x9f" + "\u1680\u2028\u2029"  # escapes for ASCII/C1 (both engines read \xHH)
# Invisible format characters -> removed: soft hyphen, zero-width space, LRM/RLM, bidi embeddings, word joiner, BOM.
_INVISIBLE = "\u00ad\u200b\u200e\u200f\u202a-\u202e\u2060\ufeff"
CONTROLS = RuleGroup(
    "controls",
    trigger=f"[{_CONTROL}{_INVISIBLE}]",
    rules=(
        Rule("control", f"[{_CONTROL}]", " ", why="control characters and line breaks become spaces"),
        Rule("invisible", f"[{_INVISIBLE}]", "", why="invisible format characters are removed"),
    ),
)

_URL_BODY = r"[^ <>\"]*[^ <>\".,;:!?)\]}']"
URLS_EMAILS = RuleGroup(
    "urls_emails",
    trigger=r"://|[Ww][Ww][Ww]\.|@",
    rules=(
        Rule("url", r"(?:(?:https?|ftp)://|www\.)" + _URL_BODY, " ", ignore_case=True,
             why="URL up to the next space, quote or angle bracket; a closing bracket or final punctuation stays"),
        Rule("url_other", r"[a-z][a-z0-9+.-]*://" + _URL_BODY, " ", ignore_case=True, why="any other scheme://..."),
        Rule("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", " ", why="e-mail address"),
    ),
)

#: Runs of the same punctuation mark collapse to one; dot runs of 4+ become an ellipsis "..." (which NFKC also makes
#: of "…"); hyphen runs of 3+ become "-" ("--" is a common separator and stays).
REPEATED_PUNCTUATION = RuleGroup(
    "repeated_punctuation",
    trigger=r"!!|\?\?|,,|;;|::|\*\*|==|~~|##|__|\.\.\.\.|---",
    rules=(
        Rule("bang", r"!{2,}", "!"),
        Rule("question", r"\?{2,}", "?"),
        Rule("comma", r",{2,}", ","),
        Rule("semicolon", r";{2,}", ";"),
        Rule("colon", r":{2,}", ":"),
        Rule("star", r"\*{2,}", "*"),
        Rule("equals", r"={2,}", "="),
        Rule("tilde", r"~{2,}", "~"),
        Rule("hash", r"#{2,}", "#"),
        Rule("underscore", r"_{2,}", "_"),
        Rule("dots", r"\.{4,}", "..."),
        Rule("hyphens", r"-{3,}", "-"),
    ),
)

EMPTY_BRACKETS = RuleGroup(
    "empty_brackets",
    trigger=r"\( *\)|\[ *\]|\{ *\}",
    rules=(Rule("empty_brackets", r"\( *\)|\[ *\]|\{ *\}", " ", why="brackets left empty, e.g. by a removed URL"),),
)

# ---------------------------------------------------------------------------------------------------------------
# 4. WebVid (stock-footage titles)
# ---------------------------------------------------------------------------------------------------------------

_RES = (
    r"ultra ?hd|full ?hd|uhd|fhd|qhd|hd|4k|8k|1080p|720p|2160p|4320p|1080i"
    r"|[0-9]{3,4} ?x ?[0-9]{3,4}"
)

#: The audited WebVid boilerplate list, applied in this order (case-insensitive, whole words) to WebVid titles only.
#: Shot and camera words ("close-up", "aerial view", "slow motion", "time lapse", "dolly shot", "seamless loop") are
#: NOT boilerplate: they describe what the clip shows and stay. Dates and places in editorial titles stay too.
WEBVID_BOILERPLATE: tuple[Rule, ...] = (
    # "stock footage", "stock video(s)", "stock clip(s)", "royalty-free footage", "stock-footage" (URL slug style),
    # and "footage/video": the stock site's label for the product, not a description of the clip.
    Rule("stock_label", r"\b(?:(?:stock|royalty[ -]?free)[ -](?:footage|videos?|clips?|film)|footage/video|video/footage)\b",
         " ", ignore_case=True, why="stock-site product label"),
    # a bare "royalty free" / "royalty-free" licence tag.
    Rule("licence", r"\broyalty[ -]?free\b", " ", ignore_case=True, why="licence tag"),
    # names of stock sites, which appear as credits or watermark text in titles.
    Rule("stock_site", r"\b(?:shutterstock|pond5|istock(?:photo)?|getty ?images|storyblocks|videoblocks|dreamstime"
                       r"|depositphotos|123rf)\b", " ", ignore_case=True, why="stock-site name"),
    # resolution tags: "4k", "uhd", "hd", "full hd", "1080p", "1920x1080" ("4K" TV sets lose the tag as well; "5k run"
    # and "2k" stay because they are common in other meanings).
    Rule("resolution", rf"\b(?:{_RES})\b", " ", ignore_case=True, why="resolution tag"),
    # frame-rate tags: "60fps", "30 fps".
    Rule("frame_rate", r"\b[0-9]{2,3} ?fps\b", " ", ignore_case=True, why="frame-rate tag"),
    # clip ids: digit runs of 6 or more (Shutterstock ids have 7-10 digits) and "#1234"-style numbers. Dates such as
    # "30.07.2015" or "april 15, 2014" have shorter runs and stay.
    Rule("clip_id", r"#[0-9]{4,}\b|\b[0-9]{6,}\b", " ", why="clip id"),
    # a leading media label left behind, e.g. "Video 1920x1080 - coconut palm..." -> "coconut palm...".
    Rule("leading_label", r"^ *(?:video|footage|clip) *[-:|]+ *", "", ignore_case=True, why="leading media label"),
    # tidy the separators a removal leaves behind.
    Rule("space_before_comma", r" +,", ",", why="tidy: 'kood , thailand' -> 'kood, thailand'"),
    Rule("space_before_period", r" +\.", ".", why="tidy: 'view .' -> 'view.'"),
    Rule("double_comma", r",(?: *,)+", ",", why="tidy: 'sunset, , slow motion' -> 'sunset, slow motion'"),
    Rule("leading_separator", r"^[ ,.;:|/-]+", "", why="tidy: separators at the start"),
    Rule("trailing_separator", r"[ ,;:|/-]+$", "", why="tidy: separators at the end (a final '.' stays)"),
)

WEBVID = RuleGroup("webvid_boilerplate", trigger=r"", rules=WEBVID_BOILERPLATE)

#: Dataset-specific rule groups, run after URL/e-mail removal. Datasets not listed (cc3m, coco, msrvtt, internvid)
#: have none: CC3M's hypernymised words ("actor", "person") are its official form and stay as they are.
DATASET_RULES: dict[str, tuple[RuleGroup, ...]] = {"webvid": (WEBVID,)}

#: The last rules: collapse spaces, trim (done with ``utf8_trim`` / ``str.strip(" ")``).
MULTI_SPACE = Rule("spaces", r" {2,}", " ")

# ---------------------------------------------------------------------------------------------------------------
# 5. the key used for duplicate detection
# ---------------------------------------------------------------------------------------------------------------

#: Runs of ASCII punctuation and spaces -> one space, in the (ASCII-lower-cased) duplicate key.
DEDUP_PUNCT = Rule("dedup_punct", r"[ !-/:-@\[-`{-~]+", " ")
ASCII_LOWER = str.maketrans({c: c.lower() for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"})


def dedup_text(clean: str) -> str:
    """The text duplicates are detected on: ASCII lower-case, ASCII punctuation -> space, spaces collapsed."""
    return DEDUP_PUNCT.python.sub(" ", clean.translate(ASCII_LOWER)).strip(" ")
